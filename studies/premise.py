"""The paper's premise at tiny scale: can pretraining make an encoder's top layer discard what its
lower layers still hold?

    python -m studies.premise [--designs NAME ...] [--scratch RUN] [--doc docs/premise.md]

SparseCut's argument (paper, section 1) is that the ViT layer LLaVA reads (the penultimate) has
lost detail its lower layers keep, which shortcuts from those layers bring back. The layer probe
(studies/probe.py) finds no such loss in the project's encoders (docs/ablation.md). Each design
below pretrains a tiny ViT CLIP-style on the low-resolution view (48 px, so the high-resolution
view cannot be what helps; training/contrastive.py with an objective of training/premise.py), then
probes every layer's low-res patch tokens for each attribute. The premise holds for a design if,
at the layer llava reads (n_layer - 1), colour is within chance + 0.15 (1/6 + 0.15) while some
lower layer reads it at >= 0.90. Designs (the tiny-frozen encoder's settings but for these):
- `clip`: the tiny-frozen encoder itself (4 layers, 600 steps of 128, captions with colours);
- `nuisance`, `patch-invariance`, `patch-invariance-strong`, `adversarial`, `patch-clip`: the
  objectives of training/premise.py, 6 layers, 300 steps of 64 scenes (each shown twice);
- `deep-decay`: `nuisance` with 8 layers, weight decay 0.3 and 600 steps;
- `mean-matching`: `--config tiny-premise`'s encoder (6 layers, 600 steps of 64).
Each encoder is written to OUT/NAME (a CLIPVisionModel directory; one already there, made with the
same settings, is reused, as train.py reuses tiny-frozen's). Writes --doc with the summary
and one table per design, and the plot of the probes beside it (matplotlib).
"""

import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from config import parse_options, run_cli
from model import SparseCut
from recipes import named_config
from sources.data import make_data
from studies.probe import layer_probe
from training.contrastive import check_encoder, pretrain_encoder
from ckpt.weights import checkpoint_dir
from vit import ViT

CHANCE = {"shape": 1 / 4, "color": 1 / 6, "size": 1 / 2, "texture": 1 / 3}
QUICK = {"n_layer": 6, "iters": 300, "batch_size": 64}
DESIGNS = {  # name: (the config whose encoder it is, its settings changed: ViT depth, clip.*)
    "clip": ("tiny-frozen", {}),
    "nuisance": ("tiny-frozen", {**QUICK, "objective": "nuisance"}),
    "deep-decay": ("tiny-frozen", {**QUICK, "objective": "nuisance", "n_layer": 8, "iters": 600,
                                   "weight_decay": 0.3}),
    "patch-invariance": ("tiny-frozen", {**QUICK, "objective": "patch-invariance"}),
    "patch-invariance-strong": ("tiny-frozen", {**QUICK, "objective": "patch-invariance-strong"}),
    "adversarial": ("tiny-frozen", {**QUICK, "objective": "adversarial"}),
    "patch-clip": ("tiny-frozen", {**QUICK, "objective": "patch-clip"}),
    "mean-matching": ("tiny-premise", {}),
}


@dataclass
class PremiseOptions:
    designs: list = field(default_factory=lambda: list(DESIGNS))
    scratch: str = ""              # a tiny run whose end-to-end ViT is probed beside the designs
    out_dir: str = "out/premise"   # the designs' encoders
    doc: str = "docs/premise.md"
    iters: int = 0                 # 0: each design's own; else every design this many steps (a quick look)
    n_probe: int = 400             # val images the probe is fitted on (and 3/4 as many test images)


def design_config(name, iters=0):
    """The TrainConfig whose clip pretraining makes the design's encoder."""
    config_name, changes = DESIGNS[name]
    config = named_config(config_name)
    for key, value in {**changes, **({"iters": iters} if iters else {})}.items():
        setattr(config.model.vit if key == "n_layer" else config.clip, key, value)
    config.check()
    return config


def pretrain(name, path, iters=0):
    """The design's encoder, pretrained into path as train.py pretrains tiny-frozen's, or the one
    there if it was pretrained with the same settings (another is an error that says so)."""
    config = design_config(name, iters)
    if os.path.isdir(path):
        check_encoder(config, path)
    else:
        pretrain_encoder(config, make_data(config), path)
    return ViT.from_pretrained(path).eval(), config


