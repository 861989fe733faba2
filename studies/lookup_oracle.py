"""How fast the tiny LLM learns Shapes questions when it is handed ideal object features.

A diagnosis for the README ("What was tried for the questions"), not part of the model: the
tiny-chat LLM (llm.py: 4 layers, width 128, qk_norm, initialised as model.py does, trained with
tiny-chat's optimizer, schedule and batch size) answers one Shapes question per sequence about a
scene whose 36 visual tokens are given, not learned: each carries the one-hot colour, shape, size
and texture of the object in its grid cell (2 x 2 tokens per cell, zeros where there is none),
through a learned linear map and at RMS 1, as visual_norm makes them. What is measured is the
LLM's lookup alone, with the image before the question (LLaVA's order) or after it (the visual
tokens can then read the question). About 3 minutes per 1,000 steps on one CPU thread.

    python -m studies.lookup_oracle --order image-first
    python -m studies.lookup_oracle --order question-first [--prefix "describe the image ."]
    python -m studies.lookup_oracle --order question-first --encoder out/capvn [--shortcuts false]

With --encoder RUN the visual tokens are learned ones: the scenes are rendered, and RUN's ViT and
fusion (frozen; a tiny or tiny-chat run, 36 tokens) make the tokens and its shortcuts' additions
at the image rows (--shortcuts false: none); the tokens still pass a new linear map to RMS 1.
About 10 minutes per 1,000 steps on one thread.
"""

import collections
import dataclasses
import os
import random
import sys

import torch
import torch.nn.functional as F

from config import cosine_schedule, make_optimizer, parse_options, run_cli                 # noqa: E402
from recipes import tiny_chat                                                # noqa: E402
from sources.data import to_tensor                                                 # noqa: E402
from llm import LLM                                                       # noqa: E402
from model import SparseCut, init_weights                                  # noqa: E402
from sources.shapes import (COLORS, POSITIONS, QUESTION_TYPES, SHAPES, SIZES, TEXTURES, draw_scene, named_by,  # noqa: E402
                    question_about, question_vocabulary, random_objects, shapes_vocabulary)
from ckpt.weights import CheckpointError, checkpoint_dir                        # noqa: E402

WORDS = ["<pad>", "<answer>", "<end>", "<image>"] + sorted(set(shapes_vocabulary()) | set(question_vocabulary()))
WORD_ID = {word: i for i, word in enumerate(WORDS)}
TINY_CHAT = tiny_chat().model                                  # the LLM and the image tokens' count
IMAGE_ID, N_IMAGE_TOKENS = WORD_ID["<image>"], TINY_CHAT.n_image_tokens        # 36: a 6 x 6 grid
ATTRIBUTES = [list(COLORS), list(SHAPES), list(SIZES), list(TEXTURES)]
N_FEATURES = sum(map(len, ATTRIBUTES))


def words_of(text):
    return text.replace("?", " ?").replace(".", " .").split()


def words(text):
    return [WORD_ID[w] for w in words_of(text)]


def object_features(objects):
    """(36, N_FEATURES): each token the one-hot attributes of the object in its 3 x 3 grid cell."""
    cells = torch.zeros(9, N_FEATURES)
    for obj in objects:
        offset = 0
        for values, value in zip(ATTRIBUTES, (obj.color, obj.shape, obj.size, obj.texture)):
            cells[POSITIONS.index(obj.position), offset + values.index(value)] = 1
            offset += len(values)
    return cells.view(3, 1, 3, 1, N_FEATURES).expand(3, 2, 3, 2, N_FEATURES).reshape(N_IMAGE_TOKENS, N_FEATURES)


def batch(rng, n, order, prefix, images=False):
    """n scenes, one question of a random type each: features (or images), input_ids, labels,
    (type, named by)."""
    features, rows, kinds = [], [], []
    for _ in range(n):
        objects = random_objects(rng)
        kind = rng.choice(QUESTION_TYPES)
        question, answer = question_about(objects, kind, rng)
        image = [IMAGE_ID] * N_IMAGE_TOKENS
        prompt = words(prefix) + (image + words(question) if order == "image-first" else words(question) + image)
        prompt, reply = prompt + [WORD_ID["<answer>"]], words(answer) + [WORD_ID["<end>"]]
        labels = [-100] * (len(prompt) - 1) + reply + [-100]             # next-token targets
        features.append(to_tensor(draw_scene(objects, rng)[None])[0] if images else object_features(objects))
        rows.append((prompt + reply, labels))
        kinds.append((kind, "by_" + named_by(question)))
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (T - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labels + [-100] * (T - len(labels)) for _, labels in rows])
    return torch.stack(features), input_ids, labels, kinds


