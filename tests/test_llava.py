"""Real LLaVA-1.5 checkpoints: a tiny random LlavaForConditionalGeneration written by transformers
loads as our `llava` model with the same logits, loss and greedy tokens, in either key layout."""

import json
import os

import pytest
import torch

from sources.conversation import render, tokenize
from sources.data import build_tokenizer, template_words
from model import SparseCut

transformers = pytest.importorskip("transformers", reason="transformers is the oracle for LLaVA checkpoints "
                                   "(pip install -r requirements-dev.txt)")
IMAGE_ID, VOCAB = 95, 96


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3,
                                       num_attention_heads=2, intermediate_size=48),
        text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=64, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0),
        image_token_id=IMAGE_ID, vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():                                     # spread the logits: no greedy near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("llava") / "hf"
    model.save_pretrained(path)
    return str(path), model


def other_layout(path, out):
    """The same checkpoint under the other key layout: the hub's (language_model.model.*,
    vision_tower.vision_model.*) <-> newer transformers' (model.language_model.*, lm_head.*)."""
    from safetensors.torch import load_file, save_file
    state = load_file(os.path.join(path, "model.safetensors"))
    renamed = {}
    for name, tensor in state.items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        elif name.startswith("language_model.lm_head."):
            name = name[len("language_model."):]
        elif name.startswith(("vision_tower.", "multi_modal_projector.")):
            name = "model." + name
        renamed[name] = tensor
    assert set(renamed) != set(state)
    os.makedirs(out)
    save_file(renamed, os.path.join(out, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f, open(os.path.join(out, "config.json"), "w") as g:
        g.write(f.read())
    return out


def vicuna_prompt(model, answer=None):
    """A vicuna_v1 prompt, the image after the system prompt, as LLaVA writes it; ids < VOCAB."""
    tokenizer = build_tokenizer(sorted(set(template_words() + ["what", "is", "this", "?", "a", "cat"])))
    turns = [{"from": "human", "value": "<image>\nwhat is this?"}] + \
        ([{"from": "gpt", "value": answer}] if answer else [])
    pieces = render(turns, "vicuna_v1", for_generation=answer is None)
    c = model.config
    ids, labels = tokenize(pieces, tokenizer, "vicuna_v1", c.n_image_tokens, c.image_token_id, c.bos_id, c.eos_id)
    assert max(ids) < VOCAB and ids.index(IMAGE_ID) > 20, "the image comes after the system prompt"
    return torch.tensor([ids]), torch.tensor([labels])


@pytest.mark.parametrize("layout", ["as-written", "other"])
def test_llava_checkpoint_matches_transformers(llava_dir, layout, tmp_path):
    path, reference = llava_dir
    if layout == "other":
        path = other_layout(path, str(tmp_path / "other"))
    model = SparseCut.from_pretrained(path).eval()
    c = model.config
    assert (c.fusion, c.template, c.image_token_id, c.input_layer) == ("llava", "vicuna_v1", IMAGE_ID, -2)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)                         # at the encoder's resolution: no resize
    mean, std = torch.tensor(c.vit.image_mean)[:, None, None], torch.tensor(c.vit.image_std)[:, None, None]
    input_ids, labels = vicuna_prompt(model, answer="a cat")
    input_ids, labels = input_ids.expand(2, -1), labels.expand(2, -1)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=(images - mean) / std, labels=labels)
        logits, loss = model(images, input_ids, labels)
    text = input_ids[0] != IMAGE_ID
    torch.testing.assert_close(logits, expected.logits[:, text], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-5)
    # greedy decoding from the prompt (ending "ASSISTANT:"), with the KV cache on both sides
    prompt, _ = vicuna_prompt(model)
    with torch.no_grad():
        out = reference.generate(input_ids=prompt, pixel_values=(images[:1] - mean) / std, max_new_tokens=8,
                                 do_sample=False, eos_token_id=c.eos_id, pad_token_id=c.pad_id)
    hf_tokens = out[0, prompt.shape[1]:].tolist()
    hf_tokens = hf_tokens[:hf_tokens.index(c.eos_id)] if c.eos_id in hf_tokens else hf_tokens
    assert model.generate(images[:1], prompt, max_new_tokens=8) == [hf_tokens]
    assert len(hf_tokens) >= 2


def test_init_from_llava_starts_a_sparsecut_model(llava_dir):
    """A sparsecut run started from a LLaVA directory: its encoder and LLM, a new fusion."""
    from dataclasses import replace
    path, reference = llava_dir
    llava = SparseCut.from_pretrained(path)
    run = replace(llava.config, fusion="sparsecut", shortcuts="default")
    model = SparseCut.from_pretrained(path, config=run)
    assert model.config.fusion == "sparsecut" and model.fusion.plan
    for ours, theirs in ((model.vit, llava.vit), (model.llm, llava.llm)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert all(torch.isfinite(p).all() for p in model.fusion.parameters())


def test_unsupported_llava_settings_are_refused(llava_dir, tmp_path):
    from ckpt.weights import CheckpointError
    path, _ = llava_dir
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["vision_feature_select_strategy"] = "full"
    out = tmp_path / "full"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_feature_select_strategy 'full' is not supported"):
        SparseCut.from_pretrained(str(out))


def test_train_init_from_a_llava_directory(llava_dir, tmp_path):
    """`train.py --init_from LLAVA_DIR --fusion sparsecut`: a stage 2 on LLaVA conversations that
    starts from LLaVA-1.5's encoder, LLM and tokenizer."""
    from PIL import Image

    from test_cli import run
    path, _ = llava_dir
    words = sorted(set(template_words() + ["what", "is", "this", "?", "a", "cat", "red", "square"]))
    build_tokenizer(words).save(os.path.join(path, "tokenizer.json"))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (200, 10 * i, 10)).save(data / f"{i}.png")
    (data / "llava_v1_5_mix665k.json").write_text(json.dumps([{"image": f"{i}.png", "conversations": [
        {"from": "human", "value": "what is this?\n<image>"}, {"from": "gpt", "value": "a red square"},
        {"from": "human", "value": "is this a cat?"}, {"from": "gpt", "value": "a square"}]} for i in range(4)]
        + [{"conversations": [{"from": "human", "value": "what is a cat?"}, {"from": "gpt", "value": "a cat"}]}]))
    out = tmp_path / "s2"
    run("train.py", "--init_from", path, "--fusion", "sparsecut", "--template", "vicuna_v1", "--data", data,
        "--max_iters", 2, "--batch_size", 2, "--n_val", 1, "--n_test", 1, "--eval_interval", 100, "--out_dir", out)
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert (config["fusion"], config["template"], config["llm"]["vocab_size"]) == ("sparsecut", "vicuna_v1", VOCAB)
    assert (out / "checkpoint" / "tokenizer.json").read_text() == open(os.path.join(path, "tokenizer.json")).read()
