"""What the results rest on: the initialisation, the frozen-encoder recipe (contrastive
pretraining, stage 1 then stage 2), the layer probe, the ablation command and its document,
sample.py --show."""

import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train                                                      # noqa: E402
from config import ContrastiveConfig, parse_options                # noqa: E402
from recipes import named_config                                    # noqa: E402
from training.contrastive import ContrastivePair, save_clip_vision           # noqa: E402
from sources.data import make_data                                          # noqa: E402
from model import SparseCut, init_weights                          # noqa: E402
from studies.probe import layer_probe                                       # noqa: E402
from vit import ViT, ViTConfig                                      # noqa: E402
from test_cli import ROOT, SMALL, bad, run                               # noqa: E402

DOC = os.path.join(ROOT, "docs", "ablation.md")


def test_linear_weights_are_scaled_by_fan_in():
    layer = torch.nn.Linear(400, 300)
    init_weights(layer)
    assert abs(layer.weight.std().item() - 400 ** -0.5) < 0.002 and not layer.bias.any()
    conv = torch.nn.Conv2d(3, 64, 8, 8)
    init_weights(conv)
    assert abs(conv.weight.std().item() - 192 ** -0.5) < 0.005


def small_config(**fields):
    config = named_config("tiny")
    parse_options(config, SMALL + ["--max_iters", "3", "--log_interval", "1", "--eval_interval", "100",
                                   "--checkpoint_interval", "100"])
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def initial_state(config):
    """The weights train.py starts from: the same seed, the same constructor."""
    torch.manual_seed(config.seed)
    config.model.llm.vocab_size = make_data(config).tokenizer.get_vocab_size()
    return {k: v.clone() for k, v in SparseCut(config.model).state_dict().items()}


@pytest.mark.parametrize("stage1_iters, llm_trains", [(3, False), (2, True)])
def test_stage_1_trains_the_fusion_alone(tmp_path, stage1_iters, llm_trains):
    config = small_config(stage1_iters=stage1_iters, out_dir=str(tmp_path / "run"))
    start = initial_state(small_config())
    model, *_ = train.train(config)
    now = model.state_dict()
    changed = lambda prefix: any(not torch.equal(now[k], start[k]) for k in start if k.startswith(prefix))
    assert changed("llm.") == llm_trains
    assert changed("fusion.") and changed("vit.")


def test_contrastive_pretraining_learns_and_writes_a_clip_vision_model(tmp_path):
    vit_config = ViTConfig(image_size=16, patch_size=8, width=16, n_layer=2, n_head=2, mlp_dim=32)
    torch.manual_seed(0)
    pair = ContrastivePair(vit_config, 40, ContrastiveConfig(embed_dim=8, text_width=16, text_layers=1))
    pair.apply(init_weights)
    images = torch.rand(8, 3, 32, 32)
    input_ids = torch.randint(3, 40, (8, 6))
    eos = torch.full((8,), 5)
    optimizer = torch.optim.AdamW(pair.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):                                           # memorise 8 pairs
        loss, accuracy = pair(images, input_ids, eos)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0] and float(accuracy) == 1.0
    save_clip_vision(pair.vit, str(tmp_path / "clip"), {"test": True})
    ours = ViT.from_pretrained(str(tmp_path / "clip"))
    pixels = torch.randn(2, 3, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(ours(pixels), pair.vit(pixels)))
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (requirements-dev.txt)")
    hf = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "clip")).eval()
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        for a, b in zip(theirs, pair.vit(pixels)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tiny_frozen_pretrains_the_encoder_once_and_keeps_it_frozen(tmp_path):
    encoder = tmp_path / "encoder"
    args = ["--config", "tiny-frozen", *SMALL, "--max_iters", 2, "--stage1_iters", 1, "--clip.iters", 3,
            "--clip.batch_size", 8, "--model.vit_path", encoder]
    first = run("train.py", *args, "--out_dir", tmp_path / "a")
    assert "pretraining the encoder" in first.stdout and "stage 2" in first.stdout
    written = (encoder / "model.safetensors").read_bytes()
    second = run("train.py", *args, "--out_dir", tmp_path / "b", "--seed", 2)
    assert "pretraining the encoder" not in second.stdout
    assert (encoder / "model.safetensors").read_bytes() == written          # reused, untouched
    bad("train.py", *args, "--clip.iters", 4, "--out_dir", tmp_path / "c", match="holds an encoder pretrained with other config settings")
    model = SparseCut.from_pretrained(str(tmp_path / "b" / "checkpoint"))
    assert all(torch.equal(a, b) for a, b in zip(model.vit.state_dict().values(),
                                                  ViT.from_pretrained(str(encoder)).state_dict().values()))


def test_layer_probe_reads_colour_off_the_embeddings():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=48, patch_size=8, width=32, n_layer=2, n_head=2, mlp_dim=64))
    vit.apply(init_weights)
    accuracies = layer_probe(vit, n_train=150, n_test=80)
    assert set(accuracies) == {"shape", "color", "size", "texture"}
    assert all(len(values) == 3 for values in accuracies.values())
    assert accuracies["color"][0] > 0.9                             # a linear map of the pixels


