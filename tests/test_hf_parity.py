"""Parity against Hugging Face `transformers` (the oracle) on tiny random checkpoints it writes."""

import dataclasses
import json
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (test-only oracle) is not installed")

from llm import LLM, KVCache  # noqa: E402
from model import sample_next  # noqa: E402
from vit import ViT  # noqa: E402
from ckpt.weights import CheckpointError  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)


def clip_vision():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))


def clip_full():
    config = transformers.CLIPConfig(vision_config=VISION, projection_dim=16,
                                     text_config=dict(hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      vocab_size=99))
    return transformers.CLIPModel(config)


def siglip_vision():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))


def siglip_full():
    config = transformers.SiglipConfig(vision_config=VISION,
                                       text_config=dict(hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        vocab_size=99))
    return transformers.SiglipModel(config)


@pytest.mark.parametrize("build", [clip_vision, clip_full, siglip_vision, siglip_full])
def test_vit_hidden_states_match(build, tmp_path):
    torch.manual_seed(0)
    hf = build().eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if build is clip_full else "5GB")
    ours = ViT.from_pretrained(str(tmp_path))
    pixels = torch.randn(2, 3, 32, 32)
    vision = hf.vision_model if hasattr(hf, "vision_model") else hf
    with torch.no_grad():
        expected = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        got = ours(pixels)
    assert len(got) == len(expected) == 4
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    is_clip = "CLIP" in type(hf).__name__
    assert ours.config.class_token == is_clip
    assert ours.config.image_mean[0] == (0.48145466 if is_clip else 0.5)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
        tie_word_embeddings=False, max_position_embeddings=256))


def qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=256))


def llama3():
    """Llama 3.x rope scaling with a short original context (16), so the test runs past it."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=256, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))


def qwen3():
    """Qwen3: q/k RMSNorm per head before RoPE, head_dim (24) independent of the width (64)."""
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        max_position_embeddings=256))


def mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, sliding_window=None))


def randomise(model, std=0.2):
    """Spread the weights (and Qwen2's biases) so that greedy decoding has no near-ties."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


@pytest.mark.parametrize("build,dtype,shard,length", [(llama, torch.float32, "60KB", 11),
                                                      (qwen2, torch.bfloat16, "5GB", 11),
                                                      (llama3, torch.float32, "5GB", 40),
                                                      (qwen3, torch.float32, "5GB", 11),
                                                      (mistral, torch.float32, "5GB", 11)],
                         ids=["llama-gqa-untied-sharded", "qwen2-tied-bias-bf16",
                              "llama3-rope-scaled-past-its-context", "qwen3-qk-norm-head-dim", "mistral"])
def test_llm_logits_and_greedy_tokens_match(build, dtype, shard, length, tmp_path):
    torch.manual_seed(0)
    hf = randomise(build()).to(dtype).eval()
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    if shard != "5GB":
        assert (tmp_path / "model.safetensors.index.json").exists()
    hf = hf.float()                                              # the oracle runs in float32
    ours = LLM.from_pretrained(str(tmp_path))
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert ours.config.qkv_bias == (build is qwen2) and ours.config.qk_norm == (build is qwen3)
    assert bool(ours.config.rope_llama3) == (build is llama3)
    ids = torch.randint(0, 128, (2, length))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        expected = hf.generate(ids[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                               pad_token_id=0, eos_token_id=None)[0, length:].tolist()
        cache = KVCache(ours.config, 1, length + 20, "cpu", torch.float32)
        logits = ours(ids[:1], kv_cache=cache)[:, -1]
        got, seq = [], ids[:1]
        for _ in range(20):                                       # our greedy loop, with and without the cache
            token = int(sample_next(ours(seq)[:, -1]))
            assert int(sample_next(logits)) == token
            got.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            logits = ours(torch.tensor([[token]]), kv_cache=cache)[:, -1]
    assert got == expected
    if build is llama3:                                           # the scaling matters here
        plain = LLM(dataclasses.replace(ours.config, rope_llama3=()))
        plain.load_state_dict(ours.state_dict())
        assert not torch.allclose(plain(ids), ours(ids), atol=1e-3)


@pytest.mark.parametrize("model_type,missing", [("gemma2", "Gemma's (1 + weight) RMSNorm"),
                                                ("phi3", "Phi-3's fused qkv_proj")])
def test_unsupported_families_say_what_is_missing(model_type, missing, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(CheckpointError, match=re.escape(f"model_type '{model_type}' is not a supported causal LM (llama, mistral, qwen2, qwen3): {missing}")):
        LLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(CheckpointError, match="rope scaling 'yarn' is not supported"):
        LLM.from_pretrained(str(tmp_path))


def test_mismatched_checkpoint_lists_the_problems(tmp_path):
    torch.manual_seed(0)
    hf = llama()
    state = hf.state_dict()
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(3)
    state["lm_head.weight"] = torch.zeros(5, 64)
    hf.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError) as error:
        LLM.from_pretrained(str(tmp_path))
    message = str(error.value)
    assert "'norm.weight'" in message.split("missing:")[1].split(";")[0]
    assert "unexpected: ['model.extra.weight']" in message
    assert "lm_head.weight (5, 64)" in message


def test_wrong_kind_of_checkpoint_is_a_clear_error(tmp_path):
    llama().save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="not a CLIP or SigLIP vision model"):
        ViT.from_pretrained(str(tmp_path / "llama"))
    clip_vision().save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="model_type 'clip_vision_model' is not a supported causal LM"):
        LLM.from_pretrained(str(tmp_path / "clip"))


