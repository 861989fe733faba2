"""Pretraining objectives that ask an encoder's top layer to discard colour (the paper's premise at
tiny scale; studies/premise.py measures each, README "Results").

CLIP-style pretraining (training/contrastive.py) with colour made a nuisance: the captions never
name it, and each scene is shown twice, the second time with every object's colour redrawn (same
shapes, places and jitter), both against the same caption. On top of that, one pressure on the
patch tokens of the layer LLaVA reads (the penultimate), named by `clip.objective`:
- `nuisance`: none (the augmentation alone);
- `patch-invariance`: each token of the scene and of its recoloured copy made equal, each feature's
  difference relative to its spread over the batch (weight 10; `-strong`: 1000);
- `adversarial`: a linear colour classifier learns to read each object's colour off its cell's
  tokens, and the encoder is trained to leave it at uniform;
- `patch-clip`: every patch token, through the image projection, matched to its scene's caption
  (CLIP's loss per token): a patch-level objective that asks each token for the whole scene;
- `mean-matching` (tiny-premise's): the mean of the cell tokens made the same for every colour,
  each feature standardised as the layer probe standardises it (weight 100): the condition under
  which no linear read-out of colour beats a constant (LEACE, Belrose et al. 2023).
`adversarial` and `mean-matching` also have layer 1 reconstruct the low-res pixels (a linear
head), so that the lower layers keep colour.
"""

import math
import random
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sources.data import to_tensor
from sources.shapes import COLORS, GRID, POSITIONS, caption_of, random_objects, scene_jitter, shared_renderer

OBJECTIVES = {  # name: weights of the pressures on the layer llava reads ("clip": plain CLIP, one view)
    "clip": None,
    "nuisance": {},
    "patch-invariance": {"invariance": 10.0},
    "patch-invariance-strong": {"invariance": 1000.0},
    "adversarial": {"confusion": 1.0, "reconstruction": 1.0},
    "patch-clip": {"patch_clip": 1.0},
    "mean-matching": {"mean_matching": 100.0, "reconstruction": 1.0},
}


def recoloured_pairs(n, seed):
    """n Shapes scenes, and each again with every object's colour redrawn (same shapes, places and
    jitter): images and recoloured (n, 3, C, C) in [0, 1], the captions without colour words, and
    for each image of the two [(cell, colour index)] of its objects (2n lists)."""
    rng, renderer = random.Random(seed), shared_renderer()
    images, recoloured, captions, first, second = [], [], [], [], []
    cells = lambda objects: [(POSITIONS.index(o.position), list(COLORS).index(o.color)) for o in objects]
    for _ in range(n):
        objects = random_objects(rng)
        others = [replace(o, color=rng.choice(list(COLORS))) for o in objects]
        jitter = scene_jitter(objects, rng)
        images.append(renderer.render(objects, jitter))
        recoloured.append(renderer.render(others, jitter))
        captions.append(" ".join(w for w in caption_of(objects).split() if w not in COLORS))
        first.append(cells(objects))
        second.append(cells(others))
    return to_tensor(np.stack(images)), to_tensor(np.stack(recoloured)), captions, first + second


def cell_tokens(tokens, objects, grid):
    """The tokens of each object's cell, concatenated: (V, G*G, D) -> (n_objects, (G/3)^2 D), and
    the objects' colour indices (n_objects,). objects: one [(cell, colour)] list per image."""
    per_cell = grid // GRID
    cells = tokens.reshape(tokens.shape[0], grid, grid, -1)
    rows, colours = [], []
    for b, image_objects in enumerate(objects):
        for cell, colour in image_objects:
            r, c = divmod(cell, GRID)
            rows.append(cells[b, r * per_cell:(r + 1) * per_cell, c * per_cell:(c + 1) * per_cell].reshape(-1))
            colours.append(colour)
    return torch.stack(rows), torch.tensor(colours)


def class_mean_spread(features, labels, n_classes):
    """How far apart the class means of features (N, F) lie, each feature standardised:
    sum_k p_k |mu_k|^2 / F. Zero: no linear read-out of the class beats a constant (LEACE)."""
    standard = (features - features.mean(0)) / features.std(0).clamp(min=1e-6)
    spread = sum((labels == k).float().mean() * standard[labels == k].mean(0).pow(2).sum()
                 for k in range(n_classes) if bool((labels == k).any()))
    return spread / features.shape[1]


class PremiseHeads(nn.Module):
    """What the objectives train beside the encoder: the colour adversary and the pixel head."""

    def __init__(self, vit_config):
        super().__init__()
        per_cell = (vit_config.grid // GRID) ** 2
        self.colour = nn.Linear(per_cell * vit_config.width, len(COLORS))
        self.pixels = nn.Linear(vit_config.width, 3 * vit_config.patch_size ** 2)


def premise_loss(objective, pair, heads, hidden, views, objects, text, target):
    """The objective's pressures, summed: hidden (n_layer + 1 states of the V = 2B views), views
    (V, 3, R, R) as the ViT saw them, objects per view, text (B, E) embeddings, target (V,)."""
    weights, config = OBJECTIVES[objective], pair.vit.config
    tokens = hidden[config.n_layer - 1][:, 1:]                                   # (V, G*G, D): llava's layer
    half, loss = len(views) // 2, views.new_zeros(())
    if "invariance" in weights:
        scale = tokens.flatten(0, 1).std(0).clamp(min=1e-6)                      # (D,)
        loss = loss + weights["invariance"] * ((tokens[:half] - tokens[half:]) / scale).pow(2).mean()
    if "confusion" in weights:
        features, colours = cell_tokens(F.layer_norm(tokens, (config.width,)), objects, config.grid)
        loss = loss + F.cross_entropy(heads.colour(features.detach()), colours)          # it learns colour
        frozen = F.linear(features, heads.colour.weight.detach(), heads.colour.bias.detach())
        loss = loss - weights["confusion"] * F.log_softmax(frozen, -1).mean()           # the encoder hides it
    if "mean_matching" in weights:
        features, colours = cell_tokens(F.layer_norm(tokens, (config.width,)), objects, config.grid)
        loss = loss + weights["mean_matching"] * class_mean_spread(features, colours, len(COLORS))
    if "patch_clip" in weights:
        patches = F.normalize(pair.image_proj(pair.vit.post_layernorm(tokens)), dim=-1)   # (V, G*G, E)
        logits = patches.flatten(0, 1) @ text.T * pair.log_scale.clamp(max=math.log(100)).exp()
        loss = loss + weights["patch_clip"] * F.cross_entropy(logits, target.repeat_interleave(tokens.shape[1]))
    if "reconstruction" in weights:
        p = config.patch_size
        patches = views.unfold(2, p, p).unfold(3, p, p)                          # (V, 3, G, G, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(len(views), config.grid ** 2, -1)
        loss = loss + weights["reconstruction"] * (heads.pixels(hidden[1][:, 1:]) - patches).pow(2).mean()
    return loss
