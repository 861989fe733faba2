"""From ViT hidden states to the LLM: one unit (class) per fusion mode.

A mode turns the ViT's hidden states into `(input_tokens, {llm_layer: features})`: the visual
tokens placed in the LLM sequence, and the features added at their positions just before chosen
LLM layers. It owns its views, fusers, projectors, shortcut plan and gates; model.py only runs
vit -> fusion -> llm. A new mode is one subclass of `Fusion` plus one entry in `FUSIONS`.

Views (SparseCut paper, section 3.2, and its released code, a LLaVA-1.5 fork): the low-resolution
view is the image at the encoder's resolution R; the high-resolution view is the image at 2R cut
into 4 crops of R (top-left, top-right, bottom-left, bottom-right). All 5 go through the ViT as
one batch, view-major: [low | tl | tr | bl | br]. The 4 crops' G x G grids tile one 2G x 2G grid.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from shortcuts import ShortcutGates, injections, shortcut_plan

N_VIEWS = 5                                                      # low-res + 4 high-res crops


def resize(images, size):
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)


def image_views(images, resolution, high_res=True):
    """(B, 3, H, W) in [0, 1] -> (B, 3, R, R), or with high_res (5B, 3, R, R) view-major."""
    R = resolution
    low = resize(images, R)
    if not high_res:
        return low
    high = resize(images, 2 * R)                                 # (B, 3, 2R, 2R)
    crops = [high[..., :R, :R], high[..., :R, R:], high[..., R:, :R], high[..., R:, R:]]
    return torch.cat([low] + crops)                              # (5B, 3, R, R)


def split_views(tokens, batch):
    """(5B, G*G, D) view-major -> low (B, G*G, D) and crops (4, B, G*G, D) in tl, tr, bl, br order."""
    views = tokens.view(N_VIEWS, batch, *tokens.shape[1:])
    return views[0], views[1:]


def patch_tokens(hidden, class_token):
    """Drop the class token (the released code does): (B, 1 + G*G, D) -> (B, G*G, D)."""
    return hidden[:, 1:] if class_token else hidden


def high_res_grid(crops, grid):
    """The 4 crops' tokens as one grid of the whole image: (4, B, G*G, D) -> (B, 2G, 2G, D)."""
    tl, tr, bl, br = (crop.reshape(crop.shape[0], grid, grid, -1) for crop in crops)
    return torch.cat([torch.cat([tl, tr], dim=2), torch.cat([bl, br], dim=2)], dim=1)


def high_res_blocks(crops, grid):
    """The 2x2 high-res tokens under each low-res patch: (4, B, G*G, D) -> (B, G*G, 4, D).
    Low-res cell (i, j) covers the high-res cells (2i..2i+1, 2j..2j+1)."""
    full = high_res_grid(crops, grid)                            # (B, 2G, 2G, D)
    B, D = full.shape[0], full.shape[-1]
    blocks = full.view(B, grid, 2, grid, 2, D).permute(0, 1, 3, 2, 4, 5)    # (B, G, G, 2, 2, D)
    return blocks.reshape(B, grid * grid, 4, D)


def dilated_stacks(crops, grid):
    """DeepStack's 4 stacks: stack (i, j) = full[i::2, j::2], each G x G, in the order (0, 0),
    (0, 1), (1, 0), (1, 1): (4, B, G*G, D) -> (4, B, G*G, D)."""
    blocks = high_res_blocks(crops, grid)                        # (B, G*G, 4, D), block order i, j
    return blocks.permute(2, 0, 1, 3)