def test_ablation_runs_resumes_and_writes_its_table(tmp_path):
    args = ["--setting", "scratch", "--only", "llava", "llava (EE-MLLM-F)", "--recipe_seeds", 2, "--jobs", 2,
            "--max_iters", 2, "--probe", "false", "--out_dir", tmp_path / "out", "--doc", tmp_path / "doc" / "a.md"]
    run("studies.ablation", *args)
    run("studies.ablation", *args)                                       # read back, not retrained
    log = (tmp_path / "out" / "scratch" / "llava" / "seed1" / "train.log").read_text()
    assert log.count("$ ") == 1
    rows = check_tables((tmp_path / "doc" / "a.md").read_text(), expect={"llava", "llava (EE-MLLM-F)"})
    assert [cells[1] for (_, variant), cells in rows.items() if variant == "llava"] == ["2"]   # both seeds, side by side
    assert "with 2 run(s) side by side" in (tmp_path / "doc" / "a.md").read_text()
    assert (tmp_path / "doc" / "a_quality_vs_flops.png").stat().st_size > 1000           # named after the doc
    other_steps = list(args)
    other_steps[args.index("--max_iters") + 1] = 3                  # runs of 2 steps are not runs of 3
    bad("studies.ablation", *other_steps, "--report", "true", match="holds a run of 2 steps, not 3")
    report = [a if a != "llava (EE-MLLM-F)" else "concat" for a in args] + ["--report", "true"]
    run("studies.ablation", *report)                                     # trains nothing, lists the rest
    text = (tmp_path / "doc" / "a.md").read_text()
    assert "concat (scratch): 1 of 1 seed(s) not run yet" in text
    assert not (tmp_path / "out" / "scratch" / "concat").exists()
    check_tables(text, expect={"llava"})


def test_a_variant_that_builds_the_same_model_is_not_trained_twice():
    from studies.ablation import same_model
    assert same_model("scratch", "sparsecut-dense", "sparsecut")      # 4 LLM layers: dense = uniform
    assert same_model("frozen", "sparsecut-dense", "sparsecut")
    assert not same_model("scratch", "sparsecut-skew_top", "sparsecut")
    assert not same_model("scratch", "fusion-only", "sparsecut")
    assert not same_model("scratch", "llava-hires", "llava")


HEADER = ["variant", "seeds", "object_f1", "exact_match", "shape", "color", "size", "texture",
          "position", "count", "val_loss", "LLM GFLOPs/sample", "train TFLOPs", "wall s/run"]
CELL = re.compile(r"^\d+\.\d{3}( ± \d+\.\d{3})?$")


def result_rows(text):
    """{(section, variant): cells} of every results table in an ablation document."""
    rows, section, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line, None
        elif line.startswith("| variant |"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif header and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(section, cells[0])] = cells
        elif not line.startswith("|"):
            header = None
    return rows


def check_tables(text, expect=()):
    assert [c.strip() for c in re.search(r"^\| variant \|.*$", text, re.M).group(0).strip("|").split("|")] == HEADER
    rows = result_rows(text)
    assert expect <= {variant for _, variant in rows}
    for (section, variant), cells in rows.items():
        assert len(cells) == len(HEADER), (variant, cells)
        assert int(cells[1]) >= 1
        assert all(CELL.match(c) for c in cells[2:11]), (variant, cells)
    return rows


@pytest.mark.skipif(not os.path.isfile(DOC), reason="docs/ablation.md is written by python ablation.py")
def test_committed_ablation_table_and_the_readme_agree():
    text = open(DOC).read()
    rows = check_tables(text, expect={"llava", "sparsecut", "fusion-only", "llava+shortcuts"})
    assert any("From scratch" in s for s, _ in rows) and any("Frozen" in s for s, _ in rows)
    readme = open(os.path.join(ROOT, "README.md")).read()
    quoted = re.findall(r"^\| (?:scratch|frozen) \| .*$", readme, re.M)
    assert len(quoted) >= 8, "the README quotes the ablation's rows"
    for line in quoted:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        setting, variant, values = cells[0], cells[1], cells[2:]
        section = next(s for s, v in rows if v == variant and s.lower().find(
            "scratch" if setting == "scratch" else "frozen") >= 0)
        table = rows[(section, variant)]
        assert values == [table[HEADER.index(name)] for name in README_COLUMNS], line


