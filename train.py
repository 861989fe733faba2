"""Train SparseCut (or a baseline) on Shapes, a folder of captioned images, or conversations.

    python train.py --config tiny [--out_dir DIR] [--fusion llava] [--max_iters N] [--resume]

Any field of TrainConfig (config.py), of SparseCutConfig (`--fusion`, `--attention`, ...) or of
the nested ViT/LLM configs (`--vit.width 128`, `--llm.n_layer 6`) can be set on the command line.
`--resume` continues the run in out_dir from its saved config; options given with it may change
the schedule and logging, not the model. Writes into out_dir: checkpoint/ (model, tokenizer, run
config and training state, replaced atomically), metrics.jsonl (one JSON object per logged step)
and eval.json (the final metrics).
"""

import json
import os
import sys
import time

import torch

from training import distributed
from config import (assign, cosine_schedule, load_run_config, lookup, make_optimizer, parse_options, part_names,
                    run_cli, save_run_config)
from training.contrastive import check_encoder, pretrain_encoder
from sources.data import load_tokenizer, make_data, step_batches, worker_failures
from training.metrics import evaluate, evaluate_run, print_table, split_loss
from model import SparseCut
from recipes import CONFIGS, named_config
from ckpt.weights import CheckpointError, checkpoint_dir, fill_weights, read_config, recover

DOWNLOADS = {  # what the default backbone paths hold, by Hugging Face repository
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "vicuna-7b-v1.5": "lmsys/vicuna-7b-v1.5",
    "siglip-base-patch16-224": "google/siglip-base-patch16-224",
    "SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M",
}
VAL_CAPTIONS = 64                      # val images captioned at each eval_interval (Shapes)
VAL_LOGGED = ("object_f1", "shape_acc", "color_acc", "size_acc", "texture_acc", "position_acc", "vqa_acc")


def parse_args(argv):
    return parse_run(argv)[0]


def parse_run(argv):
    """--config NAME (default tiny), then field overrides: (config, {field path: value given})."""
    argv = list(argv)
    name = None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError(f"--config needs a value: one of {', '.join(CONFIGS)}")
        name = argv.pop(at + 1)
        argv.pop(at)
    config = named_config(name or "tiny")
    given = parse_options(config, argv, __doc__)
    return settle(config, given, name), given


def settle(config, given, name):
    """The run's config once its options are in. With --resume it is the run's saved config, and
    an override of a model field that differs from it is an error."""
    check_out_dir(config)
    if config.resume:
        config = resumed_config(config, given, name)
    elif config.init_config:
        if config.init_config not in CONFIGS:
            raise ValueError(f"--init_config names the config that makes --init_from: one of "
                             f"{', '.join(CONFIGS)}, not {config.init_config!r}")
        config.init_from = config.init_from or os.path.join(config.out_dir, config.init_config)
    config.check()
    return config


def resumed_config(config, given, name):
    """The saved config of the run in config.out_dir with the given train options applied."""
    saved = load_run_config(os.path.join(config.out_dir, "checkpoint"))
    saved.out_dir = config.out_dir                      # where the run is now
    if name is not None and name != saved.config_name:
        raise ValueError(f"--resume: the run in {config.out_dir} was started with --config "
                         f"{saved.config_name}, not {name}")
    for field_path, value in given.items():
        if field_path.startswith("model.") and value != lookup(saved, field_path):
            raise ValueError(f"--resume: --{field_path} {value} would change the model of the run "
                             f"in {config.out_dir} (saved: {lookup(saved, field_path)}); start a "
                             "new run with another --out_dir to change it")
        assign(saved, field_path, value)
    return saved


# --- training ----------------------------------------------------------------------------------

def learning_rate(config, step):
    return cosine_schedule(step, config.lr, config.warmup_iters, config.max_iters, config.min_lr_ratio)


def apply_freeze(model, freeze):
    for name in part_names(freeze):                       # names checked by TrainConfig.check
        getattr(model, name).requires_grad_(False)