def test_sparsecut_from_backbones_and_a_checkpoint_without_them(tmp_path):
    """The paper's setting: pretrained CLIP + Llama, fusion from scratch; a stage-1 checkpoint
    (backbones frozen) stores the fusion only and loads back through the backbone paths."""
    from model import SparseCut, SparseCutConfig
    torch.manual_seed(0)
    clip_vision().save_pretrained(tmp_path / "vit")
    hf_llm = llama()
    hf_llm.save_pretrained(tmp_path / "llm")
    config = SparseCutConfig(vit_path=str(tmp_path / "vit"), llm_path=str(tmp_path / "llm"),
                             shortcut_gate="zero")
    model = SparseCut.from_backbones(config)
    assert model.config.vit.width == 32 and model.config.llm.n_kv_head == 2
    assert model.config.bos_id == 1 and model.config.eos_id == 2
    assert all(not p.is_meta for p in model.parameters())
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():                                         # the LLM is Hugging Face's
        torch.testing.assert_close(model.llm(ids), hf_llm(ids).logits, rtol=1e-4, atol=1e-4)
    model.vit.requires_grad_(False)
    model.llm.requires_grad_(False)
    with torch.no_grad():
        model.fusion.gates.gate.fill_(0.3)
    model.save_pretrained(tmp_path / "stage1")
    saved = (tmp_path / "stage1" / "model.safetensors").stat().st_size
    backbones = sum((tmp_path / d / "model.safetensors").stat().st_size for d in ("vit", "llm"))
    assert saved < backbones / 5
    loaded = SparseCut.from_pretrained(str(tmp_path / "stage1"))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ids.expand(2, 7))[0], model(images, ids.expand(2, 7))[0])


LOAD_AND_REPORT_PEAK = """
import sys, threading, time, torch
sys.path.insert(0, {root!r})
from llm import LLM

def anonymous_bytes():   # private memory; mmapped file pages are clean and reclaimable
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous_bytes())
        time.sleep(0.002)
before = anonymous_bytes()
watcher = threading.Thread(target=watch)
watcher.start()
model = LLM.from_pretrained({path!r}, dtype=torch.{dtype})
done.set()
watcher.join()
print(max(peak[0], anonymous_bytes()) - before)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_peaks_near_one_copy_of_the_weights(dtype, tmp_path):
    """Meta-device loading, one tensor at a time: the peak private memory added by loading a
    ~450 MB fp32 checkpoint is one copy of the loaded weights plus the largest tensor as read
    from the file (cast one at a time). Building the model first and then loading a state dict
    would take two copies; for a 7B model the extra tensor is 262 MB against 13.5 GB."""
    import subprocess
    import sys
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                      tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    hf = hf.to_empty(device="cpu")
    for p in hf.parameters():                                     # finite: NaN weights are refused
        p.data.zero_()
    hf.save_pretrained(tmp_path)
    n_bytes = sum(p.numel() for p in hf.parameters()) * (4 if dtype == "float32" else 2)
    largest_in_file = max(p.numel() for p in hf.parameters()) * 4
    del hf
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = LOAD_AND_REPORT_PEAK.format(root=root, path=str(tmp_path), dtype=dtype)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.strip())
    assert peak < n_bytes + largest_in_file + 32 * 2**20, \
        f"loading took {peak / 2**20:.0f} MiB for {n_bytes / 2**20:.0f} MiB of weights"
    assert peak < 1.5 * n_bytes                                   # far from two copies


def test_a_checkpoint_that_holds_a_backbone_must_hold_all_of_it(tmp_path):
    """Backbones may be left out whole (read again from their paths), never in part."""
    from safetensors.torch import load_file, save_file

    from model import SparseCut, SparseCutConfig
    torch.manual_seed(0)
    clip_vision().save_pretrained(tmp_path / "vit")
    llama().save_pretrained(tmp_path / "llm")
    config = SparseCutConfig(vit_path=str(tmp_path / "vit"), llm_path=str(tmp_path / "llm"))
    model = SparseCut.from_backbones(config)
    model.vit.requires_grad_(False)                              # stage 2: the LLM is trained
    model.save_pretrained(tmp_path / "stage2")
    weights = tmp_path / "stage2" / "model.safetensors"
    state = load_file(str(weights))
    assert any(k.startswith("llm.") for k in state) and not any(k.startswith("vit.") for k in state)
    SparseCut.from_pretrained(str(tmp_path / "stage2"))           # whole: loads
    del state["llm.layers.1.mlp.up_proj.weight"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing: \['llm.layers.1.mlp.up_proj.weight'\]"):
        SparseCut.from_pretrained(str(tmp_path / "stage2"))
