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

import distributed
from data import DataError, caption_tokens, make_data
from llm import LLMConfig
from model import SparseCut, SparseCutConfig
from vit import ViTConfig
from weights import CheckpointError, checkpoint_dir


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
    init_from: str = ""               # start from this checkpoint's weights (paper stage 2)
    fsdp: bool = False                # under torchrun: FSDP2 instead of DDP
    activation_checkpointing: bool = False   # recompute LLM blocks in the backward pass
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


def llava15_7b():
    """The paper's setting at 7B: CLIP ViT-L/14-336 + Vicuna-7B v1.5, shortcuts scaled from the
    released 13B lists to 24 ViT / 32 LLM layers ((1, 3), (4, 7), ..., (22, 31)). These are the
    stage-1 settings (fusion only, lr 1e-3, LCS-558K); stage 2 adds
    `--freeze vit --lr 2e-5 --init_from out/llava15-7b --data data/llava-665k --out_dir out/llava15-7b-s2`.
    Global batch 256 as in LLaVA-1.5 (16 per GPU x 2 accumulation x 8 GPUs), 3% warmup, cosine."""
    return TrainConfig(
        model=SparseCutConfig(vit_path="checkpoints/clip-vit-large-patch14-336",
                              llm_path="checkpoints/vicuna-7b-v1.5"),
        data="data/llava-pretrain", out_dir="out/llava15-7b", device="cuda", batch_size=16,
        grad_accum=2, max_iters=2180, lr=1e-3, warmup_iters=65, weight_decay=0.0,
        freeze="vit,llm", fsdp=True, activation_checkpointing=True, log_interval=10,
        eval_interval=500, checkpoint_interval=500, max_caption_tokens=128)


def smol():
    """SigLIP-B/16 + SmolLM2-135M: one GPU trains it in hours on Flickr8k or COCO captions."""
    return TrainConfig(
        model=SparseCutConfig(vit_path="checkpoints/siglip-base-patch16-224",
                              llm_path="checkpoints/SmolLM2-135M"),
        data="data/flickr8k", out_dir="out/smol", device="cuda", batch_size=64, max_iters=3000,
        lr=2e-4, warmup_iters=100, freeze="vit", log_interval=20, eval_interval=500,
        checkpoint_interval=500, max_caption_tokens=64)


CONFIGS = {"tiny": tiny, "llava15-7b": llava15_7b, "smol": smol}
DOWNLOADS = {  # what the default backbone paths hold, by Hugging Face repository
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "vicuna-7b-v1.5": "lmsys/vicuna-7b-v1.5",
    "siglip-base-patch16-224": "google/siglip-base-patch16-224",
    "SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M",
}


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
    # The fused kernel (CUDA and CPU) makes no full-size temporaries: at 7B width it cut the CPU
    # optimizer step from 5-8 s to under 1 s (the foreach version page-faults on its temporaries).
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))


def autocast_dtype(config, device):
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype takes auto, float32 or bfloat16, not {config.dtype!r}")
    return getattr(torch, config.dtype)


@torch.no_grad()
def split_loss(model, data, images, captions, config, device, dtype, batch=64):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(captions), batch):
        input_ids, labels = caption_tokens(data, captions[i:i + batch], config)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(images[i:i + batch].to(device), input_ids.to(device), labels.to(device))
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def save_checkpoint(model, optimizer, data, config, step, path, context):
    """All ranks gather the full state (a collective under FSDP); rank 0 writes it atomically."""
    model_state, optimizer_state = distributed.full_state(model, optimizer, config.fsdp)

    def write_state(tmp):
        torch.save({"step": step, "optimizer": optimizer_state, "rng": torch.get_rng_state(),
                    "train_config": json.dumps(dataclasses.asdict(config))},
                   os.path.join(tmp, "train_state.pt"))
    if context.main:
        distributed.unwrap(model).save_pretrained(path, tokenizer=data.tokenizer,
                                                  write_extra=write_state, state_dict=model_state)
    context.barrier()


def log_line(step, config, loss, samples_per_s, started, start_step):
    elapsed = time.time() - started
    done = step + 1 - start_step
    left = elapsed / max(done, 1) * (config.max_iters - step - 1)
    return (f"step {step + 1:>5}/{config.max_iters}  loss {loss:.4f}  {samples_per_s:6.1f} samples/s"
            f"  elapsed {elapsed / 60:4.1f} min  left {left / 60:4.1f} min")


def check_backbone_paths(m):
    """Pretrained backbones must be downloaded beforehand: say which, and where to put them."""
    for key in ("vit_path", "llm_path"):
        path = getattr(m, key)
        if path and not os.path.isdir(path):
            source = DOWNLOADS.get(os.path.basename(path.rstrip("/")), "the Hugging Face checkpoint")
            raise CheckpointError(f"--{key} {path} does not exist: download {source} into it "
                                  f"(README, 'Real weights') or pass --{key} DIR")
    if bool(m.vit_path) != bool(m.llm_path):
        raise ValueError("--vit_path and --llm_path go together")


def build_model(config, device, ckpt_path):
    """Resumed, started from another checkpoint (stage 2), from pretrained backbones, or new."""
    m = config.model
    if config.resume:
        if not os.path.isfile(os.path.join(ckpt_path, "train_state.pt")):
            raise CheckpointError(f"--resume: no training checkpoint in {ckpt_path}; "
                                  "run without --resume to start a new run")
        return SparseCut.from_pretrained(ckpt_path, device, config=m)
    if config.init_from:
        return SparseCut.from_pretrained(checkpoint_dir(config.init_from), device, config=m)
    if m.vit_path:
        return SparseCut.from_backbones(m, device)
    return SparseCut(m).to(device)


