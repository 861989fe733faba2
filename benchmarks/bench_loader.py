"""Does the data pipeline keep the training step fed? Images/s delivered from a folder of JPEGs
with 0, 1, 2, ... workers, against the images/s of a training step, for the tiny and smol shapes.

    python -m benchmarks.bench_loader [--folder DIR] [--n_images 2000] [--workers 0,1,2] [--steps 20]

Without an existing --folder, it first writes n_images photo-sized (500x375) JPEGs with a
captions.csv there. The loader does what training does for each step: read, decode, resize to
the high-resolution view (2R), tokenise. The training step is measured on this machine with
random weights (forward, backward, AdamW) at the shape's real size.
"""

import dataclasses
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from config import parse_options, run_cli
from recipes import named_config
from sources.data import make_data, step_batches
from llm import LLMConfig
from model import SparseCut, SparseCutConfig
from vit import ViTConfig

SHAPES = {  # name: (ViT, LLM) at their real size; smol = SigLIP-B/16-224 + SmolLM2-135M
    "tiny": (named_config("tiny").model.vit, named_config("tiny").model.llm),
    "smol": (ViTConfig(image_size=224, patch_size=16, width=768, n_layer=12, n_head=12, mlp_dim=3072,
                       class_token=False, pre_norm=False, patch_bias=True, act="gelu_tanh"),
             LLMConfig(vocab_size=49152, width=576, n_layer=30, n_head=9, n_kv_head=3, mlp_dim=1536)),
}


@dataclasses.dataclass
class LoaderOptions:
    folder: str = "out/loader-bench"
    n_images: int = 2000
    workers: str = "0,1,2"
    steps: int = 20                   # loader steps per measurement
    batch_size: int = 32


def write_photos(folder, n, size=(500, 375), seed=0):
    """n JPEGs of photo size: smooth colour fields with noise (JPEG-compressible like photos)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    with open(os.path.join(folder, "captions.csv"), "w") as f:
        f.write("image,caption\n")
        for i in range(n):
            a, b, c = rng.uniform(0, 6, 3)
            pixels = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x * y + a)], -1)
            pixels = (pixels * 90 + 128 + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
            f.write(f"{i:05d}.jpg,a photo number {i % 50} of a scene\n")


def loader_images_per_s(folder, shape, workers, steps, batch_size):
    config = named_config("tiny")
    config.data, config.num_workers, config.batch_size = folder, workers, batch_size
    config.model.vit = dataclasses.replace(SHAPES[shape][0])
    config.max_iters = steps + 2
    data = make_data(config)
    batches = step_batches(data, config, 0)
    next(batches), next(batches)                                 # workers started, pipeline full
    started = time.perf_counter()
    for _ in batches:
        pass
    return steps * batch_size / (time.perf_counter() - started)


def train_images_per_s(shape, batch_size):
    vit, llm = SHAPES[shape]
    torch.manual_seed(0)
    model = SparseCut(SparseCutConfig(vit=dataclasses.replace(vit), llm=dataclasses.replace(llm))).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    images = torch.rand(batch_size, 3, 2 * vit.image_size, 2 * vit.image_size)
    ids = torch.randint(4, llm.vocab_size, (batch_size, 24))

    def step():
        model(images, ids, ids)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    started = time.perf_counter()
    step()
    return batch_size / (time.perf_counter() - started)


def main(argv):
    options = LoaderOptions()
    parse_options(options, argv, __doc__)
    workers = [int(w) for w in options.workers.split(",")]
    if not os.path.isdir(options.folder):
        started = time.time()
        write_photos(options.folder, options.n_images)
        print(f"wrote {options.n_images} JPEGs into {options.folder} ({time.time() - started:.0f} s)")
    print("| shape | high-res view | train step images/s (CPU) | "
          + " | ".join(f"loader images/s, {w} workers" for w in workers) + " |")
    print("|---|---|---|" + "---|" * len(workers))
    for shape in SHAPES:
        batch = 32 if shape == "tiny" else 2
        step_rate = train_images_per_s(shape, batch)
        rates = [loader_images_per_s(options.folder, shape, w, options.steps, options.batch_size) for w in workers]
        print(f"| {shape} | {2 * SHAPES[shape][0].image_size} px | {step_rate:.1f} | "
              + " | ".join(f"{r:.0f} ({r / step_rate:.1f}x)" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