class Projector(nn.Module):
    """LLaVA-1.5 `mlp2x_gelu`: Linear(in -> d) -> GELU -> Linear(d -> d)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

    def flops(self, rows):
        return 2 * rows * (self.fc1.in_features + self.fc2.in_features) * self.fc2.out_features


class CrossMLP(nn.Module):
    """Multi-grained fusion by concatenation (the released code's default): each low-res token
    with the 2x2 high-res block under it, [low | block] (5 D_vit), through the projector to d."""

    def __init__(self, vit_width, llm_width, grid):
        super().__init__()
        self.grid = grid
        self.projector = Projector(N_VIEWS * vit_width, llm_width)

    def forward(self, low, crops):
        blocks = high_res_blocks(crops, self.grid)               # (B, G*G, 4, D_vit)
        fused = torch.cat([low[:, :, None], blocks], dim=2)      # (B, G*G, 5, D_vit)
        return self.projector(fused.flatten(2))                  # (B, G*G, d)

    def flops(self, rows):
        return self.projector.flops(rows)


class CrossAttention(nn.Module):
    """Multi-grained fusion by attention: low-res queries over all high-res tokens, post-norm
    residual blocks (attention, then FFN), then the projector to the LLM width."""

    def __init__(self, vit_width, llm_width, n_head):
        super().__init__()
        self.attn = nn.MultiheadAttention(vit_width, n_head, batch_first=True)
        self.norm1 = nn.LayerNorm(vit_width)
        self.ffn = nn.Sequential(nn.Linear(vit_width, 4 * vit_width), nn.GELU(),
                                 nn.Linear(4 * vit_width, vit_width))
        self.norm2 = nn.LayerNorm(vit_width)
        self.projector = Projector(vit_width, llm_width)

    def forward(self, low, crops):
        high = torch.cat(list(crops), dim=1)                     # (B, 4 G*G, D_vit)
        x = self.norm1(low + self.attn(low, high, high, need_weights=False)[0])   # (B, G*G, D_vit)
        x = self.norm2(x + self.ffn(x))
        return self.projector(x)                                 # (B, G*G, d)

    def flops(self, rows):       # q, out and FFN on the low rows; k, v and scores over 4x the rows
        D = self.norm1.normalized_shape[0]
        return 2 * rows * D * D * (2 + 2 * 4 + 8) + 2 * 2 * rows * 4 * rows * D + self.projector.flops(rows)


class Fusion(nn.Module):
    """A fusion mode. forward(hidden, batch) -> input tokens (B, N, d), {llm_layer: (B, N, d)}.

    Input tokens from ViT layer `input_layer` (the penultimate), each shortcut's from its tapped
    layer, all by `features` through one shared fuser (one per shortcut: `shortcut_projector=
    "per_layer"`); `visual_norm`: each token at RMS 1 (not in the paper); zero gates optional."""
    high_res = True                  # does the mode run the ViT on the 4 high-res crops too?
    default_shortcuts = "none"       # the plan when config.shortcuts is "default"

    def __init__(self, config):
        super().__init__()
        self.grid, self.class_token = config.vit.grid, config.vit.class_token
        self.n_tokens = self.image_tokens(config.vit)
        self.input_layer = config.input_layer % (config.vit.n_layer + 1)   # -2 -> n_layer - 1
        self.plan = self.make_plan(config)
        self.vit_depth = max([self.input_layer] + [vit_layer for vit_layer, _ in self.plan])
        n_fusers = 1 + len(self.plan) if config.shortcut_projector == "per_layer" else 1
        self.fusers = nn.ModuleList(self.make_fuser(config) for _ in range(n_fusers))
        self.gates = ShortcutGates(len(self.plan)) if config.shortcut_gate == "zero" and self.plan else None
        self.norm = nn.RMSNorm(config.llm.width, eps=1e-6, elementwise_affine=False) if config.visual_norm else nn.Identity()

    @classmethod
    def make_plan(cls, config):
        """The (vit_layer, llm_layer) shortcuts; checked, so a config can be validated early."""
        pattern = cls.default_shortcuts if config.shortcuts == "default" else config.shortcuts
        return shortcut_plan(pattern, config.vit.n_layer, config.llm.n_layer, config.n_shortcuts)

    @staticmethod
    def image_tokens(vit_config):
        """Positions the image takes in the LLM sequence."""
        return vit_config.grid ** 2

    def make_fuser(self, config):
        """What a mode defines: the module that turns one ViT layer's tokens into LLM tokens..."""
        raise NotImplementedError

    def features(self, tokens, batch, slot):
        """...and how: one layer's patch tokens (V*B, G*G, D_vit) -> (B, N, d), with fuser(slot)."""
        raise NotImplementedError

    def fuser(self, slot):
        """Slot 0 makes the input tokens, slot 1 + k the k-th shortcut's features."""
        return self.fusers[slot if len(self.fusers) > 1 else 0]

    def forward(self, hidden, batch):
        """hidden: ViT states (V*B, T, D_vit), at least up to vit_depth."""
        tokens = lambda layer: patch_tokens(hidden[layer], self.class_token)  # (V*B, G*G, D_vit)
        inputs = self.features(tokens(self.input_layer), batch, 0)          # (B, N, d)
        fused = [self.features(tokens(vit_layer), batch, 1 + k) for k, (vit_layer, _) in enumerate(self.plan)]
        return self.norm(inputs), injections(self.plan, [self.norm(f) for f in fused], self.gates)

    def flops(self):
        """Forward FLOPs per sample (2 per multiply-add): the input tokens and every injection."""
        return sum(self.fuser(slot).flops(self.n_tokens) for slot in range(1 + len(self.plan)))


class LLaVA(Fusion):
    """LLaVA-1.5: the low-res view only, each token through the projector. With shortcuts (not by
    default), the tapped layers' low-res tokens go through the same projector: multi-level
    features without multi-resolution, the ablation that separates SparseCut's two ideas."""
    high_res = False

    def make_fuser(self, config):
        return Projector(config.vit.width, config.llm.width)

    def features(self, tokens, batch, slot):
        return self.fuser(slot)(tokens)                          # (B, G*G, D_vit) -> (B, G*G, d)


class Concat(LLaVA):
    """Every view's tokens in the LLM input, each through the projector: 5 G^2 tokens (the costly
    alternative to fusion)."""
    high_res = True

    @staticmethod
    def image_tokens(vit_config):
        return N_VIEWS * vit_config.grid ** 2

    def features(self, tokens, batch, slot):
        views = tokens.view(N_VIEWS, batch, *tokens.shape[1:]).transpose(0, 1)    # (B, 5, G*G, D)
        return self.fuser(slot)(views.flatten(1, 2))             # (B, 5 G*G, d)


class MultiGrained(Fusion):
    """SparseCut: each tapped layer's low-res tokens fused with its high-res tokens (`cross_mlp`
    or `cross_attn`), G^2 tokens; sparse shortcuts by default (section 3.3)."""
    default_shortcuts = "uniform"

    def make_fuser(self, config):
        if config.fuser == "cross_mlp":
            return CrossMLP(config.vit.width, config.llm.width, config.vit.grid)
        return CrossAttention(config.vit.width, config.llm.width, config.cross_attn_heads)

    def features(self, tokens, batch, slot):
        return self.fuser(slot)(*split_views(tokens, batch))    # (B, G*G, d)


class DeepStack(LLaVA):
    """DeepStack-L (Meng et al., NeurIPS 2024): the low-res tokens of the input layer in the input;
    the same layer's high-res tokens cut into 4 dilated stacks, each through the same projector
    and added before LLM layers start, start + interval, ... (released defaults 1 and 1)."""
    high_res = True

    @classmethod
    def make_plan(cls, config):
        if config.shortcuts not in ("default", "none"):
            raise ValueError(f"fusion deepstack adds its own 4 stacks (deepstack_start, "
                             f"deepstack_interval); shortcuts must be none, not {config.shortcuts!r}")
        input_layer = config.input_layer % (config.vit.n_layer + 1)
        layers = [config.deepstack_start + k * config.deepstack_interval for k in range(4)]
        return shortcut_plan([(input_layer, layer) for layer in layers if layer < config.llm.n_layer],
                             config.vit.n_layer, config.llm.n_layer)

    def forward(self, hidden, batch):
        low, crops = split_views(patch_tokens(hidden[self.input_layer], self.class_token), batch)                  # (B, G*G, D), (4, B, G*G, D)
        stacks = dilated_stacks(crops, self.grid)                # (4, B, G*G, D)
        fused = [self.norm(self.fuser(1 + k)(stacks[k])) for k in range(len(self.plan))]
        return self.norm(self.fuser(0)(low)), injections(self.plan, fused, self.gates)


FUSIONS = {"llava": LLaVA, "concat": Concat, "deepstack": DeepStack, "sparsecut": MultiGrained}
