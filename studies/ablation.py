"""The ablation study: every variant x seeds x setting, trained and evaluated, then one table and
the plots (DESIGN.md 6b).

    python -m studies.ablation [--seeds 2] [--recipe_seeds 5] [--setting scratch|frozen|both|premise] [--only NAME ...]
                               [--jobs N] [--device cpu]

Settings: `scratch` is the tiny recipe (`--config tiny`, everything trained end to end); `frozen`
is the paper's setting at tiny scale (`--config tiny-frozen`: one CLIP-style encoder pretrained
once into OUT/frozen/encoder and shared by every run, frozen; stage 1 fusion only, stage 2 with
the LLM); `premise` is the same with `--config tiny-premise`'s encoder, pretrained to drop colour
at the layer llava reads (training/premise.py), and its own variants (llava, llava reading a lower
layer, llava + shortcuts with each pattern, sparsecut), `--premise_seeds` each. Each run is a `python train.py` process writing OUT/SETTING/VARIANT/seedS; a run whose
eval.json exists is not run again and an interrupted one is resumed, so the study picks up where
it stopped (`--report true` trains nothing and tabulates the runs done so far). EE-MLLM-F rows
evaluate the causal llava / sparsecut checkpoints with composite attention switched on
(`eval.py --attention composite`); a variant that builds the same model as one before it (dense
is uniform when every LLM layer gets a shortcut) is not trained twice.

Seeds, chosen so that the default study (both settings, every variant) takes about 90 minutes on
2 CPU cores: from scratch llava and sparsecut (RECIPE) get `--recipe_seeds` (the tiny recipe's
own check, 5), fusion-only and sparsecut (CORE, the study's question) `--seeds` (2) in each
setting, every other variant `--other_seeds` (1). `--jobs` runs go side by side, each on cores /
jobs threads (default on CPU: one per core, up to 4): small matrices keep one core busy but not
two, so on 2 cores two 1-thread runs do about 1.5x the work of one 2-thread run. Writes `--doc`
(docs/ablation.md), its plots beside it (matplotlib, needed only here) and OUT/results.json.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from config import check_device, parse_options, run_cli
from recipes import named_config
from sources.data import make_data
from fusion import FUSIONS
from training.metrics import closed_form_flops
from model import SparseCut

LOWER_LAYER = 1                       # llava-lower's: tiny-premise's encoder still holds colour there (docs/premise.md)
VARIANTS = {  # name: train.py options (beyond --config); the fusion mode and shortcut plan they test
    "llava": ["--fusion", "llava"],
    "llava-hires": ["--fusion", "llava", "--vit.image_size", "96"],
    "concat": ["--fusion", "concat"],
    "deepstack": ["--fusion", "deepstack"],
    "llava+shortcuts": ["--fusion", "llava", "--shortcuts", "uniform"],
    "fusion-only": ["--shortcuts", "none"],
    "sparsecut": [],
    "sparsecut-dense": ["--shortcuts", "dense"],
    "sparsecut-skew_bottom": ["--shortcuts", "skew_bottom"],
    "sparsecut-skew_top": ["--shortcuts", "skew_top"],
    "sparsecut-reverse": ["--shortcuts", "reverse"],
    "sparsecut-cross_attn": ["--fuser", "cross_attn"],
    "llava+composite": ["--fusion", "llava", "--attention", "composite"],
    "sparsecut+composite": ["--attention", "composite"],
    # the premise setting's (tiny-premise: the encoder's layer llava reads has dropped colour)
    "llava-lower": ["--fusion", "llava", "--input_layer", str(LOWER_LAYER)],
    "llava+shortcuts-skew_bottom": ["--fusion", "llava", "--shortcuts", "skew_bottom"],
    "llava+shortcuts-skew_top": ["--fusion", "llava", "--shortcuts", "skew_top"],
    "llava+shortcuts-reverse": ["--fusion", "llava", "--shortcuts", "reverse"],
    "llava+shortcuts-dense": ["--fusion", "llava", "--shortcuts", "dense"],
}
PREMISE_ONLY = ("llava-lower", "llava+shortcuts-skew_bottom", "llava+shortcuts-skew_top", "llava+shortcuts-reverse",
                "llava+shortcuts-dense")
DEFAULT_VARIANTS = {"premise": ("llava", "llava-lower", "llava+shortcuts", *PREMISE_ONLY[1:], "sparsecut")}
TRAINING_FREE = {  # eval-only rows: (the causal variant evaluated, the trained variant with its FLOPs)
    "llava (EE-MLLM-F)": ("llava", "llava+composite"),
    "sparsecut (EE-MLLM-F)": ("sparsecut", "sparsecut+composite")}
RECIPE = ("llava", "sparsecut")        # the tiny recipe's own check: --recipe_seeds from scratch
CORE = ("fusion-only", "sparsecut")    # the study's question (shortcuts vs fusion alone): --seeds
NOT_IN = {"frozen": {"llava-hires": "the frozen encoder was pretrained at 48 px; at 96 px its "
                                    "position embeddings do not apply"}}
SETTINGS = {"scratch": "tiny", "frozen": "tiny-frozen", "premise": "tiny-premise"}
PRETRAINED = ("frozen", "premise")    # settings whose encoder is pretrained once into OUT/SETTING/encoder
METRICS = ("object_f1", "exact_match", "shape_acc", "color_acc", "size_acc", "texture_acc",
           "position_acc", "count_acc", "val_loss")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # train.py, eval.py
CAPTION_TOKENS = 16                   # text tokens per sample for the FLOPs column (a typical caption)


@dataclass
class AblationOptions:
    recipe_seeds: int = 5             # seeds of llava and sparsecut from scratch (the tiny recipe's check)
    premise_seeds: int = 5            # seeds of every variant of the premise setting
    seeds: int = 2                    # seeds of fusion-only, and of CORE in the frozen setting
    other_seeds: int = 1              # seeds of the other variants
    setting: str = "both"             # scratch | frozen | both (the two) | premise
    only: list = field(default_factory=list)   # variant names (default: all)
    max_iters: int = 600              # steps of every run, chosen to fit the study into about 90
                                      # minutes (0: each config's own recipe, tiny's 750)
    device: str = "cpu"
    jobs: int = 0                     # runs side by side (0: one per CPU core up to 4 on cpu, 1 on a GPU)
    out_dir: str = "out/ablation"
    doc: str = "docs/ablation.md"
    probe: bool = True                # the layer probe of the frozen encoder (and a scratch sparsecut's)
    report: bool = False              # train nothing: the table of the runs done so far, the rest listed


class RunFailed(ValueError):
    """A train/eval process of the study failed: one line naming its log (run_cli prints it)."""


def run(command, log_path):
    """One eval process, its output kept in log_path; a failure names the log."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RunFailed(f"{' '.join(command)} failed (exit {done.returncode}); see {log_path}")