README_COLUMNS = ["seeds", "object_f1", "exact_match", "shape", "color", "texture", "LLM GFLOPs/sample", "wall s/run"]


def test_show_draws_the_caption_and_the_shortcuts(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws --show (requirements-dev.txt)")
    from PIL import Image
    out = tmp_path / "run"
    run("train.py", "--config", "tiny", *SMALL, "--max_iters", 1, "--out_dir", out)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "x.png")
    result = run("sample.py", "--image", tmp_path / "x.png", "--checkpoint", out, "--show", tmp_path / "s.png")
    assert "wrote" in result.stdout
    with Image.open(tmp_path / "s.png") as picture:
        assert picture.size[0] > 600                              # image + the shortcut panel
    model = SparseCut.from_pretrained(str(out / "checkpoint"))
    from sample import shortcut_shares
    shares = shortcut_shares(model, torch.rand(1, 3, 32, 32), torch.tensor([[1, 5, 6]]))
    assert [(v, l) for v, l, _ in shares] == model.fusion.plan
    assert all(share > 0 for _, _, share in shares)


def test_layer_probe_reads_the_low_res_view_too():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=48, patch_size=8, width=32, n_layer=2, n_head=2, mlp_dim=64))
    vit.apply(init_weights)
    accuracies = layer_probe(vit, n_train=150, n_test=80, view="low")
    assert all(len(values) == 3 for values in accuracies.values())
    assert accuracies["color"][0] > 0.9 and accuracies["size"][0] > 0.9
    assert accuracies["texture"][0] < 0.6                          # textures blur away at the low-res view


PREMISE = os.path.join(ROOT, "docs", "premise.md")
PREMISE_HEADER = ["design", "objective", "ViT layers", "steps x batch", "colour at llava's layer",
                  "best colour below it", "shape at llava's layer", "premise met", "wall s"]