def autocast_dtype(config, device):
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def save_checkpoint(model, optimizer, data, config, step, path, context):
    """All ranks gather the full state (a collective under FSDP); rank 0 writes it atomically."""
    model_state, optimizer_state = distributed.full_state(model, optimizer, config.fsdp)

    def write_state(tmp):
        torch.save({"step": step, "optimizer": optimizer_state, "rng": torch.get_rng_state()},
                   os.path.join(tmp, "train_state.pt"))
        save_run_config(config, tmp)
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


def check_backbone_paths(m, clip_iters=0):
    """Pretrained backbones must be downloaded beforehand (or, for the encoder with clip.iters,
    pretrained here): say which, and where to put them."""
    for key in ("vit_path", "llm_path"):
        path = getattr(m, key)
        pretrained_here = key == "vit_path" and clip_iters > 0      # tiny-frozen makes its own
        if path and not os.path.isdir(path) and not pretrained_here:
            source = DOWNLOADS.get(os.path.basename(path.rstrip("/")), "the Hugging Face checkpoint")
            raise CheckpointError(f"--{key} {path} does not exist: download {source} into it "
                                  f"(README, 'Real weights') or pass --{key} DIR")
    if m.llm_path and not m.vit_path:
        raise ValueError("--llm_path needs --vit_path: a pretrained LLM starts with a pretrained encoder")
    if clip_iters > 0 and not m.vit_path:
        raise ValueError("--clip.iters pretrains an encoder into --vit_path: give one")


def build_model(config, device, ckpt_path):
    """Resumed, started from another checkpoint (stage 2), from pretrained backbones, or new."""
    m = config.model
    if config.resume:
        return SparseCut.from_pretrained(ckpt_path, device, config=m)
    if config.init_from and config.reinit:      # the parts named new, the others from the checkpoint
        path, new = checkpoint_dir(config.init_from), tuple(part + "." for part in part_names(config.reinit))
        if read_config(path).get("model_type") == "llava":
            raise ValueError(f"--reinit takes parts of a checkpoint written by train.py; {path} is a "
                             "LLaVA directory (--init_from it alone keeps its encoder and LLM, the fusion new)")
        model = SparseCut.from_backbones(m, device) if m.vit_path else SparseCut(m).to(device)
        elsewhere = (("vit.",) if m.vit_path else ()) + (("llm.",) if m.llm_path else ())  # backbones
        return fill_weights(model, path, lambda name: None if name.startswith(new) else name,
                            device=device, optional_prefixes=new + elsewhere + ("input_map.",))
    if config.init_from:
        return SparseCut.from_pretrained(checkpoint_dir(config.init_from), device, config=m)
    if m.vit_path:
        return SparseCut.from_backbones(m, device)
    return SparseCut(m).to(device)


def check_out_dir(config):
    """A new run never replaces another: an out_dir that holds a checkpoint needs --resume or
    --overwrite. A checkpoint whose last swap a crash interrupted is recovered first."""
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise ValueError(f"--out_dir {config.out_dir} is a file, not a directory")
    path = os.path.join(config.out_dir, "checkpoint")
    recover(path)
    if config.resume and not os.path.isfile(os.path.join(path, "train_state.pt")):
        later = " (a staged config's earlier stages then continue where they stopped)" if config.init_config else ""
        raise CheckpointError(f"--resume: no training checkpoint in {path}; "
                              f"run without --resume to start a new run{later}")
    if not config.resume and os.path.exists(path) and not config.overwrite:
        raise ValueError(f"{config.out_dir} already holds a run (checkpoint/): continue it with "
                         "--resume, choose another --out_dir, or replace it with --overwrite true")


def load_train_state(path):
    """Optimizer state, step and RNG (torch.load of tensors and plain containers only)."""
    try:
        state = torch.load(path, weights_only=True)
        return {key: state[key] for key in ("step", "optimizer", "rng")}
    except Exception as error:                # truncated or foreign: torch raises several kinds
        raise CheckpointError(f"{path} is not a readable training state ({error.__class__.__name__}: "
                              f"{str(error).splitlines()[0][:200]}); resume from an intact checkpoint "
                              "or start a new run") from None


