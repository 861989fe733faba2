"""Evaluate a trained run on one of its splits, read from the run's own saved config.

    python eval.py --checkpoint OUT_DIR [--split test|val|train] [--n N] [--attention composite]

The data, splits, seed, tokenizer and caption length are the run's (OUT_DIR/checkpoint/
train_config.json), so `python eval.py --checkpoint OUT` reproduces OUT/eval.json exactly. Writes
OUT/eval_SPLIT.json (eval_SPLIT_composite.json with --attention composite). Metrics: see metrics.py.
"""

import json
import os
import sys
from dataclasses import dataclass

import torch

from config import check_device, check_writable, load_run_config, parse_options, run_cli
from sources.data import load_tokenizer, make_data
from training.metrics import evaluate_run, print_table
from model import SparseCut
from ckpt.weights import checkpoint_dir


@dataclass
class EvalOptions:
    checkpoint: str = "out/tiny"      # a training out_dir, or its checkpoint/ directory
    split: str = "test"               # test | val | train
    n: int = 0                        # images; 0: the run's n_test (n_val for val)
    attention: str = ""               # composite on a causal checkpoint = EE-MLLM-F
    device: str = "cpu"


def main(argv):
    options = EvalOptions()
    parse_options(options, argv, __doc__)
    if options.split not in ("test", "val", "train"):
        raise ValueError(f"--split takes test, val or train, not {options.split!r}")
    if options.n < 0:
        raise ValueError(f"--n must be positive (or 0 for the run's own count), not {options.n}")
    check_device(options.device)
    path = checkpoint_dir(options.checkpoint)
    overrides = {"attention": options.attention} if options.attention else {}
    model = SparseCut.from_pretrained(path, device=options.device, **overrides)
    config = load_run_config(path)
    config.model = model.config
    if options.n:
        setattr(config, "n_val" if options.split == "val" else "n_test", options.n)
    run_dir = os.path.dirname(path) if os.path.basename(path) == "checkpoint" else path
    suffix = f"_{options.attention}" if options.attention else ""   # never mixed with the run's own
    out = os.path.join(run_dir, f"eval_{options.split}{suffix}.json")
    check_writable(out)
    data = make_data(config, load_tokenizer(path))
    metrics = evaluate_run(model, data, config, options.split, options.device)
    print_table(metrics, f"{options.split} ({config.n_val if options.split == 'val' else config.n_test} images)")
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main, sys.argv[1:])
