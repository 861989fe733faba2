"""From ViT hidden states to LLM-width visual tokens: views, multi-grained fusion, projector.

SparseCut paper, section 3.2 and the released code (a LLaVA-1.5 fork):
- Views: the low-resolution view is the image at the encoder's resolution R; the high-resolution
  view is the image at 2R cut into 4 crops of R (top-left, top-right, bottom-left, bottom-right).
  All 5 views go through the ViT as one batch, view-major: [low | tl | tr | bl | br].
- `CrossMLP` (default): for each low-res patch (i, j), concatenate its token with the 2x2 block
  of high-res tokens covering the same area, then a 2-layer MLP to the LLM width. The output has
  as many tokens as the low-res view, so the LLM sequence is as long as LLaVA's.
- `CrossAttention`: low-res tokens query the 4 G^2 high-res tokens, then the same kind of MLP.
- `Projector`: LLaVA-1.5's `mlp2x_gelu`, Linear -> GELU -> Linear, used alone by the baselines.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def patch_tokens(hidden, class_token):
    """Drop the class token (the released code does): (B, 1 + G*G, D) -> (B, G*G, D)."""
    return hidden[:, 1:] if class_token else hidden


def split_views(tokens, batch):
    """(5B, G*G, D) view-major -> low (B, G*G, D) and crops (4, B, G*G, D) in tl, tr, bl, br order."""
    views = tokens.view(N_VIEWS, batch, *tokens.shape[1:])
    return views[0], views[1:]


def high_res_blocks(crops, grid):
    """The 2x2 high-res tokens under each low-res patch: (4, B, G*G, D) -> (B, G*G, 4, D).

    The 4 crops' grids tile a 2G x 2G grid of the whole image; low-res cell (i, j) covers the
    high-res cells (2i..2i+1, 2j..2j+1).
    """
    G = grid
    tl, tr, bl, br = (crop.reshape(crop.shape[0], G, G, -1) for crop in crops)   # (B, G, G, D)
    full = torch.cat([torch.cat([tl, tr], dim=2), torch.cat([bl, br], dim=2)], dim=1)  # (B, 2G, 2G, D)
    B, D = full.shape[0], full.shape[-1]
    blocks = full.view(B, G, 2, G, 2, D).permute(0, 1, 3, 2, 4, 5)             # (B, G, G, 2, 2, D)
    return blocks.reshape(B, G * G, 4, D)


class Projector(nn.Module):
    """LLaVA-1.5 `mlp2x_gelu`: Linear(in -> d) -> GELU -> Linear(d -> d)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LowResProjector(nn.Module):
    """The baselines: project each ViT token on its own (LLaVA: low-res; concat: all 5 views)."""

    def __init__(self, vit_width, llm_width):
        super().__init__()
        self.projector = Projector(vit_width, llm_width)

    def forward(self, tokens):
        return self.projector(tokens)                            # (B, N, D_vit) -> (B, N, d)


class CrossMLP(nn.Module):
    """Multi-grained fusion by concatenation: [low | 2x2 high-res block] (5 D_vit) -> MLP -> d."""

    def __init__(self, vit_width, llm_width, grid):
        super().__init__()
        self.grid = grid
        self.projector = Projector(N_VIEWS * vit_width, llm_width)

    def forward(self, low, crops):
        blocks = high_res_blocks(crops, self.grid)               # (B, G*G, 4, D_vit)
        fused = torch.cat([low[:, :, None], blocks], dim=2)      # (B, G*G, 5, D_vit)
        return self.projector(fused.flatten(2))                  # (B, G*G, d)


class CrossAttention(nn.Module):
    """Multi-grained fusion by attention: low-res queries over all high-res tokens, post-norm
    residual blocks (attention, then FFN), then the MLP to the LLM width."""

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


def make_fuser(config):
    """The module that turns one ViT layer's tokens into LLM-width tokens, per the config."""
    vit_width, llm_width = config.vit.width, config.llm.width
    if config.fusion in ("llava", "concat"):
        return LowResProjector(vit_width, llm_width)
    if config.fuser == "cross_mlp":
        return CrossMLP(vit_width, llm_width, config.vit.grid)
    return CrossAttention(vit_width, llm_width, config.cross_attn_heads)
