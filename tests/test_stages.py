"""Two stages: a run that starts from another's checkpoint (--init_from) with some parts new
(--reinit) and the others kept, frozen or not (--freeze)."""

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from config import load_run_config, run_cli
from conftest import tiny_config
from data import load_tokenizer
from fusion import image_views
from model import SparseCut
from test_bad_input import TINY_RUN, expect_error


def tensors(run):
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_reinit_starts_the_named_parts_as_a_new_run_would_and_loads_the_others(tmp_path):
    """A caption run (plain template), then a chatml run from it with a new LLM and a new input
    map: the frozen ViT and fusion are the first run's, bit for bit; the LLM (another vocabulary,
    qk_norm) and the map are the ones a new run with that seed builds, moved only by two steps
    at a learning rate of 1e-9."""
    first, second = tmp_path / "captions", tmp_path / "questions"
    run_cli(train.main, [str(a) for a in [*TINY_RUN, "--out_dir", first]])
    run_cli(train.main, [str(a) for a in [*TINY_RUN, "--config", "tiny-chat", "--init_from", first,
                                          "--reinit", "llm", "--freeze", "vit,fusion", "--input_map", "true", "--lr", 1e-9,
                                          "--seed", 7, "--out_dir", second]])
    before, after = tensors(first), tensors(second)
    kept = [name for name in after if name.startswith(("vit.", "fusion."))]
    assert kept and all(torch.equal(after[name], before[name]) for name in kept)

    config = load_run_config(str(second / "checkpoint"))
    assert config.model.llm.qk_norm and config.model.template == "chatml"
    assert "<|im_start|>" in load_tokenizer(str(second / "checkpoint")).get_vocab()
    assert after["llm.embed_tokens.weight"].shape[0] > before["llm.embed_tokens.weight"].shape[0]
    torch.manual_seed(7)
    new = SparseCut(config.model).state_dict()
    llm = [name for name in after if name.startswith(("llm.", "input_map."))]
    assert "input_map.weight" in llm and "input_map.weight" not in before and all(torch.allclose(after[name], new[name], atol=1e-6) for name in llm)
    assert not torch.allclose(new["fusion.fusers.0.projector.fc1.weight"], before["fusion.fusers.0.projector.fc1.weight"])


def test_the_input_map_takes_the_fusions_tokens_back_to_rms_1(images):
    """input_map: the fusion's input tokens through a linear map, at RMS 1 again (visual_norm);
    the shortcuts' features are the fusion's own."""
    torch.manual_seed(0)
    model = SparseCut(tiny_config(visual_norm=True, input_map=True))
    tokens, injected = model.encode_images(images)                       # (B, N, d)
    views = image_views(images, model.config.vit.image_size)
    fused, fused_injected = model.fusion(model.vit(model.vit.normalize(views), model.fusion.vit_depth), len(images))
    expected = F.rms_norm(model.input_map(fused), (fused.shape[-1],), eps=1e-6)
    torch.testing.assert_close(tokens, expected)
    assert not torch.allclose(tokens, fused)
    assert injected.keys() == fused_injected.keys()
    assert all(torch.equal(injected[layer], fused_injected[layer]) for layer in injected)


def test_reinit_errors(tmp_path, capsys):
    expect_error(train.main, [*TINY_RUN, "--reinit", "llm", "--out_dir", tmp_path / "a"],
                 "--reinit starts parts of the --init_from checkpoint new: give --init_from", capsys)
    expect_error(train.main, [*TINY_RUN, "--reinit", "llm,brain", "--init_from", tmp_path, "--out_dir", tmp_path / "b"],
                 "--reinit takes a comma list of vit, llm, fusion, not 'brain'", capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