def premise_rows(text):
    """{design: cells} of the summary table of a premise document, checked."""
    lines = text.splitlines()
    start = lines.index("| " + " | ".join(PREMISE_HEADER) + " |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(PREMISE_HEADER) and cells[7] in ("yes", "no"), cells
        assert all(CELL.match(c) for c in cells[4:7]), cells
        colour, lower = float(cells[4]), float(cells[5])
        assert cells[7] == ("yes" if colour <= 1 / 6 + 0.15 and lower >= 0.90 else "no"), cells
        rows[cells[0]] = cells
    return rows


def test_premise_study_writes_its_tables_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the study's plot (requirements-dev.txt)")
    doc = tmp_path / "doc" / "p.md"
    run("studies.premise", "--designs", "patch-invariance", "adversarial", "--iters", 2, "--n_probe", 30,
        "--out_dir", tmp_path / "encoders", "--doc", doc)
    text = doc.read_text()
    assert set(premise_rows(text)) == {"patch-invariance", "adversarial"}
    assert "Command: `python -m studies.premise --designs patch-invariance adversarial" in text
    assert text.count("| color | ") == 2                                  # a probe table per design
    assert (tmp_path / "doc" / "p_probe.png").stat().st_size > 1000
    bad("studies.premise", "--designs", "colour-blind", match="unknown design 'colour-blind'")


@pytest.mark.skipif(not os.path.isfile(PREMISE), reason="docs/premise.md is written by python -m studies.premise")
def test_committed_premise_table_and_the_readme_agree():
    rows = premise_rows(open(PREMISE).read())
    assert len(rows) >= 3, "at least three designs, each measured"
    readme = open(os.path.join(ROOT, "README.md")).read()
    quoted = {cells[0]: cells for cells in (
        [c.strip() for c in line.strip().strip("|").split("|")] for line in readme.splitlines()
        if line.startswith("| ")) if cells[0] in rows}
    assert set(quoted) == set(rows), "the README quotes every design of docs/premise.md"
    for design, cells in quoted.items():
        assert cells == rows[design][:8], (design, cells)


def test_recoloured_pairs_change_the_colours_and_nothing_else():
    from sources.shapes import COLORS
    from training.premise import recoloured_pairs
    images, recoloured, captions, objects = recoloured_pairs(6, seed=3)
    assert images.shape == recoloured.shape == (6, 3, 96, 96) and len(objects) == 12
    assert not any(colour in caption.split() for caption in captions for colour in COLORS)
    for first, second in zip(objects[:6], objects[6:]):
        assert [cell for cell, _ in first] == [cell for cell, _ in second]          # same places
    background = (images == recoloured).all(1)                                    # (6, 96, 96)
    assert background.float().mean() > 0.5                                        # only the objects differ
    assert recoloured_pairs(6, seed=3)[0].equal(images)                            # a pure function of the seed


def test_class_mean_spread_is_zero_exactly_when_the_class_means_agree():
    from training.premise import class_mean_spread
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    noise = torch.randn(60, 8)
    same = torch.cat([noise[labels == k] - noise[labels == k].mean(0) for k in range(3)])   # every class mean 0
    assert float(class_mean_spread(same + 5, torch.arange(3).repeat_interleave(20), 3)) < 1e-10
    shifted = noise + 3 * torch.nn.functional.one_hot(labels, 8).float()
    assert float(class_mean_spread(shifted, labels, 3)) > 0.1


@pytest.mark.parametrize("objective", ["nuisance", "patch-invariance", "adversarial", "patch-clip", "mean-matching"])
def test_each_premise_objective_trains_the_encoder(tmp_path, objective):
    from training.contrastive import pretrain_encoder
    config = named_config("tiny-premise")
    parse_options(config, ["--vit.width", "16", "--vit.n_head", "2", "--vit.mlp_dim", "32", "--vit.n_layer", "3",
                           "--clip.iters", "2", "--clip.batch_size", "4", "--clip.objective", objective])
    data = make_data(config)
    torch.manual_seed(config.clip.seed)                           # the pretraining's own start
    start = ContrastivePair(config.model.vit, data.tokenizer.get_vocab_size(), config.clip)
    start.apply(init_weights)
    start = start.vit
    pretrain_encoder(config, data, str(tmp_path / "encoder"))
    written = ViT.from_pretrained(str(tmp_path / "encoder"))
    stored = json.loads((tmp_path / "encoder" / "config.json").read_text())["sparsecut_pretraining"]
    assert stored["config"]["objective"] == objective and written.config.n_layer == 3
    assert not torch.equal(written.layers[0].mlp.fc1.weight, start.layers[0].mlp.fc1.weight)


def test_a_premise_objective_needs_the_shapes_scenes():
    config = named_config("tiny-premise")
    with pytest.raises(ValueError, match="recolours Shapes scenes"):
        parse_options(config, ["--data", "somewhere"])
        config.check()
    config = named_config("tiny-premise")
    with pytest.raises(ValueError, match="--clip.objective takes"):
        parse_options(config, ["--clip.objective", "hue"])
        config.check()


COMPARISON = os.path.join(ROOT, "docs", "premise-comparison.md")
PREMISE_COLUMNS = ["seeds", "object_f1", "shape", "color", "size", "position"]


@pytest.mark.skipif(not os.path.isfile(COMPARISON),
                    reason="docs/premise-comparison.md is written by python -m studies.ablation --setting premise")
def test_committed_premise_comparison_and_the_readme_agree():
    rows = check_tables(open(COMPARISON).read(), expect={"llava", "llava-lower", "llava+shortcuts", "sparsecut"})
    assert all(int(cells[1]) >= 5 for cells in rows.values()), "at least 5 seeds per variant"
    readme = open(os.path.join(ROOT, "README.md")).read()
    quoted = re.findall(r"^\| premise \| .*$", readme, re.M)
    assert len(quoted) >= 4, "the README quotes the premise comparison's rows"
    by_variant = {variant: cells for (_, variant), cells in rows.items()}
    for line in quoted:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        table = by_variant[cells[1]]
        assert cells[2:] == [table[HEADER.index(name)] for name in PREMISE_COLUMNS], line


def test_the_premise_setting_plans_its_variants(tmp_path):
    doc = tmp_path / "p.md"
    run("studies.ablation", "--setting", "premise", "--report", "true", "--probe", "false",
        "--out_dir", tmp_path / "out", "--doc", doc)
    text = doc.read_text()
    for variant in ("llava", "llava-lower", "llava+shortcuts", "llava+shortcuts-skew_bottom",
                    "llava+shortcuts-skew_top", "llava+shortcuts-reverse", "sparsecut"):
        assert f"{variant} (premise): 5 of 5 seed(s) not run yet" in text
    assert "llava+shortcuts-dense (premise): the same model as llava+shortcuts" in text
    assert "fusion-only (premise)" not in text                        # the other settings' variants stay there