def run_tokenizer(config, ckpt_path):
    """The run's own when resuming; that of the checkpoint it starts from (a stage-1 run, a
    LLaVA-1.5 directory) when it has one and its LLM is kept; else None (make_data builds or
    loads one)."""
    if config.resume:
        return load_tokenizer(ckpt_path)
    kept_llm = config.init_from and "llm" not in part_names(config.reinit)
    if kept_llm and os.path.isfile(os.path.join(checkpoint_dir(config.init_from), "tokenizer.json")):
        return load_tokenizer(checkpoint_dir(config.init_from))
    return None


def start_log(metrics_path, resume, start_step):
    """Resuming: keep the records up to the checkpoint's step (later ones the crash lost). A new
    run: an earlier log is kept as metrics.jsonl.N, never truncated."""
    os.makedirs(os.path.dirname(metrics_path) or ".", exist_ok=True)
    if not os.path.exists(metrics_path):
        return
    if resume:
        with open(metrics_path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(metrics_path + ".tmp", metrics_path)
        return
    n = 1
    while os.path.exists(f"{metrics_path}.{n}"):
        n += 1
    os.rename(metrics_path, f"{metrics_path}.{n}")


def train(config):
    check_backbone_paths(config.model, config.clip.iters)
    context = distributed.setup(config.device)
    device = context.device
    torch.manual_seed(config.seed)
    dtype = autocast_dtype(config, device)
    ckpt_path = os.path.join(config.out_dir, "checkpoint")
    data = make_data(config, run_tokenizer(config, ckpt_path))
    if not config.model.llm_path:
        config.model.llm.vocab_size = data.tokenizer.get_vocab_size()
    if config.clip.iters > 0 and not os.path.isdir(config.model.vit_path):
        if context.main:                        # the encoder once; every run sharing vit_path reuses it
            pretrain_encoder(config, data, config.model.vit_path)
        if context.world > 1:
            torch.distributed.barrier()
    elif config.clip.iters > 0:
        check_encoder(config, config.model.vit_path)
    metrics_path = os.path.join(config.out_dir, "metrics.jsonl")
    model = build_model(config, device, ckpt_path).train()
    config.model = model.config                               # with the backbones' configs
    apply_freeze(model, config.freeze)
    model.llm.checkpoint_layers = config.activation_checkpointing
    if config.stage1_iters and context.world > 1:
        raise ValueError("--stage1_iters switches the LLM on mid-run, which DDP/FSDP cannot follow; "
                         "under torchrun run stage 1 with --freeze vit,llm and stage 2 with --init_from")
    model = distributed.wrap(model, context, config.fsdp)
    optimizer = make_optimizer(model, config, device)
    start_step = 0
    if config.resume:
        state = load_train_state(os.path.join(ckpt_path, "train_state.pt"))
        start_step = state["step"]
        torch.set_rng_state(state["rng"])
        distributed.load_optimizer(model, optimizer, state["optimizer"], config.fsdp)
    stage1 = start_step < config.stage1_iters and "llm" not in config.freeze
    if stage1:                      # paper stage 1: the fusion alone learns to talk to the LLM
        model.llm.requires_grad_(False)
    if context.main:
        start_log(metrics_path, config.resume, start_step)
    if config.compile == "on" or (config.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model)
    val_images, val_samples = data.split("val", config.n_val)
    say = print if context.main else (lambda *args, **kwargs: None)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{config.model.fusion} + {config.model.attention}: {n_params / 1e6:.2f}M trainable "
        f"parameters{' (per shard)' if config.fsdp and context.world > 1 else ''}, "
        f"{config.model.n_image_tokens} image tokens, {context.world} x {device}, "
        f"{str(dtype).removeprefix('torch.')}, steps {start_step}..{config.max_iters}", flush=True)
    started, window_start, window_samples = time.time(), time.time(), 0
    pin = device.type == "cuda"
    for step, micro_batches in step_batches(data, config, start_step, context.rank, context.world, pin):
        if stage1 and step == config.stage1_iters:                 # paper stage 2: the LLM too
            model.llm.requires_grad_(True)
            stage1 = False
            say(f"step {step:>5}  stage 2: training the LLM with the fusion", flush=True)
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Weight each micro-batch by its caption tokens, over all ranks: the gradient is then the
        # token mean of the global batch, whatever the number of processes and micro-batches.
        counts = [int((labels[:, 1:] != -100).sum()) for _, _, labels in micro_batches]
        step_tokens = torch.tensor(float(sum(counts)))
        if context.world > 1:
            torch.distributed.all_reduce(step_tokens)
        for (images, input_ids, labels), count in zip(micro_batches, counts):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(images.to(device, non_blocking=pin), input_ids.to(device), labels.to(device))
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
            record["val_loss"] = split_loss(model, data, val_images, val_samples, config, device, dtype)
            line = f"step {step + 1:>5}  val_loss {record['val_loss']:.4f}"
            if config.data == "shapes":        # what is learned when: per-attribute accuracy
                n = min(len(val_samples), VAL_CAPTIONS)
                scores = evaluate(distributed.unwrap(model), data.tokenizer, val_images[:n],
                                  val_samples[:n], config, device=device)
                record.update({f"val_{k}": v for k, v in scores.items() if k in VAL_LOGGED})
                line += "  " + "  ".join(f"{k.removesuffix('_acc')} {scores[k]:.2f}" for k in VAL_LOGGED
                                         if k in scores)
                model.train()
            say(line, flush=True)
        if record is not None and context.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if (step + 1) % config.checkpoint_interval == 0 or last:
            save_checkpoint(model, optimizer, data, config, step + 1, ckpt_path, context)
    return model, data, context, dtype


