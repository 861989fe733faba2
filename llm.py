"""Llama / Qwen2-style decoder with a KV cache, shortcut injection and composite attention.

Follows Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM`: RMSNorm, rotary embeddings in the
`rotate_half` convention, grouped-query attention, SwiGLU MLP, optional q/k/v bias (Qwen2), tied
or untied output head. Two additions serve the multimodal models:

- `injections={llm_layer: (B, N, D)}` adds a tensor at the image positions just before that layer
  runs (SparseCut's sparse shortcuts, paper section 3.3).
- `attention="composite"` is EE-MLLM's composite attention (arXiv 2408.11795, section 3): visual
  tokens issue no queries; text queries see the earlier text and, once the image has come, every
  visual key (causal order: a system prompt before the image does not see it); each visual
  token is updated by the parameter-free aligner h_v + W_o W_v norm(h_v) (attention of a token to
  itself alone), then by the layer's FFN unless `visual_ffn=False`.

The image occupies one contiguous run of positions in each row, `image_span=(start, end)`: start
an int (the same in every row) or a (B,) tensor (its own in each row, e.g. after left padding);
end - start visual tokens in every row.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ckpt import hf
from ckpt.weights import load_weights, read_config


@dataclass
class LLMConfig:
    vocab_size: int = 256
    width: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2            # grouped-query attention: n_head / n_kv_head queries per key
    mlp_dim: int = 344
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False        # Qwen2: True
    qk_norm: bool = False         # Qwen3: RMSNorm of each query and key head before RoPE
    tie_embeddings: bool = True
    head_dim: int = 0             # 0: width // n_head
    rope_llama3: tuple = ()       # Llama 3.x: (factor, low_freq_factor, high_freq_factor, original context)

    @property
    def dim_per_head(self):
        return self.head_dim or self.width // self.n_head


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                        # one fused op instead of seven
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@functools.lru_cache(maxsize=8)
def inverse_frequencies(head_dim, theta, device, llama3=()):
    """theta^(-2i/d); with Llama 3's scaling, long wavelengths (beyond the original context / low
    factor) are slowed by `factor`, short ones (below it / high factor) kept, the band between
    interpolated (as transformers' `_compute_llama3_parameters`)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if not llama3:
        return inv_freq
    factor, low, high, context = llama3
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)   # 0: slowed, 1: kept
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(position_ids, head_dim, theta, dtype, llama3=()):
    """Rotary tables for integer positions (B, T) -> cos, sin of shape (B, 1, T, head_dim)."""
    inv_freq = inverse_frequencies(head_dim, theta, position_ids.device, llama3)
    freqs = position_ids.float()[..., None] * inv_freq           # (B, T, head_dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)                   # (B, T, head_dim)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_head, max_len, head_dim) each."""

    def __init__(self, config, batch, max_len, device, dtype):
        shape = (batch, config.n_kv_head, max_len, config.dim_per_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0                                          # positions filled so far

    def update(self, layer, k, v):
        """Write the new keys/values at [length, length + T) and return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def take_rows(t, index, dim=1):
    """t's rows at index (B, n) along dim (1 for (B, T, D), 2 for (B|1, h, T, X)) -> (B, ..., n, ...)."""
    if dim == 1:
        return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))
    t = t.expand(index.shape[0], *t.shape[1:])
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))


def put_rows(t, index, rows):
    """t (B, T, D) with its rows at index (B, n) replaced by rows (B, n, D); not in place."""
    return t.scatter(1, index[..., None].expand(-1, -1, t.shape[-1]), rows)


