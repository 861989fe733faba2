"""Run configs and the command line, shared by every script.

- `TrainConfig` (the named configs that fill it are in recipes.py).
- One parser for all scripts: `--path value` sets a field of a dataclass tree. A field is named
  by its dotted path (`--model.vit.width 128`) or by any tail of it that names one field only
  (`--vit.width 128`, `--fusion llava`); a name that could mean two fields is an error. Values
  are converted by the field's type: booleans spelled out (`--fsdp true`, or bare `--fsdp`), lists
  take several values, and `object` fields (explicit shortcut lists) take JSON data.
- The saved run config (`train_config.json` in a checkpoint): resume, eval and sample read it.
- `run_cli`: every expected failure ends in one line on stderr and exit status 2.
"""

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from sources.conversation import IMAGE_PLACES, TEMPLATES
from model import SparseCutConfig
from sources.shapes import type_weights
from training.premise import OBJECTIVES
from ckpt.weights import CheckpointError

RUN_CONFIG = "train_config.json"
PARTS = ("vit", "llm", "fusion")         # what --freeze and --reinit name


@dataclass
class ContrastiveConfig:
    """CLIP-style pretraining of the encoder before a run (contrastive.py; tiny-frozen)."""
    iters: int = 0                    # 0: no pretraining (the encoder comes from vit_path or trains end to end)
    batch_size: int = 128
    lr: float = 2e-3
    warmup_iters: int = 50
    embed_dim: int = 64               # the shared image-text embedding
    text_width: int = 64
    text_layers: int = 2
    weight_decay: float = 0.05
    objective: str = "clip"           # or a pressure on the layer llava reads to drop colour (training/premise.py)
    seed: int = 0                     # one encoder for every run that shares vit_path