def premise_met(probe, n_layer):
    read = n_layer - 1
    lower = max(probe["color"][:read])
    return probe["color"][read] <= CHANCE["color"] + 0.15 and lower >= 0.90


def table(probe):
    layers = len(next(iter(probe.values())))
    lines = ["| attribute | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
             "|---|" + "---|" * layers]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for name, values in probe.items()]
    return lines


def plot(probes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(probes), figsize=(3.2 * len(probes), 3.2), sharey=True, squeeze=False)
    for ax, (name, (probe, read)) in zip(axes[0], probes.items()):
        for attribute, values in probe.items():
            ax.plot(range(len(values)), values, marker="o", label=attribute)
        if read is not None:
            ax.axvline(read, color="grey", linestyle=":", label="llava reads")
        ax.axhline(CHANCE["color"] + 0.15, color="red", linewidth=0.8, linestyle="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("ViT layer")
    axes[0][0].set_ylabel("probe accuracy (low-res view)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    options = PremiseOptions()
    parse_options(options, argv, __doc__)
    unknown = [name for name in options.designs if name not in DESIGNS]
    if unknown:
        raise ValueError(f"unknown design {unknown[0]!r}: choose from {', '.join(DESIGNS)}")
    started, probes, rows, parts = time.time(), {}, [], []
    n_test = options.n_probe * 3 // 4
    if options.scratch:
        vit = SparseCut.from_pretrained(checkpoint_dir(options.scratch)).vit
        probe = layer_probe(vit, options.n_probe, n_test, view="low")
        probes[f"end to end ({options.scratch})"] = (probe, vit.config.n_layer - 1)
        parts += ["", f"### end to end ({options.scratch})", "", *table(probe)]
    for name in options.designs:
        began = time.time()
        vit, config = pretrain(name, os.path.join(options.out_dir, name), options.iters)
        probe = layer_probe(vit, options.n_probe, n_test, view="low")
        n_layer, read = vit.config.n_layer, vit.config.n_layer - 1
        probes[name] = (probe, read)
        rows.append(f"| {name} | {config.clip.objective} | {n_layer} | {config.clip.iters} x {config.clip.batch_size} | "
                    f"{probe['color'][read]:.3f} | {max(probe['color'][:read]):.3f} | {probe['shape'][read]:.3f} | "
                    f"{'yes' if premise_met(probe, n_layer) else 'no'} | {time.time() - began:.0f} |")
        parts += ["", f"### {name}", "", f"`--config {config.config_name}` encoder with `{DESIGNS[name][1]}`; "
                  f"llava reads layer {read}.", "", *table(probe)]
        print("\n".join([rows[-1], *table(probe)]), flush=True)
    os.makedirs(os.path.dirname(options.doc) or ".", exist_ok=True)
    picture = os.path.splitext(options.doc)[0] + "_probe.png"
    plot(probes, picture)
    seconds = time.time() - started
    head = [
        "# The premise at tiny scale: does a pretrained encoder's top layer discard colour?", "",
        f"Command: `{' '.join(['python -m studies.premise', *map(str, argv)])}`; machine: {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}, {platform.system()}), {torch.get_num_threads()} torch "
        f"thread(s); {time.strftime('%Y-%m-%d')}; wall time {seconds / 60:.1f} min. One pretraining per design "
        "(training/contrastive.py, its seed); the layer probe (studies/probe.py, view=low) on the low-res view's "
        f"patch tokens, fitted on {options.n_probe} val images' objects and scored on {n_test} test images'. "
        f"Target: colour at the layer llava reads <= chance + 0.15 = {CHANCE['color'] + 0.15:.3f}, and >= 0.90 at "
        "some lower layer.", "",
        "| design | objective | ViT layers | steps x batch | colour at llava's layer | best colour below it "
        "| shape at llava's layer | premise met | wall s |", "|---|---|---|---|---|---|---|---|---|", *rows]
    with open(options.doc, "w") as f:
        f.write("\n".join(head + ["", "## Probes, layer by layer"] + parts +
                          ["", f"![probe per layer]({os.path.basename(picture)})", ""]))
    print(f"wrote {options.doc} and {picture} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
