"""Vision Transformer encoder, compatible with CLIP and SigLIP vision towers.

Follows the Hugging Face `CLIPVisionModel` (pre-layernorm, class token, quick-GELU) and
`SiglipVisionModel` (no class token, tanh-GELU, patch-embedding bias). `ViT.forward` returns every
layer's hidden states, exactly like Hugging Face's `output_hidden_states`, because SparseCut taps
several of them (paper section 3.2, "multi-level" features).

Module names follow the Hugging Face checkpoints so that `from_pretrained` is a short mapping.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckpt import hf
from ckpt.hf import CLIP_MEAN, CLIP_STD
from ckpt.weights import load_weights, read_config



@dataclass
class ViTConfig:
    image_size: int = 32          # R, the resolution of one view
    patch_size: int = 4
    width: int = 64
    n_layer: int = 4
    n_head: int = 4
    mlp_dim: int = 256
    class_token: bool = True      # CLIP: yes; SigLIP: no
    pre_norm: bool = True         # CLIP's pre_layrnorm after the embeddings; SigLIP: no
    patch_bias: bool = False      # SigLIP's patch embedding has a bias, CLIP's has none
    act: str = "quick_gelu"       # CLIP: quick_gelu; SigLIP: gelu_tanh
    norm_eps: float = 1e-5
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @property
    def grid(self):
        """Patches per side, G: a view gives G*G patch tokens."""
        return self.image_size // self.patch_size


def activation(name):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown ViT activation {name!r}: use quick_gelu, gelu_tanh or gelu")


class Embeddings(nn.Module):
    """Patchify with a strided convolution, prepend the class token, add learned positions."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, config.patch_size,
                                         bias=config.patch_bias)
        if config.class_token:
            self.class_embedding = nn.Parameter(torch.randn(config.width) * 0.02)
        n_positions = config.grid ** 2 + int(config.class_token)
        self.position_embedding = nn.Embedding(n_positions, config.width)

    def positions(self, grid_h, grid_w):
        """Learned positions, bicubically interpolated when the patch grid differs from training."""
        pos = self.position_embedding.weight                      # (n_positions, D)
        n_cls = int(self.config.class_token)
        G = self.config.grid
        if (grid_h, grid_w) == (G, G):
            return pos
        cls_pos, patch_pos = pos[:n_cls], pos[n_cls:]
        patch_pos = patch_pos.reshape(1, G, G, -1).permute(0, 3, 1, 2)       # (1, D, G, G)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                  align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos])

    def forward(self, pixels):
        patches = self.patch_embedding(pixels)                   # (B, D, H/p, W/p)
        grid_h, grid_w = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2)                   # (B, G*G, D)
        if self.config.class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)                       # (B, 1 + G*G, D)
        return x + self.positions(grid_h, grid_w).to(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections (CLIP and SigLIP)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x):
        B, T, D = x.shape
        heads = lambda t: t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)
        self.act = activation(config.act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.self_attn = SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViT(nn.Module):
    """CLIP/SigLIP vision tower. forward(pixels) -> list of n_layer + 1 hidden states (B, T, D)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.width, eps=config.norm_eps) if config.pre_norm else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # Not applied in forward: the contract returns un-normalised states; callers that want the
        # final pooled representation apply it themselves.
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, pixels, n_layers=None):
        """pixels (B, 3, H, W), normalised -> [embeddings, block 1, ..., block n] outputs, each
        (B, T, D). n_layers (default: all) stops early when the deeper states are not needed."""
        x = self.embeddings(pixels)                              # (B, T, D), T = [1 +] G*G
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        hidden_states = [x]
        for layer in self.layers[:n_layers]:
            x = layer(x)
            hidden_states.append(x)
        return hidden_states

    def normalize(self, images):
        """Map images in [0, 1] to the input statistics the encoder was trained with."""
        mean = torch.tensor(self.config.image_mean, device=images.device, dtype=images.dtype)
        std = torch.tensor(self.config.image_std, device=images.device, dtype=images.dtype)
        return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a Hugging Face CLIP or SigLIP vision tower (or the vision half of the full model)."""
        config = ViTConfig(**hf.vit_fields(read_config(path), path))
        return load_weights(cls, config, path, hf.vit_key, dtype=dtype, device=device)
