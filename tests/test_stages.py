"""Stages: a run that starts from another's checkpoint (--init_from) with some parts new
(--reinit) and the others kept, frozen or not (--freeze); a named config that trains its earlier
stages first (--init_config, tiny-assistant)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import recipes
import train
from config import load_run_config, run_cli
from conftest import tiny_config
from sources.data import load_tokenizer
from fusion import image_views
from model import SparseCut
from test_bad_input import TINY_RUN, expect_error
from test_cli import SMALL

SMALL_MODEL = SMALL[:SMALL.index("--batch_size")]         # the model options of the small runs


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
                                          "--reinit", "llm", "--freeze", "vit,fusion", "--input_map", "true",
                                          "--image_positions", "true", "--lr", 1e-9,
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
    assert {"input_map.weight", "input_map.positions"} <= set(llm) and "input_map.weight" not in before and all(torch.allclose(after[name], new[name], atol=1e-6) for name in llm)
    assert not torch.allclose(new["fusion.fusers.0.projector.fc1.weight"], before["fusion.fusers.0.projector.fc1.weight"])


@pytest.mark.parametrize("positions", [False, True])
def test_the_input_map_takes_the_fusions_tokens_back_to_rms_1(images, positions):
    """input_map: the fusion's input tokens through a linear map (and with image_positions a
    learned vector per visual token added), at RMS 1 again (visual_norm); the shortcuts'
    features are the fusion's own."""
    torch.manual_seed(0)
    model = SparseCut(tiny_config(visual_norm=True, input_map=True, image_positions=positions))
    tokens, injected = model.encode_images(images)                       # (B, N, d)
    views = image_views(images, model.config.vit.image_size)
    fused, fused_injected = model.fusion(model.vit(model.vit.normalize(views), model.fusion.vit_depth), len(images))
    mapped = F.linear(fused, model.input_map.weight, model.input_map.bias)
    if positions:
        assert model.input_map.positions.shape == (model.config.n_image_tokens, model.config.llm.width)
        mapped = mapped + model.input_map.positions
    expected = F.rms_norm(mapped, (fused.shape[-1],), eps=1e-6)
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


@pytest.fixture
def small_stages(monkeypatch):
    """tiny-assistant's three stages at test size: 2, 3 and 2 steps, a checkpoint at each step."""
    for name, steps in (("tiny-stage1", 2), ("tiny-stage2", 3), ("tiny-assistant", 2)):
        def make(base=recipes.CONFIGS[name], steps=steps):
            config = base()
            config.max_iters, config.batch_size, config.n_val, config.n_test = steps, 4, 4, 2
            config.warmup_iters, config.eval_interval, config.checkpoint_interval, config.log_interval = 1, 1000, 1, 1
            return config
        monkeypatch.setitem(recipes.CONFIGS, name, make)
    return ["--config", "tiny-assistant", *SMALL_MODEL, "--seed", 7]


def test_a_staged_config_trains_its_earlier_stages_first_and_reuses_them(tmp_path, small_stages, capsys):
    """tiny-assistant trains tiny-stage2 into out_dir/tiny-stage2, which trains tiny-stage1 into
    its own folder first; each with the run's seed and model options; the encoder and fusion of
    stage 1 reach the end untouched. A finished stage is reused, another seed's is refused."""
    run = tmp_path / "run"
    run_cli(train.main, [str(a) for a in [*small_stages, "--out_dir", run]])
    stage2, stage1 = run / "tiny-stage2", run / "tiny-stage2" / "tiny-stage1"
    printed = capsys.readouterr().out
    assert printed.index(f"stage tiny-stage1 first, into {stage1}") < printed.index("stage tiny-stage2 first")
    configs = {path: load_run_config(str(path / "checkpoint")) for path in (stage1, stage2, run)}
    assert [c.config_name for c in configs.values()] == ["tiny-stage1", "tiny-stage2", "tiny-assistant"]
    assert all(c.seed == 7 and c.model.vit.width == 16 and c.model.llm.width == 32 for c in configs.values())
    assert configs[stage2].init_from == str(stage1) and configs[run].init_from == str(stage2)
    assert [configs[stage2].caption_share, configs[run].caption_share] == [0.0, 0.3]
    first, second, last = tensors(stage1), tensors(stage2), tensors(run)
    kept = [name for name in last if name.startswith(("vit.", "fusion."))]
    assert kept and all(torch.equal(last[name], first[name]) and torch.equal(second[name], first[name]) for name in kept)
    assert not torch.equal(last["llm.embed_tokens.weight"], second["llm.embed_tokens.weight"])  # stage 3 trained on
    assert last["llm.embed_tokens.weight"].shape != first["llm.embed_tokens.weight"].shape  # a chatml LLM
    assert (run / "eval.json").exists() and not (stage2 / "eval.json").exists()

    run_cli(train.main, [str(a) for a in [*small_stages, "--out_dir", tmp_path / "again", "--init_from", stage2]])
    assert "first, into" not in capsys.readouterr().out                  # stage 2 finished: used as it is
    bare = tmp_path / "bare"                                               # a model, no training state
    shutil.copytree(stage2 / "checkpoint", bare, ignore=shutil.ignore_patterns("train_state.pt"))
    run_cli(train.main, [str(a) for a in [*small_stages, "--out_dir", tmp_path / "third", "--init_from", bare]])
    assert "first, into" not in capsys.readouterr().out and (tmp_path / "third" / "eval.json").exists()
    expect_error(train.main, [*small_stages, "--out_dir", run, "--overwrite", "true", "--seed", 8],
                 f"{stage2} holds a tiny-stage2 run of --seed 7, not 8: choose another --out_dir", capsys)


def test_a_stage_killed_midway_is_resumed_by_the_next_run(tmp_path, small_stages, monkeypatch, capsys):
    run, save = tmp_path / "run", train.save_checkpoint

    def save_then_stop(model, optimizer, data, config, step, *rest):
        save(model, optimizer, data, config, step, *rest)
        if config.config_name == "tiny-stage2" and step == 1:
            raise KeyboardInterrupt                      # as Ctrl-C right after stage 2's first checkpoint
    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit):
        run_cli(train.main, [str(a) for a in [*small_stages, "--out_dir", run]])
    assert not (run / "checkpoint").exists()
    monkeypatch.setattr(train, "save_checkpoint", save)
    capsys.readouterr()
    run_cli(train.main, [str(a) for a in [*small_stages, "--out_dir", run]])
    printed = capsys.readouterr().out
    assert "stage tiny-stage1" not in printed and "stage tiny-stage2 first" in printed and "steps 1..3" in printed
    steps = [json.loads(line)["step"] for line in (run / "tiny-stage2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and (run / "eval.json").exists()
