"""Train SparseCut (or a baseline) on Shapes or a folder of captioned images.

    python train.py --config tiny [--out_dir DIR] [--fusion llava] [--max_iters N] [--resume]

Any field of TrainConfig, of SparseCutConfig (`--fusion`, `--attention`, ...) or of the nested
ViT/LLM configs (`--vit.width 128`, `--llm.n_layer 6`) can be set on the command line. Writes into
out_dir: checkpoint/ (model, tokenizer and training state, replaced atomically), metrics.jsonl
(one JSON object per logged step) and eval.json (the final metrics).
"""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from data import (DataError, batch_captions, build_tokenizer, encode, load_image,
                  read_caption_pairs, shapes_split, shapes_vocabulary, to_tensor,
                  tokenizer_for_captions)
from llm import LLMConfig
from model import SparseCut, SparseCutConfig
from vit import ViTConfig
from weights import CheckpointError, checkpoint_dir, load_weights


@dataclass
class TrainConfig:
    model: SparseCutConfig = field(default_factory=SparseCutConfig)
    data: str = "shapes"              # "shapes", or a folder of images with a caption file
    out_dir: str = "out/tiny"
    device: str = "cpu"               # cpu | cuda | mps
    seed: int = 1337
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 900
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    dtype: str = "auto"               # auto (bf16 on CUDA, fp32 on CPU where bf16 is slower) | float32 | bfloat16
    compile: str = "auto"             # auto (on CUDA) | on | off
    freeze: str = ""                  # comma list of vit, fusion, llm (paper stage 1: vit,llm)
    log_interval: int = 20
    eval_interval: int = 300
    checkpoint_interval: int = 300
    n_val: int = 256
    n_test: int = 500
    max_caption_tokens: int = 40
    resume: bool = False


def tiny():
    """The embedded default: a CPU captioner on Shapes in minutes."""
    return TrainConfig(model=SparseCutConfig(
        vit=ViTConfig(image_size=48, patch_size=8, width=96, n_layer=4, n_head=4, mlp_dim=384),
        llm=LLMConfig(width=128, n_layer=4, n_head=4, n_kv_head=2, mlp_dim=384)))


CONFIGS = {"tiny": tiny}


# --- command line ------------------------------------------------------------------------------

def convert(value, kind, name):
    """A command-line string to the field's type; booleans spelled out, never bool('False')."""
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
        return tuple(float(v) for v in value.split(","))
    if name.endswith("shortcuts") and value and value[0] in "[(":
        return json.loads(value.replace("(", "[").replace(")", "]"))
    return value