@dataclass
class Run:
    """One training run of the study (a train.py process that also evaluates)."""
    setting: str
    variant: str
    seed: int
    dir: str
    steps: int = 0
    process: object = None            # while it runs: its subprocess.Popen, log file, start time
    log: object = None
    started: float = 0.0
    makes_encoder: bool = False

    @property
    def record_path(self):
        return os.path.join(self.dir, "ablation_run.json")

    def record(self):
        """Its metrics and wall time once it has finished (eval.json written), else None."""
        if not (os.path.isfile(os.path.join(self.dir, "eval.json")) and os.path.isfile(self.record_path)):
            return None
        with open(os.path.join(self.dir, "checkpoint", "train_config.json")) as f:
            steps = json.load(f)["max_iters"]
        if steps != self.steps:
            raise ValueError(f"{self.dir} holds a run of {steps} steps, not {self.steps}: give another "
                             f"--out_dir, or --max_iters {steps} to tabulate those runs")
        with open(self.record_path) as f:
            return json.load(f)


def the_run(options, setting, variant, seed):
    """The run of (setting, variant, seed): its directory and its steps (--max_iters, or the config's)."""
    return Run(setting, variant, seed, os.path.join(options.out_dir, setting, variant, f"seed{seed}"),
               steps=options.max_iters or named_config(SETTINGS[setting]).max_iters)


def encoder_dir(options, setting):
    return os.path.join(options.out_dir, setting, "encoder")


