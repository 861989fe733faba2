"""Caption one or more images with a trained checkpoint.

    python sample.py --image cat.jpg [more.png ...] [--checkpoint DIR] [--prompt TEXT]
                     [--temperature T] [--top_k K] [--top_p P] [--attention composite]

Any image PIL reads, of any size and mode; greedy decoding by default.
"""

import argparse
import os
import sys

import torch

from data import decode, encode, load_image, load_tokenizer
from model import SparseCut
from train import run_cli
from weights import CheckpointError, checkpoint_dir

DEFAULT_CHECKPOINT = "out/tiny"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", nargs="+", required=True, help="image file(s)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--prompt", default="", help="text the caption starts with")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--attention", choices=["causal", "composite"], default=None,
                        help="composite on a causal checkpoint = training-free EE-MLLM-F")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) \
            or (args.top_k is not None and args.top_k <= 0) or args.max_new_tokens <= 0:
        raise ValueError("--temperature must be >= 0, --top_k and --max_new_tokens > 0, "
                         "--top_p in (0, 1]")
    path = checkpoint_dir(args.checkpoint)
    if args.checkpoint == DEFAULT_CHECKPOINT and not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint in {DEFAULT_CHECKPOINT}: train one first with "
                              "`python train.py --config tiny`, or pass --checkpoint DIR")
    overrides = {"attention": args.attention} if args.attention else {}
    model = SparseCut.from_pretrained(path, device=args.device, **overrides)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise CheckpointError(f"{path} has no tokenizer.json: is it a SparseCut checkpoint?")
    tokenizer = load_tokenizer(path)
    size = 2 * model.config.vit.image_size                      # the high-resolution view
    images = torch.stack([load_image(p, size) for p in args.image]).to(args.device)
    prompt = encode(tokenizer, args.prompt, model.config.bos_id)[:-1]   # [BOS] + prompt, no EOS
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    outputs = model.generate(images, [prompt] * len(args.image), max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             generator=generator)
    for image_path, ids in zip(args.image, outputs):
        caption = " ".join(filter(None, [args.prompt.strip(), decode(tokenizer, ids)]))
        print(caption if len(args.image) == 1 else f"{image_path}: {caption}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