@dataclass
class TrainConfig:
    model: SparseCutConfig = field(default_factory=SparseCutConfig)
    data: str = "shapes"              # "shapes", or a folder of images with a caption file
    out_dir: str = "out/tiny"
    device: str = "cpu"               # cpu | cuda | mps
    seed: int = 1337
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 750             # the tiny recipe: 750 steps of 32 captions, about 4 min on 2 cores
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    dtype: str = "auto"               # auto (bf16 on CUDA, fp32 on CPU where bf16 is slower) | float32 | bfloat16
    compile: str = "auto"             # auto (on CUDA) | on | off
    freeze: str = ""                  # comma list of vit, fusion, llm (paper stage 1: vit,llm)
    stage1_iters: int = 0             # the first steps also freeze the LLM (paper stage 1 in one run)
    clip: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # pretrain the encoder first
    init_from: str = ""               # start from this checkpoint's weights (paper stage 2)
    reinit: str = ""                  # with init_from: a comma list of vit, llm, fusion that start new (or from
                                      # vit_path / llm_path) instead of from the checkpoint
    init_config: str = ""             # the named config that makes init_from (default out_dir/NAME): trained
                                      # there first when it holds no finished run (tiny-assistant's stages)
    num_workers: int = 0              # data worker processes (decoding, resizing, tokenising)
    fsdp: bool = False                # under torchrun: FSDP2 instead of DDP
    activation_checkpointing: bool = False   # recompute LLM blocks in the backward pass
    log_interval: int = 20
    eval_interval: int = 250
    checkpoint_interval: int = 250
    n_val: int = 256
    n_test: int = 500
    max_caption_tokens: int = 40      # longest answer (caption) + its end; generation stops one short of it
    questions_per_image: int = 3      # Shapes in a chat template: questions in each training conversation
    question_mix: str = "random"      # random: the caption request and the questions in one conversation,
                                      # in random order; split: each conversation the caption alone (a
                                      # caption_share of them) or the questions alone (README: random did better, one run each)
    question_weights: str = ""        # how often each question type is asked in training, TYPE=WEIGHT,...
                                      # (the others 1; "": all alike); the test split asks each type alike
    caption_share: float = 0.5        # split: the share of conversations that are the caption alone
                                      # (0: questions alone, as the second of two stages; README)
    image_place: str = "start"        # <image> moved to the start of its user turn (LLaVA) or its end,
                                      # after the question, which the visual tokens then see (README: no gain yet)
    context_length: int = 256         # longest sequence, image tokens included (longer samples are cut)
    resume: bool = False
    overwrite: bool = False           # a new run may replace the run already in out_dir
    config_name: str = "tiny"         # the named config this run started from

    def check(self):
        """Ranges and choices, checked once after every edit (the model's own, too)."""
        self.model.check()
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0, not {self.num_workers}")
        for name in ("max_iters", "batch_size", "grad_accum", "log_interval", "eval_interval",
                     "checkpoint_interval", "n_test", "n_val"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, not {getattr(self, name)}")
        for name, ok, rule in (("lr", self.lr > 0, "positive"), ("grad_clip", self.grad_clip > 0, "positive"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("warmup_iters", self.warmup_iters >= 0, ">= 0"),
                               ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                               ("caption_share", 0 <= self.caption_share <= 1, "in [0, 1]")):
            if not ok:                                            # (NaN fails every rule)
                raise ValueError(f"--{name} must be {rule}, not {getattr(self, name)}")
        if self.questions_per_image < 0:
            raise ValueError(f"--questions_per_image must be >= 0, not {self.questions_per_image}")
        if self.question_mix not in ("random", "split"):
            raise ValueError(f"--question_mix takes random or split, not {self.question_mix!r}")
        type_weights(self.question_weights)
        if self.image_place not in IMAGE_PLACES:
            raise ValueError(f"--image_place takes {' or '.join(IMAGE_PLACES)}, not {self.image_place!r}")
        for name in ("freeze", "reinit"):
            for part in part_names(getattr(self, name)):
                if part not in PARTS:
                    raise ValueError(f"--{name} takes a comma list of {', '.join(PARTS)}, not {part!r}")
        if self.reinit and not self.init_from:
            raise ValueError("--reinit starts parts of the --init_from checkpoint new: give --init_from")
        if self.model.template not in TEMPLATES:
            raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}, not {self.model.template!r}")
        if self.context_length <= self.model.n_image_tokens + 2:
            raise ValueError(f"--context_length {self.context_length} leaves no room for text beside the "
                             f"{self.model.n_image_tokens} image tokens")
        if self.max_caption_tokens < 2:
            raise ValueError(f"--max_caption_tokens must be at least 2 (BOS and EOS), not {self.max_caption_tokens}")
        for name, allowed in (("dtype", ("auto", "float32", "bfloat16")), ("compile", ("auto", "on", "off"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} takes {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.clip.objective not in OBJECTIVES:
            raise ValueError(f"--clip.objective takes {', '.join(OBJECTIVES)}, not {self.clip.objective!r}")
        if self.clip.objective != "clip" and self.data != "shapes":
            raise ValueError(f"--clip.objective {self.clip.objective} recolours Shapes scenes: use --data shapes")
        check_device(self.device)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        d["model"] = SparseCutConfig.from_dict(d.get("model", {}))
        d["clip"] = ContrastiveConfig(**d.get("clip", {}))
        return cls(**d)


def part_names(comma_list):
    """"vit, fusion" -> ["vit", "fusion"]."""
    return [part.strip() for part in comma_list.split(",") if part.strip()]


def cosine_schedule(step, peak, warmup, total, min_ratio=0.0):
    """Linear warmup to peak, then cosine decay to min_ratio * peak at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = min_ratio * peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, config, device):
    """AdamW; weight decay on matrices only (not on biases, norms, gates, class/pos vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("--freeze left nothing to train")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel (CUDA and CPU) makes no full-size temporaries: at 7B width it cut the CPU
    # optimizer step from 5-8 s to under 1 s (the foreach version page-faults on its temporaries).
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))


def check_device(name):
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device takes cpu, cuda or mps, not {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")


# --- the one parser ----------------------------------------------------------------------------

def field_paths(config, prefix=""):
    """{dotted path: field type} for every leaf field of a dataclass tree."""
    paths = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            paths.update(field_paths(value, f"{prefix}{f.name}."))
        else:
            paths[prefix + f.name] = f.type if isinstance(f.type, type) else type(value)
    return paths


def resolve(name, paths):
    """A command-line name -> the one field path it names (the path itself, or a tail of it)."""
    if name in paths:                                 # a full path is never ambiguous: --lr, --clip.lr
        return name
    matches = [path for path in paths if path == name or path.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"--{name} could mean {' or '.join('--' + m for m in matches)}: "
                         "give the full path")
    close = difflib.get_close_matches(name, list(paths) + [p.rpartition(".")[2] for p in paths], n=3)
    hint = f" (did you mean {', '.join('--' + c for c in dict.fromkeys(close))}?)" if close else ""
    raise ValueError(f"unknown option --{name}{hint}; --help lists the options")


def convert(value, kind, name):
    """A command-line string to the field's type."""
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} takes true or false, not {value!r}")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"--{name} takes a{'n integer' if kind is int else ' number'}, "
                             f"not {value!r}") from None
    if kind is tuple:
        return tuple(convert(v, float, name) for v in value.split(","))
    if kind is object and value.startswith(("[", "(")):                     # data, e.g. a shortcut list
        try:
            return json.loads(value.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            raise ValueError(f"--{name} takes a name or a JSON list such as [[1, 2], [3, 4]], "
                             f"not {value!r}") from None
    return value


BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def parse_options(config, argv, usage=""):
    """Apply `--name value` options to the dataclass tree `config` in place.
    Returns {path: value} of the options given, in order."""
    paths = field_paths(config)
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage.strip() + "\n\noptions (a tail of a path is enough when it names one field):")
            for path, kind in paths.items():
                print(f"  --{path} {kind.__name__.upper()}  (now {lookup(config, path)!r})")
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --name value")
        name, has_value, value = arg[2:].partition("=")
        path = resolve(name, paths)
        kind = paths[path]
        values = [value] if has_value else []
        while not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--") \
                and (kind is list or not values) \
                and (kind is not bool or argv[i + 1].lower() in BOOL_WORDS):
            values.append(argv[i + 1])
            i += 1
        if kind is bool and not has_value and not values:
            values = ["true"]                                    # a bare flag: --resume
        if not values:
            raise ValueError(f"--{name} needs a value")
        given[path] = values if kind is list else convert(values[0], kind, name)
        assign(config, path, given[path])
        i += 1
    return given


def lookup(config, path):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def assign(config, path, value):
    owner, _, leaf = path.rpartition(".")
    setattr(lookup(config, owner) if owner else config, leaf, value)


# --- the saved run config ----------------------------------------------------------------------

def save_run_config(config, directory):
    with open(os.path.join(directory, RUN_CONFIG), "w") as f:
        json.dump(config.to_dict(), f, indent=2)


def load_run_config(checkpoint):
    """The TrainConfig a checkpoint was trained with: train_config.json, or (checkpoints written
    before it existed) the copy inside train_state.pt."""
    path = os.path.join(checkpoint, RUN_CONFIG)
    state_path = os.path.join(checkpoint, "train_state.pt")
    try:
        if os.path.isfile(path):
            with open(path) as f:
                raw = json.load(f)
        elif os.path.isfile(state_path):
            raw = json.loads(torch.load(state_path, weights_only=True)["train_config"])
        else:
            raise CheckpointError(f"{checkpoint} has no {RUN_CONFIG}: it was not written by "
                                  "train.py, so there is no training config to read")
        return TrainConfig.from_dict(raw)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable training config ({error})") from None


# --- the error path ----------------------------------------------------------------------------

def check_writable(path):
    """Fail now, not after the work, when an output file cannot be written."""
    existed = os.path.exists(path)
    try:
        open(path, "a").close()
    except OSError as error:
        raise OSError(f"cannot write {path} ({error.strerror}): choose another path") from None
    if not existed:
        os.remove(path)


def run_cli(main_function, argv):
    """Bad input ends in one line on stderr and exit status 2, never a traceback."""
    from sources.formats import DataError
    try:
        main_function(argv)
    except (ValueError, DataError, CheckpointError, FloatingPointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        sys.exit(130)