def frozen_encoder(path):
    """A run's SparseCut (its ViT and fusion are used), frozen; it must make tiny-chat's tokens."""
    encoder = SparseCut.from_pretrained(checkpoint_dir(path)).eval().requires_grad_(False)
    made = (encoder.config.n_image_tokens, encoder.config.llm.width)
    if made != (N_IMAGE_TOKENS, TINY_CHAT.llm.width):
        raise CheckpointError(f"--encoder {path} makes {made[0]} visual tokens of width {made[1]}; this "
                              f"script needs {N_IMAGE_TOKENS} of width {TINY_CHAT.llm.width} (a tiny or tiny-chat run)")
    return encoder


class OracleModel(torch.nn.Module):
    """The new LLM, and a new linear map from the features (or from the encoder's tokens) to it."""

    def __init__(self, encoder=None, shortcuts=True):
        super().__init__()
        config = dataclasses.replace(TINY_CHAT.llm, vocab_size=len(WORDS))
        self.llm = LLM(config)
        self.llm.apply(init_weights)
        self.encoder, self.shortcuts = encoder, shortcuts
        self.project = torch.nn.Linear(N_FEATURES if encoder is None else config.width, config.width)

    def forward(self, features, input_ids):
        """features (B, 36, N_FEATURES), or images (B, 3, H, W) with an encoder -> logits (B, T, vocab)."""
        injections = None
        if self.encoder is not None:
            with torch.no_grad():
                features, injections = self.encoder.encode_images(features)   # (B, 36, D), {layer: (B, 36, D)}
        visual = F.rms_norm(self.project(features), (self.project.out_features,))   # (B, 36, D) at RMS 1
        h = self.llm.embed_tokens(input_ids).masked_scatter((input_ids == IMAGE_ID)[..., None], visual)
        if not (injections and self.shortcuts):
            return self.llm(inputs_embeds=h)
        start = (input_ids == IMAGE_ID).int().argmax(1)                 # (B,) each row's image run
        return self.llm(inputs_embeds=h, injections=injections, image_span=(start, start + N_IMAGE_TOKENS))


@torch.no_grad()
def accuracy(model, test_batches):
    """Share of questions whose whole answer is right (teacher-forced argmax), overall and by group."""
    right, total = collections.Counter(), collections.Counter()
    for features, input_ids, labels, kinds in test_batches:
        scored = labels != -100
        correct = ((model(features, input_ids).argmax(-1) == labels) | ~scored).all(1)
        for ok, (kind, named) in zip(correct.tolist(), kinds):
            for group in ("all", named, kind):
                right[group] += ok
                total[group] += 1
    return {group: right[group] / total[group] for group in total}


@dataclasses.dataclass
class OracleOptions:
    order: str = "image-first"        # image-first | question-first
    prefix: str = ""                  # fixed Shapes words before everything (as a system prompt)
    steps: int = 1000
    seed: int = 0
    eval_interval: int = 250
    encoder: str = ""                 # a run (or checkpoint) whose frozen ViT and fusion make the tokens
    shortcuts: bool = True            # with --encoder: its shortcuts' additions at the image rows


def main(argv):
    options = OracleOptions()
    parse_options(options, argv, __doc__)
    if options.order not in ("image-first", "question-first"):
        raise ValueError(f"--order takes image-first or question-first, not {options.order!r}")
    if options.steps <= 0 or options.eval_interval <= 0:
        raise ValueError("--steps and --eval_interval must be positive")
    unknown = sorted(set(words_of(options.prefix)) - set(WORD_ID))
    if unknown:
        raise ValueError(f"--prefix: {unknown[0]!r} is not a Shapes word; use words of shapes.py's vocabulary")
    encoder = frozen_encoder(options.encoder) if options.encoder else None
    images = encoder is not None
    torch.manual_seed(options.seed)
    recipe = tiny_chat()                                   # its optimizer, schedule and batch size
    recipe.max_iters = options.steps
    model = OracleModel(encoder, options.shortcuts)
    optimizer = make_optimizer(model, recipe, torch.device("cpu"))
    train_rng = random.Random(options.seed)
    test_batches = [batch(random.Random(10_000 + k), 250, options.order, options.prefix, images) for k in range(4)]
    groups = ("all", "by_position", "by_content") + QUESTION_TYPES
    print("step  " + "  ".join(f"{g:>11}" for g in groups))
    for step in range(options.steps + 1):
        if step % options.eval_interval == 0 or step == options.steps:
            scores = accuracy(model, test_batches)
            print(f"{step:4d}  " + "  ".join(f"{scores[g]:11.3f}" for g in groups), flush=True)
        if step == options.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = cosine_schedule(step, recipe.lr, recipe.warmup_iters, recipe.max_iters, recipe.min_lr_ratio)
        features, input_ids, labels, _ = batch(train_rng, recipe.batch_size, options.order, options.prefix, images)
        loss = F.cross_entropy(model(features, input_ids).flatten(0, 1), labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