def train_earlier_stage(config, given):
    """A staged config (tiny-assistant): when init_from holds no model, train it first with
    init_config (its own earlier stage before it); resume it where a kill stopped it. Every stage
    takes this run's seed and device and the model options given on the command line; a finished
    stage of another seed in out_dir is refused (not reused by mistake)."""
    if not config.init_config or config.resume:    # (a resumed run's earlier stages are done)
        return
    options = {"seed": config.seed, "device": config.device, "out_dir": config.init_from,
               **{path: value for path, value in given.items() if path.startswith("model.")}}
    found = checkpoint_dir(config.init_from)
    state_path = os.path.join(found, "train_state.pt")
    if os.path.isfile(os.path.join(found, "config.json")) and not os.path.isfile(state_path):
        return                                      # a model without a training state: used as it is
    if os.path.isfile(state_path):
        saved = load_run_config(found)
        if saved.seed != config.seed and "init_from" not in given:      # not one named on purpose
            raise ValueError(f"{config.init_from} holds a {saved.config_name} run of --seed {saved.seed}, "
                             f"not {config.seed}: choose another --out_dir, or start from it with --init_from")
        if load_train_state(state_path)["step"] >= saved.max_iters:
            return                                  # finished: this run starts from it
        options.update(resume=True, seed=saved.seed)  # a resumed stage keeps its own seed
    earlier = named_config(config.init_config)
    for path, value in options.items():
        assign(earlier, path, value)
    earlier = settle(earlier, options, config.init_config)
    train_earlier_stage(earlier, options)
    print(f"stage {config.init_config} first, into {earlier.out_dir}", flush=True)
    with worker_failures():
        context = train(earlier)[2]
    context.close()                                 # under torchrun the next stage joins a new group


def main(argv):
    config, given = parse_run(argv)
    train_earlier_stage(config, given)
    with worker_failures():
        model, data, context, dtype = train(config)
    context.close()                     # every rank leaves the group together, before evaluation
    if not context.main:
        return
    # One process evaluates an ordinary (unwrapped, unsharded) model.
    if context.world == 1:
        model = distributed.unwrap(model)
    else:
        model = SparseCut.from_pretrained(os.path.join(config.out_dir, "checkpoint"), context.device)
    started = time.time()
    metrics = evaluate_run(model, data, config, "test", context.device, dtype)
    print_table(metrics, f"test ({config.n_test} images, {time.time() - started:.0f} s)")
    with open(os.path.join(config.out_dir, "eval.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {config.out_dir}/eval.json; caption an image with: python sample.py --image "
          f"IMAGE --checkpoint {config.out_dir}")
    if getattr(data, "skipped", None):
        print(f"skipped {len(data.skipped)} unreadable image(s) of {data.n_images} (warnings above)")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