def settable_fields(config, prefix=""):
    """{'--name' path: (object, field name, type)} for every leaf field, nested ones dotted."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            nested_prefix = "" if f.name == "model" else f"{prefix}{f.name}."
            out.update(settable_fields(value, nested_prefix))
        else:
            kind = f.type if isinstance(f.type, type) else type(value)
            out[f"{prefix}{f.name}"] = (config, f.name, kind)
    return out


def parse_args(argv):
    """--config NAME first, then overrides --field value (or --field=value; bare --resume)."""
    args, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --name value")
        name, _, value = arg[2:].partition("=")
        if not value and name != "resume":
            if i + 1 >= len(argv):
                raise ValueError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 1
        args.append((name, value or "true"))
        i += 1
    config_name = dict(args).get("config", "tiny")
    if config_name not in CONFIGS:
        raise ValueError(f"unknown --config {config_name!r}: choose one of {', '.join(CONFIGS)}")
    config = CONFIGS[config_name]()
    fields = settable_fields(config)
    for name, value in args:
        if name == "config":
            continue
        if name not in fields:
            import difflib
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown option --{name}{hint}; see the fields of TrainConfig in train.py")
        owner, attr, kind = fields[name]
        setattr(owner, attr, convert(value, kind, name))
    config.model.__post_init__()                              # re-check the choices
    for name in ("max_iters", "batch_size", "grad_accum", "log_interval", "eval_interval",
                 "checkpoint_interval", "n_test", "n_val"):
        if getattr(config, name) <= 0:
            raise ValueError(f"--{name} must be positive, not {getattr(config, name)}")
    if config.lr <= 0:
        raise ValueError(f"--lr must be positive, not {config.lr}")
    return config


# --- data --------------------------------------------------------------------------------------

class ShapesData:
    """Fresh Shapes images every step, deterministic in (seed, step): resuming at a step
    resumes the data exactly, and no image repeats."""

    def __init__(self, config):
        self.config = config
        self.tokenizer = build_tokenizer(shapes_vocabulary())

    def batch(self, step):
        images, captions = shapes_split("train", self.config.batch_size,
                                        seed=self.config.seed * 1_000_003 + step)
        return to_tensor(images), captions

    def split(self, name, n):
        images, captions = shapes_split(name, n)
        return to_tensor(images), captions


class FolderData:
    """A folder of captioned images: 90/5/5 train/val/test split, shuffled each epoch by seed."""

    def __init__(self, config):
        self.config = config
        pairs = read_caption_pairs(config.data)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed))
        pairs = [pairs[i] for i in order]
        n_held = max(1, len(pairs) // 20)
        self.splits = {"test": pairs[:n_held], "val": pairs[n_held:2 * n_held],
                       "train": pairs[2 * n_held:] or pairs}
        self.tokenizer = tokenizer_for_captions([c for _, c in self.splits["train"]])
        self.size = 2 * config.model.vit.image_size

    def load(self, pairs):
        return torch.stack([load_image(p, self.size) for p, _ in pairs]), [c for _, c in pairs]

    def batch(self, step):
        train, bs = self.splits["train"], self.config.batch_size
        start = step * bs
        epoch, offset = divmod(start, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        picks = [train[order[(offset + k) % len(train)]] for k in range(bs)]
        return self.load(picks)

    def split(self, name, n):
        return self.load(self.splits[name][:n])


def make_data(config):
    return ShapesData(config) if config.data == "shapes" else FolderData(config)


# --- training ----------------------------------------------------------------------------------

def learning_rate(config, step):
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < config.warmup_iters:
        return config.lr * (step + 1) / config.warmup_iters
    progress = (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    floor = config.min_lr_ratio * config.lr
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def apply_freeze(model, freeze):
    parts = {"vit": [model.vit], "llm": [model.llm], "fusion": [model.fusers, model.gates]}
    for name in filter(None, (s.strip() for s in freeze.split(","))):
        if name not in parts:
            raise ValueError(f"--freeze takes a comma list of {', '.join(parts)}, not {name!r}")
        for module in parts[name]:
            if module is not None:
                module.requires_grad_(False)


def make_optimizer(model, config, device):
    """AdamW; weight decay on matrices only (not on biases, norms, gates, class/pos vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("--freeze left nothing to train")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def autocast_dtype(config, device):
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype takes auto, float32 or bfloat16, not {config.dtype!r}")
    return getattr(torch, config.dtype)


def tokens_for(data, captions, config):
    return batch_captions([encode(data.tokenizer, c) for c in captions], config.max_caption_tokens)


@torch.no_grad()
def split_loss(model, data, images, captions, config, device, dtype, batch=64):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(captions), batch):
        input_ids, labels = tokens_for(data, captions[i:i + batch], config)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(images[i:i + batch].to(device), input_ids.to(device), labels.to(device))
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def save_checkpoint(model, optimizer, data, config, step, path):
    def write_state(tmp):
        torch.save({"step": step, "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(), "train_config": json.dumps(dataclasses.asdict(config))},
                   os.path.join(tmp, "train_state.pt"))
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    raw.save_pretrained(path, tokenizer=data.tokenizer, write_extra=write_state)


def log_line(step, config, loss, samples_per_s, started, start_step):
    elapsed = time.time() - started
    done = step + 1 - start_step
    left = elapsed / max(done, 1) * (config.max_iters - step - 1)
    return (f"step {step + 1:>5}/{config.max_iters}  loss {loss:.4f}  {samples_per_s:6.1f} samples/s"
            f"  elapsed {elapsed / 60:4.1f} min  left {left / 60:4.1f} min")


def train(config):
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    dtype = autocast_dtype(config, device)
    data = make_data(config)
    config.model.llm.vocab_size = data.tokenizer.get_vocab_size()
    ckpt_path = os.path.join(config.out_dir, "checkpoint")
    metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
    start_step = 0
    if config.resume:
        if not os.path.isfile(os.path.join(ckpt_path, "train_state.pt")):
            raise CheckpointError(f"--resume: no training checkpoint in {ckpt_path}; "
                                  "run without --resume to start a new run")
        model = load_weights(SparseCut, config.model, ckpt_path, device=device).train()
        state = torch.load(os.path.join(ckpt_path, "train_state.pt"), weights_only=True)
        start_step = state["step"]
        torch.set_rng_state(state["rng"])
    else:
        model = SparseCut(config.model).to(device)
        os.makedirs(config.out_dir, exist_ok=True)
        open(metrics_path, "w").close()
    apply_freeze(model, config.freeze)
    optimizer = make_optimizer(model, config, device)
    if config.resume:
        optimizer.load_state_dict(state["optimizer"])
        keep = [line for line in open(metrics_path) if json.loads(line)["step"] <= start_step]
        with open(metrics_path, "w") as f:                     # drop steps the crash lost
            f.writelines(keep)
    if config.compile == "on" or (config.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model)
    val_images, val_captions = data.split("val", config.n_val)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{config.model.fusion} + {config.model.attention}: {n_params / 1e6:.2f}M trainable "
          f"parameters, {config.model.n_image_tokens} image tokens, device {device}, "
          f"{str(dtype).removeprefix('torch.')}, steps {start_step}..{config.max_iters}", flush=True)
    model.train()
    started, window_start, window_samples = time.time(), time.time(), 0
    for step in range(start_step, config.max_iters):
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(config.grad_accum):
            images, captions = data.batch(step * config.grad_accum + micro)
            input_ids, labels = tokens_for(data, captions, config)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(images.to(device), input_ids.to(device), labels.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {step + 1}: stopping; the "
                                         f"last good checkpoint is kept in {ckpt_path} (try a lower --lr)")
            (loss / config.grad_accum).backward()
            loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_samples += config.batch_size * config.grad_accum
        last = step + 1 == config.max_iters
        record = None
        if (step + 1) % config.log_interval == 0 or last:
            rate = window_samples / (time.time() - window_start)
            record = {"step": step + 1, "loss": float(loss), "lr": lr, "samples_per_s": rate,
                      "elapsed_s": time.time() - started}
            print(log_line(step, config, float(loss), rate, started, start_step), flush=True)
            window_start, window_samples = time.time(), 0
        if (step + 1) % config.eval_interval == 0 or last:
            record = record or {"step": step + 1}
            record["val_loss"] = split_loss(model, data, val_images, val_captions, config, device, dtype)
            print(f"step {step + 1:>5}  val_loss {record['val_loss']:.4f}", flush=True)
        if record is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if (step + 1) % config.checkpoint_interval == 0 or last:
            save_checkpoint(model, optimizer, data, config, step + 1, ckpt_path)
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    return raw, data, device, dtype


def main(argv):
    config = parse_args(argv)
    model, data, device, dtype = train(config)
    from eval import evaluate, print_table
    test_images, test_captions = data.split("test", config.n_test)
    started = time.time()
    metrics = evaluate(model, data.tokenizer, test_images, test_captions,
                       shapes=config.data == "shapes", device=device)
    metrics["val_loss"] = split_loss(model, data, *data.split("val", config.n_val), config, device, dtype)
    print_table(metrics, f"test ({len(test_captions)} images, {time.time() - started:.0f} s)")
    with open(os.path.join(config.out_dir, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {config.out_dir}/eval.json; caption an image with: python sample.py --image "
          f"IMAGE --checkpoint {config.out_dir}")


def run_cli(main_function, argv):
    """Bad input ends in one line on stderr and exit status 2, never a traceback."""
    try:
        main_function(argv)
    except (ValueError, DataError, CheckpointError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