def train(config):
    check_backbone_paths(config.model)
    context = distributed.setup(config.device)
    device = context.device
    torch.manual_seed(config.seed)
    dtype = autocast_dtype(config, device)
    data = make_data(config)
    if not config.model.llm_path:
        config.model.llm.vocab_size = data.tokenizer.get_vocab_size()
    ckpt_path = os.path.join(config.out_dir, "checkpoint")
    metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
    model = build_model(config, device, ckpt_path).train()
    config.model = model.config                               # with the backbones' configs
    apply_freeze(model, config.freeze)
    model.llm.checkpoint_layers = config.activation_checkpointing
    model = distributed.wrap(model, context, config.fsdp)
    optimizer = make_optimizer(model, config, device)
    start_step = 0
    if config.resume:
        state = torch.load(os.path.join(ckpt_path, "train_state.pt"), weights_only=True)
        start_step = state["step"]
        torch.set_rng_state(state["rng"])
        distributed.load_optimizer(model, optimizer, state["optimizer"], config.fsdp)
    if context.main:
        os.makedirs(config.out_dir, exist_ok=True)
        keep = []
        if config.resume and os.path.exists(metrics_path):      # drop steps the crash lost
            keep = [line for line in open(metrics_path) if json.loads(line)["step"] <= start_step]
        with open(metrics_path, "w") as f:
            f.writelines(keep)
    if config.compile == "on" or (config.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model)
    val_images, val_captions = data.split("val", config.n_val)
    say = print if context.main else (lambda *args, **kwargs: None)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{config.model.fusion} + {config.model.attention}: {n_params / 1e6:.2f}M trainable "
        f"parameters{' (per shard)' if config.fsdp and context.world > 1 else ''}, "
        f"{config.model.n_image_tokens} image tokens, {context.world} x {device}, "
        f"{str(dtype).removeprefix('torch.')}, steps {start_step}..{config.max_iters}", flush=True)
    started, window_start, window_samples = time.time(), time.time(), 0
    for step in range(start_step, config.max_iters):
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = []
        for micro in range(config.grad_accum):
            part = micro * context.world + context.rank       # of the step's global batch
            images, captions = data.batch(step, part, config.grad_accum * context.world)
            micro_batches.append((images, *caption_tokens(data, captions, config)))
        # Weight each micro-batch by its caption tokens, over all ranks: the gradient is then the
        # token mean of the global batch, whatever the number of processes and micro-batches.
        counts = [int((labels[:, 1:] != -100).sum()) for _, _, labels in micro_batches]
        step_tokens = torch.tensor(float(sum(counts)))
        if context.world > 1:
            torch.distributed.all_reduce(step_tokens)
        for (images, input_ids, labels), count in zip(micro_batches, counts):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(images.to(device), input_ids.to(device), labels.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {step + 1}: stopping; the "
                                         f"last good checkpoint is kept in {ckpt_path} (try a lower --lr)")
            scale = count * context.world / float(step_tokens)  # exactly 1.0 for one plain batch
            (loss * scale).backward()
            loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_samples += config.batch_size * config.grad_accum * context.world
        last = step + 1 == config.max_iters
        record = None
        if (step + 1) % config.log_interval == 0 or last:
            rate = window_samples / (time.time() - window_start)
            record = {"step": step + 1, "loss": float(loss), "lr": lr, "samples_per_s": rate,
                      "elapsed_s": time.time() - started}
            say(log_line(step, config, float(loss), rate, started, start_step), flush=True)
            window_start, window_samples = time.time(), 0
        if (step + 1) % config.eval_interval == 0 or last:
            record = record or {"step": step + 1}
            record["val_loss"] = split_loss(model, data, val_images, val_captions, config, device, dtype)
            say(f"step {step + 1:>5}  val_loss {record['val_loss']:.4f}", flush=True)
        if record is not None and context.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if (step + 1) % config.checkpoint_interval == 0 or last:
            save_checkpoint(model, optimizer, data, config, step + 1, ckpt_path, context)
    return model, data, context, dtype


def main(argv):
    config = parse_args(argv)
    model, data, context, dtype = train(config)
    if not context.main:
        context.close()
        return
    from eval import evaluate, print_table
    # One process evaluates an ordinary (unwrapped, unsharded) model.
    if context.world == 1:
        model = distributed.unwrap(model)
    else:
        model = SparseCut.from_pretrained(os.path.join(config.out_dir, "checkpoint"), context.device)
    test_images, test_captions = data.split("test", config.n_test)
    started = time.time()
    metrics = evaluate(model, data.tokenizer, test_images, test_captions,
                       shapes=config.data == "shapes", device=context.device)
    metrics["val_loss"] = split_loss(model, data, *data.split("val", config.n_val), config,
                                     context.device, dtype)
    print_table(metrics, f"test ({len(test_captions)} images, {time.time() - started:.0f} s)")
    with open(os.path.join(config.out_dir, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {config.out_dir}/eval.json; caption an image with: python sample.py --image "
          f"IMAGE --checkpoint {config.out_dir}")
    context.close()


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