def start(options, run, threads):
    """Start run's train.py (resumed if it has a checkpoint) with `threads` CPU threads."""
    os.makedirs(run.dir, exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", SETTINGS[run.setting],
               "--out_dir", run.dir, "--seed", str(run.seed), "--device", options.device, *VARIANTS[run.variant]]
    if run.setting in PRETRAINED:
        command += ["--model.vit_path", encoder_dir(options, run.setting)]
        run.makes_encoder = not os.path.isdir(encoder_dir(options, run.setting))
    command += ["--max_iters", str(run.steps)]
    resumable = os.path.isdir(os.path.join(run.dir, "checkpoint"))
    command += ["--resume", "true"] if resumable else ["--overwrite", "true"]
    run.log = open(os.path.join(run.dir, "train.log"), "a")
    run.log.write(f"\n$ {' '.join(command)}\n")
    run.log.flush()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run.started = time.time()
    run.process = subprocess.Popen(command, stdout=run.log, stderr=subprocess.STDOUT, env=env)


def finish(options, run):
    """Its record once its process has ended: metrics and wall time (of the attempt that finished it,
    less the shared encoder's pretraining if this run made it)."""
    run.log.close()
    if run.process.returncode != 0:
        raise RunFailed(f"{' '.join(run.process.args)} failed (exit {run.process.returncode}); "
                        f"see {os.path.join(run.dir, 'train.log')}")
    wall = time.time() - run.started
    if run.makes_encoder:
        with open(os.path.join(encoder_dir(options, run.setting), "config.json")) as f:
            wall -= json.load(f)["sparsecut_pretraining"]["seconds"]
    with open(os.path.join(run.dir, "eval.json")) as f:
        record = {"metrics": json.load(f), "wall_s": wall, "side_by_side": options.jobs}
    with open(run.record_path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"{run.setting:>7} {run.variant:<22} seed {run.seed}: {wall:.0f} s, "
          f"object_f1 {record['metrics']['object_f1']:.3f}", flush=True)


