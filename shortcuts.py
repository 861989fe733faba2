"""Shortcut plans: which ViT layer feeds which LLM layer (SparseCut paper, section 3.3).

A plan is a list of (vit_layer, llm_layer) pairs. vit_layer indexes the ViT's hidden states
(0 = embedding output, n_layer = last block), llm_layer the decoder layers (0-indexed): the fused
features of vit_layer are added at the image positions just before llm_layer runs.

The released code (13B: 24-layer CLIP ViT-L, 40-layer LLM) taps ViT layers 1, 4, 7, ..., 22 and
feeds LLM layers 4, 9, ..., 39 in the same order: 8 shortcuts, evenly spaced on both sides. The
named patterns below compute that layout for any depths; the paper's other patterns move the
LLM ends (skewed), flip the order (reversed) or use a shortcut for every LLM layer (dense).
"""

import torch
import torch.nn as nn

PATTERNS = ("uniform", "skew_bottom", "skew_top", "reverse", "dense", "none")


def evenly_spaced(count, depth, first):
    """count indices spread over [first, first + depth): first + floor(k * depth / count)."""
    return [first + (k * depth) // count for k in range(count)]


def last_of_groups(count, depth, first):
    """The last index of each of count equal groups of [first, first + depth)."""
    return [first + ((k + 1) * depth) // count - 1 for k in range(count)]


def shortcut_plan(pattern, vit_layers, llm_layers, n_shortcuts=8):
    """The (vit_layer, llm_layer) pairs of a named pattern, or a checked explicit list.

    uniform      ViT taps 1, 1+s, ... (s = vit_layers / K) into the last layer of each of K equal
                 LLM groups: the released code's 1, 4, ..., 22 -> 4, 9, ..., 39 for 24/40 layers.
    skew_bottom  the same taps into K evenly spaced layers of the lower half of the LLM.
    skew_top     the same taps into the upper half of the LLM.
    reverse      uniform LLM layers, ViT taps in reverse order (deep ViT -> shallow LLM).
    dense        one shortcut before every LLM layer, ViT taps spread evenly.
    none         no shortcuts (multi-grained fusion of the input tokens only).
    K = min(n_shortcuts, vit_layers, llm_layers) for the sparse patterns.
    """
    if not isinstance(pattern, str):
        return check_plan(pattern, vit_layers, llm_layers)
    if pattern not in PATTERNS:
        raise ValueError(f"unknown shortcut pattern {pattern!r}: use one of {', '.join(PATTERNS)} "
                         "or a list of (vit_layer, llm_layer) pairs")
    if pattern == "none":
        return []
    K = llm_layers if pattern == "dense" else min(n_shortcuts, vit_layers, llm_layers)
    taps = evenly_spaced(K, vit_layers, first=1)                 # ViT hidden-state indices
    half = llm_layers // 2
    targets = {
        "uniform": last_of_groups(K, llm_layers, first=0),
        "reverse": last_of_groups(K, llm_layers, first=0),
        "dense": list(range(llm_layers)),
        "skew_bottom": last_of_groups(min(K, half), half, first=0),
        "skew_top": last_of_groups(min(K, llm_layers - half), llm_layers - half, first=half),
    }[pattern]
    if pattern == "reverse":
        taps = taps[::-1]
    taps = taps[:len(targets)]
    return check_plan(list(zip(taps, targets)), vit_layers, llm_layers)


def check_plan(plan, vit_layers, llm_layers):
    """Validate explicit pairs; an index out of range names itself and the valid range."""
    if not isinstance(plan, (list, tuple)):
        raise ValueError(f"shortcuts must be a pattern name or a list of (vit_layer, llm_layer) pairs, not {plan!r}")
    pairs = []
    for pair in plan:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(i, int) for i in pair)):
            raise ValueError(f"shortcut {pair!r} is not a (vit_layer, llm_layer) pair of integers; "
                             "give a list of pairs such as [[1, 0], [3, 2]]")
        vit_layer, llm_layer = pair
        if not 0 <= vit_layer <= vit_layers:
            raise ValueError(f"shortcut ({vit_layer}, {llm_layer}): ViT layer {vit_layer} is out "
                             f"of range; valid ViT layers are 0..{vit_layers}")
        if not 0 <= llm_layer < llm_layers:
            raise ValueError(f"shortcut ({vit_layer}, {llm_layer}): LLM layer {llm_layer} is out "
                             f"of range; valid LLM layers are 0..{llm_layers - 1}")
        pairs.append((vit_layer, llm_layer))
    if len({llm for _, llm in pairs}) != len(pairs):
        raise ValueError(f"shortcut plan {pairs} feeds one LLM layer twice; give each LLM layer "
                         "at most one shortcut")
    return pairs


class ShortcutGates(nn.Module):
    """Optional learnable scalar per shortcut, initialised at 0: the shortcut starts switched off,
    so a pretrained LLM's output is unchanged at the start of training (not in the paper)."""

    def __init__(self, n_shortcuts):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(n_shortcuts))

    def forward(self, index, features):
        return self.gate[index].to(features.dtype) * features


def injections(plan, fused, gates=None):
    """{llm_layer: features} for LLM.forward, from fused[k] (B, N, d) of the k-th shortcut."""
    return {llm_layer: fused[k] if gates is None else gates(k, fused[k])
            for k, (_, llm_layer) in enumerate(plan)}
