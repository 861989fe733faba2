"""SparseCut: ViT -> multi-grained fusion -> LLM with sparse shortcuts (arXiv 2602.00505).

One class serves the three fusion modes compared in the paper and both attention modes:
- `llava`      LLaVA-1.5: penultimate ViT layer of the low-res view, projector, N = G^2 tokens.
- `concat`     every view's tokens in the LLM input: N = 5 G^2 tokens (the costly alternative).
- `sparsecut`  multi-grained fusion of the penultimate layer as input tokens (N = G^2), plus the
               fused features of the tapped ViT layers added at the image positions of chosen LLM
               layers (section 3.3). With `shortcuts="none"` it is fusion only.
- `attention`  `causal`, or EE-MLLM's `composite` (see llm.py), usable on any fusion mode and at
               inference on a model trained causally (EE-MLLM-F).

Sequence layout: [image tokens (N)][text tokens (T)]; the text starts with BOS. `forward` returns
logits for the text positions only, so logits[:, j] predicts input_ids[:, j + 1].
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusion import image_views, make_fuser, patch_tokens, split_views
from llm import LLM, KVCache, LLMConfig
from shortcuts import ShortcutGates, injections, shortcut_plan
from vit import ViT, ViTConfig
from weights import CheckpointError, atomic_directory, fill_weights, load_weights, read_config

CHOICES = {
    "fusion": ("llava", "concat", "sparsecut"),
    "attention": ("causal", "composite"),
    "fuser": ("cross_mlp", "cross_attn"),
    "shortcut_projector": ("shared", "per_layer"),
    "shortcut_gate": ("none", "zero"),
}


@dataclass
class SparseCutConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    fusion: str = "sparsecut"
    attention: str = "causal"
    visual_ffn: bool = True        # composite attention: do visual tokens go through the FFN?
    fuser: str = "cross_mlp"
    cross_attn_heads: int = 4
    shortcuts: object = "uniform"  # a pattern name (shortcuts.PATTERNS) or [(vit_layer, llm_layer)]
    n_shortcuts: int = 8
    shortcut_projector: str = "shared"
    shortcut_gate: str = "none"
    input_layer: int = -2          # ViT hidden state feeding the input tokens: the penultimate
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    vit_path: str = ""             # Hugging Face directories of pretrained backbones (real runs);
    llm_path: str = ""             # their configs replace vit/llm, and checkpoints may omit them

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                                 f"not {getattr(self, name)!r}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SparseCutConfig fields {sorted(unknown)}")
        d["vit"] = ViTConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in d.get("vit", {}).items()})
        d["llm"] = LLMConfig(**d.get("llm", {}))
        return cls(**d)

    @property
    def n_image_tokens(self):
        """Visual tokens in the LLM sequence: G^2, or 5 G^2 for concat."""
        return self.vit.grid ** 2 * (5 if self.fusion == "concat" else 1)


def init_weights(module, std=0.02):
    """From-scratch initialisation (as Hugging Face's initializer_range): N(0, std), zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token per row from logits (B, vocab): greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p               # keep the smallest nucleus
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class SparseCut(nn.Module):
    """The multimodal model. forward(images, input_ids, labels) -> (logits, loss)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vit = ViT(config.vit)
        self.llm = LLM(config.llm)
        shortcuts = config.shortcuts if config.fusion == "sparsecut" else "none"
        self.plan = shortcut_plan(shortcuts, config.vit.n_layer, config.llm.n_layer, config.n_shortcuts)
        per_layer = config.shortcut_projector == "per_layer"
        # Slot 0 makes the input tokens; slot k (per_layer) the k-th shortcut's features.
        self.fusers = nn.ModuleList(make_fuser(config) for _ in range(1 + len(self.plan) * per_layer))
        self.gates = ShortcutGates(len(self.plan)) if config.shortcut_gate == "zero" and self.plan else None
        self.apply(init_weights)
        self.input_layer = config.input_layer % (config.vit.n_layer + 1)   # -2 -> n_layer - 1
        self.vit_depth = max([self.input_layer] + [vit_layer for vit_layer, _ in self.plan])
        self.freeze_unused_vit()

    def freeze_unused_vit(self):
        """The ViT runs only as deep as the deepest state used; the blocks above it and the final
        layernorm (the model uses un-normalised states, as LLaVA does) get no gradient: frozen."""
        for block in self.vit.layers[self.vit_depth:]:
            block.requires_grad_(False)
        self.vit.post_layernorm.requires_grad_(False)

    @classmethod
    def from_backbones(cls, config, device="cpu", dtype=torch.float32):
        """The paper's setting: pretrained ViT and LLM from config.vit_path / config.llm_path
        (Hugging Face directories), fusion and gates initialised from scratch. Nothing is
        allocated twice: the model is built on the meta device and the backbones are put in."""
        vit = ViT.from_pretrained(config.vit_path, dtype=dtype, device=device)
        llm = LLM.from_pretrained(config.llm_path, dtype=dtype, device=device)
        hf = read_config(config.llm_path)
        eos = hf.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        ids = {"bos_id": hf.get("bos_token_id"), "eos_id": eos, "pad_id": hf.get("pad_token_id")}
        config = replace(config, vit=vit.config, llm=llm.config,
                         **{k: v for k, v in ids.items() if v is not None})
        with torch.device("meta"):
            model = cls(config)
        model.vit, model.llm = vit.train(), llm.train()
        model.freeze_unused_vit()
        with torch.device(device):                               # the new parts, for real
            model.fusers = nn.ModuleList(make_fuser(config) for _ in model.fusers)
            model.gates = ShortcutGates(len(model.plan)) if model.gates is not None else None
        model.fusers.apply(init_weights)
        return model.to(dtype)

    def encode_images(self, images):
        """images (B, 3, H, W) in [0, 1] -> input tokens (B, N, d), injections {llm_layer: (B, N, d)}."""
        c = self.config
        B = images.shape[0]
        views = image_views(images, c.vit.image_size, high_res=c.fusion != "llava")  # (V*B, 3, R, R)
        hidden = self.vit(self.vit.normalize(views), self.vit_depth)  # vit_depth + 1 x (V*B, T, D_vit)
        tokens = lambda layer: patch_tokens(hidden[layer], c.vit.class_token)         # (V*B, G*G, D_vit)
        if c.fusion == "llava":
            return self.fusers[0](tokens(self.input_layer)), {}
        if c.fusion == "concat":
            all_views = tokens(self.input_layer).view(5, B, -1, c.vit.width).transpose(0, 1)
            return self.fusers[0](all_views.flatten(1, 2)), {}  # (B, 5 G*G, d)
        fuser = lambda slot: self.fusers[slot if len(self.fusers) > 1 else 0]
        inputs = fuser(0)(*split_views(tokens(self.input_layer), B))                    # (B, G*G, d)
        fused = [fuser(1 + k)(*split_views(tokens(vit_layer), B))
                 for k, (vit_layer, _) in enumerate(self.plan)]
        return inputs, injections(self.plan, fused, self.gates)

    def forward(self, images, input_ids, labels=None, attention=None):
        """images (B, 3, H, W) in [0, 1]; input_ids, labels (B, T), labels -100 where no loss.

        Returns logits (B, T, vocab) for the text positions and the mean next-token loss.
        """
        c = self.config
        visual, injected = self.encode_images(images)            # (B, N, d)
        N = visual.shape[1]
        h = torch.cat([visual, self.llm.embed_tokens(input_ids)], dim=1)   # (B, N + T, d)
        hidden = self.llm(inputs_embeds=h, injections=injected, image_span=(0, N),
                          attention=attention or c.attention, visual_ffn=c.visual_ffn,
                          return_hidden=True)
        logits = self.llm.lm_head(hidden[:, N:])                 # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return logits, loss

    def prompt_lists(self, prompt_ids, prompt_mask, batch):
        """Prompts as lists of ids: None -> [BOS]; a (B, T) tensor with an optional mask (padding
        on either side) -> its unpadded rows; a list of lists as given."""
        if prompt_ids is None:
            return [[self.config.bos_id] for _ in range(batch)]
        if torch.is_tensor(prompt_ids):
            mask = torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
            return [row[keep].tolist() for row, keep in zip(prompt_ids, mask)]
        return [list(p) for p in prompt_ids]

    @torch.no_grad()
    def generate(self, images, prompt_ids=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 top_p=None, prompt_mask=None, generator=None, attention=None):
        """Caption images with a KV cache. Returns one list of new token ids per image, up to
        (not including) EOS. Prompts of different lengths are left-padded after the image, with
        positions that skip the padding, so each row decodes as it would alone."""
        c = self.config
        visual, injected = self.encode_images(images)            # (B, N, d)
        B, N, _ = visual.shape
        prompts = self.prompt_lists(prompt_ids, prompt_mask, B)
        P = max(len(p) for p in prompts)
        device = visual.device
        ids = torch.full((B, P), c.pad_id, dtype=torch.long, device=device)
        valid = torch.ones(B, N + P + max_new_tokens, dtype=torch.bool, device=device)
        for b, prompt in enumerate(prompts):
            ids[b, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            valid[b, N:N + P - len(prompt)] = False              # left padding
        padded = not bool(valid.all())
        positions = (valid[:, :N + P].long().cumsum(1) - 1).clamp(min=0)  # skip the padding
        cache = KVCache(c.llm, B, N + P + max_new_tokens, device, visual.dtype)
        h = torch.cat([visual, self.llm.embed_tokens(ids)], dim=1)         # (B, N + P, d)
        hidden = self.llm(inputs_embeds=h, position_ids=positions, kv_cache=cache,
                          attention_mask=valid[:, :N + P] if padded else None, injections=injected,
                          image_span=(0, N), attention=attention or c.attention,
                          visual_ffn=c.visual_ffn, return_hidden=True)
        logits = self.llm.lm_head(hidden[:, -1])                           # (B, vocab): last row only
        next_position = positions[:, -1:] + 1                              # (B, 1)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            token = token.masked_fill(done, c.pad_id)
            done |= token == c.eos_id
            out.append(token)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            length = cache.length + 1
            logits = self.llm(token[:, None], position_ids=next_position, kv_cache=cache,
                              attention_mask=valid[:, :length] if padded else None)[:, -1]
            next_position = next_position + 1
        tokens = torch.stack(out, dim=1).tolist()                          # (B, steps)
        return [row[:row.index(c.eos_id)] if c.eos_id in row else row for row in tokens]

    def backbones_by_path(self):
        """Prefixes of the frozen backbones that config.vit_path / llm_path can rebuild."""
        parts = (("vit.", self.config.vit_path, self.vit), ("llm.", self.config.llm_path, self.llm))
        return tuple(prefix for prefix, path, module in parts
                     if path and not any(p.requires_grad for p in module.parameters()))

    def save_pretrained(self, out_dir, tokenizer=None, write_extra=None, state_dict=None):
        """Write config.json, model.safetensors (and tokenizer.json) atomically into out_dir.

        Frozen backbones loaded from vit_path / llm_path are not written (a stage-1 checkpoint of
        a 7B model holds the fusion only); from_pretrained reads them from those paths again.
        write_extra(tmp_dir), if given, adds files (training state) before the directory is
        swapped in, so a crash at any point leaves the previous checkpoint whole."""
        from safetensors.torch import save_file
        tied = self.config.llm.tie_embeddings
        skip = self.backbones_by_path()
        state = {name: t.detach().contiguous()
                 for name, t in (state_dict or self.state_dict()).items()
                 if not (tied and name == "llm.lm_head.weight") and not name.startswith(skip)}
        with atomic_directory(out_dir) as tmp:
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self.config.to_dict(), f, indent=2)
            if tokenizer is not None:
                tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            if write_extra is not None:
                write_extra(tmp)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, config=None, **overrides):
        """Load a directory written by save_pretrained. overrides replace config fields (e.g.
        attention="composite" for training-free composite attention on a causal model); config,
        if given, is the config the checkpoint must match (resuming a run)."""
        if config is None:
            raw = read_config(path)
            try:
                config = SparseCutConfig.from_dict({**raw, **overrides})
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{path}/config.json is not a SparseCut config ({error})") from None
        if not (config.vit_path and config.llm_path):
            return load_weights(cls, config, path, dtype=dtype, device=device)
        model = cls.from_backbones(config, device, dtype)
        return fill_weights(model, path, dtype=dtype, device=device,
                            optional_prefixes=("vit.", "llm."))