def train_all(options, runs):
    """Train the runs not done yet, options.jobs processes side by side with cores / jobs threads
    each (small matrices use one core well and two poorly: two 1-thread runs do 1.5x the work of
    one 2-thread run on 2 cores). The first frozen run pretrains the shared encoder alone."""
    pending = [run for run in runs if run.record() is None]
    threads = max(1, (os.cpu_count() or 1) // options.jobs)
    running = []
    try:
        while pending or running:
            for run in list(pending):
                if len(running) >= options.jobs:
                    break
                encoder_busy = (run.setting in PRETRAINED and not os.path.isdir(encoder_dir(options, run.setting))
                                and any(r.setting == run.setting for r in running))
                if not encoder_busy:
                    pending.remove(run)
                    start(options, run, threads)
                    running.append(run)
            time.sleep(1)
            for run in [r for r in running if r.process.poll() is not None]:
                running.remove(run)
                finish(options, run)
    finally:
        for run in running:                       # a failure or Ctrl-C: the others resume next time
            run.process.terminate()
            run.process.wait()


def training_free_run(options, setting, causal_variant, seed):
    """EE-MLLM-F: the causal checkpoint evaluated with composite attention."""
    run_dir = os.path.join(options.out_dir, setting, causal_variant, f"seed{seed}")
    out = os.path.join(run_dir, "eval_test_composite.json")
    if not os.path.isfile(out):
        run([sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", run_dir, "--attention", "composite",
             "--device", options.device], os.path.join(run_dir, "eval_composite.log"))
    with open(out) as f:
        return {"metrics": json.load(f), "wall_s": 0.0}


def flops_of(setting, variant):
    """Closed-form forward FLOPs per sample of the variant's model ({vision, fusion, llm})."""
    config = named_config(SETTINGS[setting])
    parse_options(config, list(VARIANTS[variant]))
    config.model.llm.vocab_size = make_data(config).tokenizer.get_vocab_size()    # the Shapes words
    return closed_form_flops(config.model, CAPTION_TOKENS), config


def same_model(setting, variant, other):
    """Whether two variants build the same model: configs equal once shortcut patterns are resolved."""
    def resolved(name):
        model = flops_of(setting, name)[1].model
        return {**model.to_dict(), "shortcuts": FUSIONS[model.fusion].make_plan(model)}
    return resolved(variant) == resolved(other)


def training_flops(setting, variant, max_iters=0):
    """Training FLOPs of one run: samples x (3 x forward of the trained parts + 1 x frozen ones)."""
    flops, config = flops_of(setting, variant)
    vision_passes = 1 if "vit" in config.freeze else 3
    per_sample = vision_passes * flops["vision"] + 3 * (flops["fusion"] + flops["llm"])
    return per_sample * config.batch_size * (max_iters or config.max_iters)


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows):
    header = ("variant", "seeds", *[m.removesuffix("_acc") for m in METRICS], "LLM GFLOPs/sample",
              "train TFLOPs", "wall s/run")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], str(len(row["records"]))]
        cells += [mean_std([r["metrics"][m] for r in row["records"]]) for m in METRICS]
        cells += [f"{row['llm_flops'] / 1e9:.3f}", f"{row['train_flops'] / 1e12:.1f}",
                  f"{statistics.mean(r['wall_s'] for r in row['records']):.0f}" if row["trained"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(results, probe, doc_dir, stem):
    """The plots beside the document, named after it (docs/ablation.md: ablation_*.png)."""
    import matplotlib                                          # optional: only the study needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    figure, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (setting, rows) in zip(axes[0], results.items()):
        for row in rows:
            if not row["trained"]:
                continue
            scores = [r["metrics"]["object_f1"] for r in row["records"]]
            x = row["train_flops"] / 1e12
            ax.errorbar(x, statistics.mean(scores), yerr=statistics.stdev(scores) if len(scores) > 1 else 0,
                        fmt="o", capsize=3)
            ax.annotate(row["variant"], (x, statistics.mean(scores)), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (TFLOPs, closed form)")
        ax.set_ylabel("test object_f1 (mean ± std over seeds)")
        ax.set_title(f"{setting}: quality against training compute")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    names.append(f"{stem}_quality_vs_flops.png")
    figure.savefig(os.path.join(doc_dir, names[-1]), dpi=110)
    plt.close(figure)
    if results.get("premise"):                    # the discarded attribute, per variant, every seed
        rows = [row for row in results["premise"] if row["trained"]]
        figure, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 4.2))
        for x, row in enumerate(rows):
            scores = [r["metrics"]["color_acc"] for r in row["records"]]
            ax.scatter([x] * len(scores), scores, s=18, alpha=0.7)
            ax.hlines(statistics.mean(scores), x - 0.3, x + 0.3, color="black")
        ax.axhline(1 / 6, color="grey", linestyle=":", label="chance (1/6)")
        ax.set_xticks(range(len(rows)), [row["variant"] for row in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test color_acc (dots: seeds; bar: mean)")
        ax.set_title("premise: colour, dropped by the layer llava reads")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        figure.tight_layout()
        names.append(f"{stem}_premise_colour.png")
        figure.savefig(os.path.join(doc_dir, names[-1]), dpi=110)
        plt.close(figure)
    if probe:
        figure, axes = plt.subplots(1, len(probe), figsize=(6 * len(probe), 4.2), squeeze=False)
        for ax, (name, accuracies) in zip(axes[0], probe.items()):
            for attribute, values in accuracies.items():
                ax.plot(range(len(values)), values, marker="o", label=attribute)
            ax.set_xlabel("ViT layer (0 = embeddings)")
            ax.set_ylabel("linear probe accuracy (test objects)")
            ax.set_title(f"layer probe: {name}")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend()
        figure.tight_layout()
        names.append(f"{stem}_layer_probe.png")
        figure.savefig(os.path.join(doc_dir, names[-1]), dpi=110)
        plt.close(figure)
    return names


def probe_tables(options, settings):
    """The layer probe of the pretrained encoders and of a scratch-trained sparsecut's ViT: of the
    high-res tokens, and for the premise encoder of the low-res view's (the one resolution there)."""
    from studies.probe import layer_probe
    from vit import ViT
    encoders = {}                                 # name: (ViT, view)
    for setting, name, view in (("frozen", "frozen CLIP-style encoder", "high"),
                                ("premise", "premise encoder (tiny-premise), low-res view", "low")):
        if setting in settings and os.path.isdir(encoder_dir(options, setting)):
            encoders[name] = ViT.from_pretrained(encoder_dir(options, setting)), view
    scratch = os.path.join(options.out_dir, "scratch", "sparsecut", "seed1", "checkpoint")
    if "scratch" in settings and os.path.isdir(scratch):
        encoders["ViT trained end to end (scratch sparsecut, seed 1)"] = SparseCut.from_pretrained(scratch).vit, "high"
    return {name: layer_probe(vit, view=view) for name, (vit, view) in encoders.items()}


def main(argv):
    options = AblationOptions()
    parse_options(options, argv, __doc__)
    settings = ["scratch", "frozen"] if options.setting == "both" else [options.setting]
    if any(s not in SETTINGS for s in settings):
        raise ValueError(f"--setting takes scratch, frozen, both or premise, not {options.setting!r}")
    unknown = [name for name in options.only if name not in VARIANTS and name not in TRAINING_FREE]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {', '.join([*VARIANTS, *TRAINING_FREE])}")
    if min(options.seeds, options.other_seeds, options.recipe_seeds, options.premise_seeds) < 1:
        raise ValueError("--seeds, --recipe_seeds, --other_seeds and --premise_seeds must be at least 1")
    check_device(options.device)
    if options.jobs < 0:
        raise ValueError(f"--jobs must be >= 0 (0: one run per CPU core), not {options.jobs}")
    options.jobs = options.jobs or (min(4, os.cpu_count() or 1) if options.device == "cpu" else 1)
    started = time.time()
    plan, skipped = [], []                       # (setting, variant, the causal variant trained, seeds)
    for setting in settings:
        chosen = options.only or DEFAULT_VARIANTS.get(
            setting, [*[v for v in VARIANTS if v not in PREMISE_ONLY], *TRAINING_FREE])
        for variant in chosen:
            if variant in NOT_IN.get(setting, {}):
                skipped.append(f"{variant} ({setting}): {NOT_IN[setting][variant]}")
                continue
            causal = TRAINING_FREE.get(variant, (variant,))[0]
            n_seeds = options.seeds if causal in CORE else options.other_seeds
            if setting == "scratch" and causal in RECIPE:
                n_seeds = options.recipe_seeds
            if setting == "premise":
                n_seeds = options.premise_seeds
            earlier = list(VARIANTS)[:list(VARIANTS).index(variant)] if variant in VARIANTS else []
            twin = next((other for other in earlier if other in chosen and same_model(setting, variant, other)), None)
            if twin:                                   # e.g. dense = uniform when every LLM layer gets one
                skipped.append(f"{variant} ({setting}): the same model as {twin} (its shortcut plan "
                               f"resolves to the same pairs at these depths), so {twin}'s row is its row")
                continue
            plan.append((setting, variant, causal, n_seeds))
    runs = {}
    for setting, _, causal, n_seeds in plan:
        for seed in range(1, n_seeds + 1):
            runs.setdefault((setting, causal, seed), the_run(options, setting, causal, seed))
    if not options.report:                          # the costliest first, so none is left running alone
        train_all(options, sorted(runs.values(), key=lambda r: -training_flops(r.setting, r.variant)))
    results = {setting: [] for setting in settings}
    for setting, variant, causal, n_seeds in plan:
        records = [runs[setting, causal, seed].record() for seed in range(1, n_seeds + 1)]
        records = [training_free_run(options, setting, causal, seed) if variant in TRAINING_FREE
                   else record for seed, record in enumerate(records, 1) if record is not None]
        if len(records) < n_seeds:
            skipped.append(f"{variant} ({setting}): {n_seeds - len(records)} of {n_seeds} seed(s) not run yet")
        if not records:
            continue
        costed = TRAINING_FREE.get(variant, (variant, variant))[1]
        results[setting].append({"variant": variant, "records": records,
                                 "llm_flops": flops_of(setting, costed)[0]["llm"],
                                 "train_flops": training_flops(setting, causal, options.max_iters),
                                 "trained": variant in VARIANTS})
    probe = probe_tables(options, settings) if options.probe else {}
    doc_dir = os.path.dirname(options.doc) or "."
    os.makedirs(doc_dir, exist_ok=True)
    images = plots(results, probe, doc_dir, os.path.splitext(os.path.basename(options.doc))[0])
    os.makedirs(options.out_dir, exist_ok=True)   # --report on a study not started yet
    with open(os.path.join(options.out_dir, "results.json"), "w") as f:
        json.dump({"results": results, "probe": probe}, f, indent=2)
    write_doc(options, argv, results, probe, images, skipped, time.time() - started)
    print(f"wrote {options.doc} ({time.time() - started:.0f} s)")


def write_doc(options, argv, results, probe, images, skipped, seconds):
    cpu = platform.processor() or platform.machine()
    parts = [
        "# Ablation study",
        "",
        f"Written by `{' '.join(['python -m studies.ablation', *map(str, argv)])}` on {os.cpu_count()} CPU cores ({cpu}, "
        f"{platform.system()}), device `{options.device}`, finished {time.strftime('%Y-%m-%d')}; this invocation took {seconds / 60:.0f} min "
        "(runs already done are read back, not repeated). Every figure is the test split "
        "(500 images) of the run's own recipe; mean ± std over seeds 1..N where a row has more than "
        "one seed, else one run. `LLM GFLOPs/sample` is the closed-form forward count of the LLM "
        f"(image tokens + {CAPTION_TOKENS} caption tokens); `train TFLOPs` counts the whole run "
        "(3 x forward for trained parts, 1 x for the frozen encoder). Wall time is per run, training "
        f"and evaluation, with {options.jobs} run(s) side by side on {max(1, (os.cpu_count() or 1) // options.jobs)} "
        "CPU thread(s) each, on a shared machine.",
        "",
        f"Seeds: from scratch {', '.join(RECIPE)} {options.recipe_seeds} (the tiny recipe's check); "
        f"{', '.join(CORE)} {options.seeds} in each setting (shortcuts against fusion alone); every variant "
        f"of the premise setting {options.premise_seeds}; every other variant {options.other_seeds}. Steps: every run "
        f"{options.max_iters or named_config('tiny').max_iters} steps of {named_config('tiny').batch_size} "
        f"(`--max_iters`; the tiny recipe's own: {named_config('tiny').max_iters}).",
    ]
    titles = {"scratch": "From scratch (`--config tiny`: the ViT trains with everything else)",
              "frozen": "Frozen pretrained encoder (`--config tiny-frozen`: CLIP-style encoder, "
                        "stage 1 fusion only, stage 2 with the LLM)",
              "premise": "The premise (`--config tiny-premise`: a frozen encoder whose layer llava reads "
                         "has dropped colour, stage 1 fusion only, stage 2 with the LLM)"}
    for setting, rows in results.items():
        parts += ["", f"## {titles[setting]}", "", table(rows)]
    if skipped:
        parts += ["", "Not run: " + "; ".join(skipped) + "."]
    parts += ["", "## Per seed", "", "Every run of a row with more than one seed (test split).", "",
              "| setting | variant | seed | " + " | ".join(m.removesuffix("_acc") for m in METRICS) + " |",
              "|" + "---|" * (3 + len(METRICS))]
    for setting, rows in results.items():
        for row in rows:
            if len(row["records"]) > 1 and row["trained"]:
                parts += [f"| {setting} | {row['variant']} | {seed} | " +
                          " | ".join(f"{record['metrics'][m]:.3f}" for m in METRICS) + " |"
                          for seed, record in enumerate(row["records"], 1)]
    if probe:
        parts += ["", "## Layer probe", "",
                  "Linear probe of each ViT layer's high-res tokens at the centre of each object "
                  "(probe.py): test accuracy per attribute; chance 0.25 shape, 0.167 colour, 0.5 size, "
                  "0.333 texture."]
        for name, accuracies in probe.items():
            n = len(next(iter(accuracies.values())))
            parts += ["", f"### {name}", "", "| attribute | " + " | ".join(f"layer {i}" for i in range(n)) + " |",
                      "|" + "---|" * (n + 1)]
            parts += [f"| {a} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for a, values in accuracies.items()]
    parts += [""] + [f"![{name}]({name})" for name in images] + [""]
    with open(options.doc, "w") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