def image_rows(image_span, batch, length, device):
    """image_span (start, end) -> image_index (B, N) and text_index (B, T - N), positions in the
    chunk; start an int or a (B,) tensor of per-row starts."""
    start, end = image_span
    n = int(end - start) if not torch.is_tensor(end) else int((end - start).flatten()[0])
    start = torch.as_tensor(start, device=device).reshape(-1, 1).expand(batch, 1)
    image_index = start + torch.arange(n, device=device)                # (B, N)
    is_image = torch.zeros(batch, length, dtype=torch.bool, device=device).scatter(1, image_index, True)
    text_index = (~is_image).nonzero()[:, 1].view(batch, length - n)    # (B, T - N), in order
    return image_index, text_index


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, through scaled_dot_product_attention."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.config, self.layer_index = config, layer_index
        hd, D = config.dim_per_head, config.width
        self.q_proj = nn.Linear(D, config.n_head * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, config.n_kv_head * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, config.n_kv_head * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * hd, D, bias=False)
        if config.qk_norm:                                        # Qwen3
            self.q_norm, self.k_norm = RMSNorm(hd, config.norm_eps), RMSNorm(hd, config.norm_eps)

    def heads(self, x, n):
        B, T, _ = x.shape
        return x.view(B, T, n, self.config.dim_per_head).transpose(1, 2)   # (B, n, T, hd)

    def merge(self, y):
        B, n, T, hd = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, n * hd))        # (B, T, D)

    def queries(self, x, cos, sin):
        q = self.heads(self.q_proj(x), self.config.n_head)                 # (B, H, T, hd)
        return apply_rope(self.q_norm(q) if self.config.qk_norm else q, cos, sin)

    def keys_values(self, x, cos, sin, cache):
        """Keys (rotated) and values of all rows of x, appended to the cache when there is one."""
        c = self.config
        k = self.heads(self.k_proj(x), c.n_kv_head)                        # (B, n_kv, T, hd)
        k = apply_rope(self.k_norm(k) if c.qk_norm else k, cos, sin)
        v = self.heads(self.v_proj(x), c.n_kv_head)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)                     # (B, n_kv, T_k, hd)
        return k, v

    def forward(self, x, cos, sin, mask, cache):
        """Causal attention for every row. mask: None (plain causal), or bool (B|1, 1, T, T_k)."""
        q = self.queries(x, cos, sin)                                       # (B, H, T, hd)
        k, v = self.keys_values(x, cos, sin, cache)
        square = k.shape[2] == q.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                           is_causal=mask is None and square)
        return self.merge(y)

    def composite(self, x, cos, sin, mask, cache, rows):
        """EE-MLLM composite attention: only text rows issue queries; visual rows get the aligner.
        rows: (image_index (B, N), text_index (B, T - N)), positions in x.

        No visual-by-visual score is formed: the score matrix is (T_text, T_k), not (T, T_k).
        """
        image_index, text_index = rows
        k, v = self.keys_values(x, cos, sin, cache)                         # all rows: (B, n_kv, T_k, hd)
        x_text = take_rows(x, text_index)                                   # (B, T_text, D)
        q = self.queries(x_text, take_rows(cos, text_index, 2), take_rows(sin, text_index, 2))
        y_text = self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=take_rows(mask, text_index, 2),
                                                           enable_gqa=True))  # (B, T_text, D)
        # Aligner: a visual token attending to itself alone returns its own value, W_o W_v norm(h_v).
        offset = k.shape[2] - x.shape[1]                                    # cached positions before x
        v_image = take_rows(v, offset + image_index, 2)                     # (B, n_kv, N, hd)
        v_image = v_image.repeat_interleave(self.config.n_head // self.config.n_kv_head, dim=1)
        return put_rows(put_rows(torch.empty_like(x), text_index, y_text), image_index, self.merge(v_image))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.width, config.mlp_dim, bias=False)
        self.up_proj = nn.Linear(config.width, config.mlp_dim, bias=False)
        self.down_proj = nn.Linear(config.mlp_dim, config.width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.input_layernorm = RMSNorm(config.width, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.width, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, cos, sin, mask, cache, composite_rows=None, visual_ffn=True):
        """composite_rows: None (causal), or (image_index, text_index) for composite attention."""
        x = self.input_layernorm(h)
        if composite_rows is None:
            h = h + self.self_attn(x, cos, sin, mask, cache)
        else:
            h = h + self.self_attn.composite(x, cos, sin, mask, cache, composite_rows)
        if composite_rows is None or visual_ffn:
            return h + self.mlp(self.post_attention_layernorm(h))
        text_index = composite_rows[1]                            # the FFN skips visual rows
        h_text = take_rows(h, text_index)
        return put_rows(h, text_index, h_text + self.mlp(self.post_attention_layernorm(h_text)))


def build_mask(T, start, key_valid, device):
    """Bool mask (B|1, 1, T, start + T): query i (at cache index start + i) sees keys <= itself.

    key_valid (B, start + T), False at padding; every row may also see itself, so that padding
    rows never have an empty softmax. Returns None where no mask is needed: the plain causal
    square (SDPA's is_causal fast path) or one new token that sees the whole cache.
    """
    T_k = start + T
    if key_valid is None and (start == 0 or T == 1):
        return None
    q_index = torch.arange(start, T_k, device=device)[:, None]
    k_index = torch.arange(T_k, device=device)[None, :]
    mask = (k_index <= q_index)[None, None]                      # (1, 1, T, T_k)
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :]) | (k_index == q_index)
    return mask


class LLM(nn.Module):
    """Decoder-only language model. forward(...) -> logits (B, T, vocab)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.width, config.norm_eps)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpoint_layers = False        # activation checkpointing while training

    def forward(self, input_ids=None, *, inputs_embeds=None, position_ids=None, kv_cache=None,
                attention_mask=None, injections=None, image_span=None, attention="causal",
                visual_ffn=True, return_hidden=False):
        """Run the decoder.

        input_ids (B, T) or inputs_embeds (B, T, D); position_ids (B, T), default: the cache
        offset onwards; kv_cache: a KVCache, filled and advanced; attention_mask (B, T_k) bool,
        False at padding (T_k = cached + T); injections {llm_layer: (B, N, D)} added at the image
        rows image_span=(start, end) of this chunk (start: int or (B,)) before that layer;
        attention: causal | composite.
        Returns logits (B, T, vocab), or the final normed hidden states with return_hidden=True.
        """
        if attention not in ("causal", "composite"):
            raise ValueError(f"attention must be 'causal' or 'composite', not {attention!r}")
        if attention == "composite" and image_span is None:
            raise ValueError("composite attention needs image_span=(start, end), the visual "
                             "tokens' positions; use (0, 0) for a text-only sequence")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, D)
        B, T, D = h.shape
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=h.device).expand(B, T)
        c = self.config
        cos, sin = rope_cos_sin(position_ids, c.dim_per_head, c.rope_theta, h.dtype, c.rope_llama3)
        rows = image_rows(image_span, B, T, h.device) if image_span is not None else None
        mask = build_mask(T, start, attention_mask, h.device)
        composite_rows = rows if attention == "composite" else None
        if composite_rows is not None and mask is None:           # text rows are picked from it
            mask = build_mask(T, start, torch.ones(B, start + T, dtype=torch.bool, device=h.device), h.device)
        for i, layer in enumerate(self.layers):
            if injections and i in injections:                    # image rows only
                index = rows[0][..., None].expand(-1, -1, D)
                h = h.scatter_add(1, index, injections[i].to(h.dtype))
            if self.checkpoint_layers and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, kv_cache, composite_rows, visual_ffn,
                               use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, kv_cache, composite_rows, visual_ffn)
        if kv_cache is not None:
            kv_cache.length += T
        h = self.norm(h)
        return h if return_hidden else self.lm_head(h)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a Hugging Face LlamaForCausalLM or Qwen2ForCausalLM directory."""
        config = LLMConfig(**hf.llm_fields(read_config(path), path))
        return load_weights(cls, config, path, hf.llm_key, dtype=dtype, device=device)
