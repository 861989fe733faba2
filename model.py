"""SparseCut: ViT -> fusion -> LLM with sparse shortcuts (arXiv 2602.00505).

One class serves every fusion mode (fusion.py: `llava`, `concat`, `deepstack`, `sparsecut`, one
unit each) and both attention modes (llm.py: `causal`, or EE-MLLM's `composite`, which also works
at inference on a model trained causally: EE-MLLM-F). The model does not branch on the mode: the
fusion unit says which views the ViT sees and how deep, and returns the input tokens and the
shortcut injections.

Sequence layout: the image's place in `input_ids` is a run of `config.image_token_id`, one per
visual token, as in transformers' LLaVA (a single one is widened to the run); its rows get the
visual tokens instead of embeddings. Ids without it put the image first: [image (N)][BOS text].
`forward` returns logits for the text positions only, in order.
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckpt import hf
from fusion import FUSIONS, image_views
from llm import LLM, KVCache, LLMConfig, image_rows, put_rows, take_rows
from vit import ViT, ViTConfig
from ckpt.weights import CheckpointError, atomic_directory, fill_weights, load_weights, read_config, version_1_names

CHOICES = {                        # and fusion: a key of fusion.FUSIONS
    "attention": ("causal", "composite"),
    "fuser": ("cross_mlp", "cross_attn"),
    "shortcut_projector": ("shared", "per_layer"),
    "shortcut_gate": ("none", "zero"),
}
CONFIG_VERSION = 2      # 1 (no field): shortcuts applied to sparsecut only, fusers at top level


@dataclass
class SparseCutConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    fusion: str = "sparsecut"
    attention: str = "causal"
    visual_ffn: bool = True        # composite attention: do visual tokens go through the FFN?
    fuser: str = "cross_mlp"
    cross_attn_heads: int = 4
    shortcuts: object = "default"  # "default" (the mode's own), a pattern name (shortcuts.PATTERNS)
    n_shortcuts: int = 8           # or [(vit_layer, llm_layer), ...]
    shortcut_projector: str = "shared"
    shortcut_gate: str = "none"
    deepstack_start: int = 1       # deepstack: the LLM layers its 4 stacks are added before
    deepstack_interval: int = 1
    input_layer: int = -2          # ViT hidden state feeding the input tokens: the penultimate
    visual_norm: bool = False      # visual tokens and shortcut features at unit RMS (not in the paper)
    input_map: bool = False        # a new linear map (d -> d) on the input tokens (not in the paper; README, "Three stages")
    image_positions: bool = False  # with input_map: a learned vector per visual token added by it (neither in the paper)
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    image_token_id: int = -200     # marks the image's place in input_ids (LLaVA's IMAGE_TOKEN_INDEX)
    template: str = "plain"        # the conversation template (conversation.py) it was trained with
    vit_path: str = ""             # Hugging Face directories of pretrained backbones (real runs);
    llm_path: str = ""             # their configs replace vit/llm, and checkpoints may omit them
    config_version: int = CONFIG_VERSION

    def __post_init__(self):
        self.check()

    def check(self):
        """Every choice and the shortcut plan, checked once, here (also after command-line edits)."""
        for name, allowed in {"fusion": tuple(FUSIONS), **CHOICES}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                                 f"not {getattr(self, name)!r}")
        v, l = self.vit, self.llm
        for whole, part, names in ((v.width, v.n_head, "vit.width / vit.n_head"),
                                   (v.image_size, v.patch_size, "vit.image_size / vit.patch_size"),
                                   (l.n_head if l.head_dim else l.width, l.n_head, "llm.width / llm.n_head"),
                                   (l.n_head, l.n_kv_head, "llm.n_head / llm.n_kv_head")):
            if part <= 0 or whole % part:
                raise ValueError(f"{names} must be a whole number, not {whole} / {part}")
        if min(v.n_layer, l.n_layer) < 1:
            raise ValueError("vit.n_layer and llm.n_layer must be at least 1")
        if self.image_positions and not self.input_map:
            raise ValueError("image_positions are added by the input map: give --input_map true with them")
        FUSIONS[self.fusion].make_plan(self)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SparseCutConfig fields {sorted(unknown)}")
        if d.get("config_version", 1) == 1 and d.get("fusion", "sparsecut") != "sparsecut":
            d["shortcuts"] = "none"                # version 1 ignored shortcuts outside sparsecut
        d["config_version"] = CONFIG_VERSION
        tuples = lambda part: {k: tuple(v) if isinstance(v, list) else v for k, v in part.items()}  # JSON lists
        d["vit"], d["llm"] = ViTConfig(**tuples(d.get("vit", {}))), LLMConfig(**tuples(d.get("llm", {})))
        return cls(**d)

    @property
    def n_image_tokens(self):
        """Visual tokens in the LLM sequence: G^2, or 5 G^2 for concat."""
        return FUSIONS[self.fusion].image_tokens(self.vit)


def init_weights(module, embedding_std=0.02):
    """From scratch: Linear/Conv2d weights N(0, 1/fan_in) (LeCun), zero biases, embeddings N(0, 0.02);
    a tied head is the Linear. (N(0, 0.02) everywhere shrank each map to 0.2-0.4x at tiny widths,
    and each attribute waited in a plateau whose length the seed decided: README, "Results".)"""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=embedding_std)


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


class InputMap(nn.Linear):
    """A new linear map on the input tokens, for a new LLM to read a frozen fusion through, and with
    `positions` a learned vector per visual token added after it (N(0, 0.25)): which cell a token
    is in, for an LLM that reads the image after the question (README, "Three stages")."""

    def __init__(self, width, n_tokens, positions):
        super().__init__(width, width)
        self.positions = nn.Parameter(torch.randn(n_tokens, width) * 0.5) if positions else None

    def forward(self, tokens):                                 # (B, N, d) -> (B, N, d)
        tokens = super().forward(tokens)
        return tokens if self.positions is None else tokens + self.positions


class SparseCut(nn.Module):
    """The multimodal model. forward(images, input_ids, labels) -> (logits, loss).

    The one constructor: it builds the ViT and the LLM unless they are given (pretrained
    backbones), and always the fusion unit of config.fusion; what it builds it initialises."""

    def __init__(self, config, vit=None, llm=None):
        super().__init__()
        self.config = config
        self.vit = vit if vit is not None else ViT(config.vit)
        self.llm = llm if llm is not None else LLM(config.llm)
        self.fusion = FUSIONS[config.fusion](config)
        self.input_map = InputMap(config.llm.width, config.n_image_tokens, config.image_positions) \
            if config.input_map else None
        for module, given in ((self.vit, vit), (self.llm, llm), (self.fusion, None), (self.input_map, None)):
            if given is None and module is not None:
                module.apply(init_weights)
        # The ViT runs only as deep as the deepest state used; the blocks above it and the final
        # layernorm (the model uses un-normalised states, as LLaVA does) get no gradient: frozen.
        for block in self.vit.layers[self.fusion.vit_depth:]:
            block.requires_grad_(False)
        self.vit.post_layernorm.requires_grad_(False)

    @classmethod
    def from_backbones(cls, config, device="cpu", dtype=torch.float32):
        """The paper's setting: pretrained ViT and LLM from config.vit_path / config.llm_path
        (Hugging Face directories), the fusion unit new. Backbones are loaded once, in place.
        Without llm_path the LLM is new (a pretrained encoder, an LLM from scratch: tiny-frozen)."""
        vit = ViT.from_pretrained(config.vit_path, dtype=dtype, device=device).train()
        config = replace(config, vit=vit.config)
        llm = None                                   # no llm_path (tiny-frozen): a new LLM
        if config.llm_path:
            llm = LLM.from_pretrained(config.llm_path, dtype=dtype, device=device).train()
            raw = read_config(config.llm_path)
            eos = raw.get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) else eos
            ids = {"bos_id": raw.get("bos_token_id"), "eos_id": eos, "pad_id": raw.get("pad_token_id")}
            config = replace(config, llm=llm.config, **{k: v for k, v in ids.items() if v is not None})
        with torch.device(device):
            return cls(config, vit=vit, llm=llm).to(dtype)

    def encode_images(self, images):
        """images (B, 3, H, W) in [0, 1] -> input tokens (B, N, d), injections {llm_layer: (B, N, d)}."""
        views = image_views(images, self.config.vit.image_size, self.fusion.high_res)  # (V*B, 3, R, R)
        hidden = self.vit(self.vit.normalize(views), self.fusion.vit_depth)  # vit_depth + 1 x (V*B, T, D_vit)
        tokens, injected = self.fusion(hidden, images.shape[0])
        if self.input_map is not None:           # a new LLM reads a frozen fusion's tokens through it
            tokens = self.fusion.norm(self.input_map(tokens))
        return tokens, injected

    def place_image(self, input_ids, n_image, labels=None, attention_mask=None):
        """Each row's image start (B,) and the ids, labels and mask with the image run in place:
        found where input_ids hold config.image_token_id (one id is widened to n_image), or put
        first when no row has one (then the leading BOS is not a target, as before)."""
        marker = self.config.image_token_id
        if not (input_ids == marker).any():                               # the whole run before it all
            first = lambda t, fill: torch.cat([t.new_full((t.shape[0], n_image), fill), t], dim=1)
            input_ids = first(input_ids, marker)
            labels = first(labels, -100).index_fill(1, labels.new_tensor([n_image]), -100) if labels is not None else None
            attention_mask = first(attention_mask.bool(), True) if attention_mask is not None else None
        if n_image != 1 and bool(((input_ids == marker).sum(1) == 1).all()):
            at = [int(row.nonzero()) for row in input_ids == marker]      # widen one id to the run
            widen = lambda t, fill: torch.stack([torch.cat([row[:p], row[p:p + 1].new_full((n_image,), fill),
                                                            row[p + 1:]]) for row, p in zip(t, at)])
            input_ids = widen(input_ids, marker)
            labels = widen(labels, -100) if labels is not None else None
            attention_mask = widen(attention_mask.bool(), True) if attention_mask is not None else None
        is_image = input_ids == marker
        starts = is_image.int().argmax(1)                                  # (B,) first image row
        run = starts[:, None] + torch.arange(n_image, device=starts.device)   # where the run must be
        if not bool((is_image.sum(1) == n_image).all()) or int(run.max()) >= input_ids.shape[1] \
                or not bool(is_image.gather(1, run).all()):
            raise ValueError(f"each row of input_ids must mark the image with one run of {n_image} image_token_id "
                             f"({marker}) tokens, or with one of them; found {is_image.sum(1).tolist()}")
        return starts, input_ids, labels, attention_mask

    def embed(self, images, input_ids, labels=None, attention_mask=None):
        """The LLM input: token embeddings with the visual tokens in the image rows (B, T, d), the
        image span, injections, and the ids/labels/mask with the image run in place."""
        visual, injected = self.encode_images(images)            # (B, N, d)
        starts, input_ids, labels, attention_mask = self.place_image(input_ids, visual.shape[1], labels, attention_mask)
        span = (starts, starts + visual.shape[1])
        image_index, text_index = image_rows(span, *input_ids.shape, input_ids.device)
        h = self.llm.embed_tokens(input_ids.masked_fill(input_ids == self.config.image_token_id, self.config.pad_id))
        h = put_rows(h, image_index, visual.to(h.dtype))                   # (B, T, d)
        return h, span, injected, text_index, labels, attention_mask

    def forward(self, images, input_ids, labels=None, attention=None, attention_mask=None):
        """images (B, 3, H, W) in [0, 1]; input_ids, labels (B, T), labels -100 where no loss;
        attention_mask (B, T) bool, False at padding (needed only where padding precedes text).

        Returns logits (B, T_text, vocab) for the text positions and the mean next-token loss,
        each token predicted from the row before it in the whole sequence (image rows included).
        """
        c = self.config
        h, span, injected, text_index, labels, attention_mask = self.embed(images, input_ids, labels, attention_mask)
        positions = None if attention_mask is None else (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.llm(inputs_embeds=h, position_ids=positions, attention_mask=attention_mask,
                          injections=injected, image_span=span, attention=attention or c.attention,
                          visual_ffn=c.visual_ffn, return_hidden=True)  # (B, T, d)
        logits = self.llm.lm_head(take_rows(hidden, text_index))  # (B, T_text, vocab)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]                               # (B, T - 1)
            scored = targets != -100
            loss = F.cross_entropy(self.llm.lm_head(hidden[:, :-1][scored]).float(), targets[scored])
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
    def generate(self, images, prompt_ids=None, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
                 prompt_mask=None, generator=None, attention=None, eos_id=None, repetition_penalty=1.0):
        """Continue each prompt (it may mark the image's place, model docstring) with a KV cache: one
        list of new token ids per image, up to (not including) eos_id (the config's EOS, or a
        template's end of turn). Prompts of different lengths are left-padded, with positions that
        skip the padding, so each row decodes as it would alone. repetition_penalty > 1 (transformers'
        name) divides the logits of the tokens generated so far, multiplies them where negative."""
        c = self.config
        eos_id = c.eos_id if eos_id is None else eos_id
        prompts = self.prompt_lists(prompt_ids, prompt_mask, images.shape[0])
        P = max(len(p) for p in prompts)
        device = images.device
        ids = torch.full((len(prompts), P), c.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(len(prompts), P, dtype=torch.bool, device=device)
        for b, prompt in enumerate(prompts):                               # left padding
            ids[b, P - len(prompt):], valid[b, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long), True
        h, span, injected, _, _, valid = self.embed(images, ids, attention_mask=valid)  # (B, P', d)
        B, L, _ = h.shape
        padded = not bool(valid.all())
        valid = torch.cat([valid, valid.new_ones(B, max_new_tokens)], dim=1)
        positions = (valid[:, :L].long().cumsum(1) - 1).clamp(min=0)        # skip the padding
        cache = KVCache(c.llm, B, L + max_new_tokens, device, h.dtype)
        hidden = self.llm(inputs_embeds=h, position_ids=positions, kv_cache=cache,
                          attention_mask=valid[:, :L] if padded else None, injections=injected,
                          image_span=span, attention=attention or c.attention,
                          visual_ffn=c.visual_ffn, return_hidden=True)
        logits = self.llm.lm_head(hidden[:, -1])                           # (B, vocab): last row only
        next_position = positions[:, -1:] + 1                              # (B, 1)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out, seen = [], torch.zeros_like(logits, dtype=torch.bool)         # (B, vocab): generated so far
        for step in range(max_new_tokens):
            logits = torch.where(seen, logits * torch.where(logits > 0, 1 / repetition_penalty, repetition_penalty), logits)
            token = sample_next(logits, temperature, top_k, top_p, generator)
            seen[torch.arange(B, device=device), token] = True
            token = token.masked_fill(done, c.pad_id)
            done |= token == eos_id
            out.append(token)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            length = cache.length + 1
            logits = self.llm(token[:, None], position_ids=next_position, kv_cache=cache,
                              attention_mask=valid[:, :length] if padded else None)[:, -1]
            next_position = next_position + 1
        tokens = torch.stack(out, dim=1).tolist()                          # (B, steps)
        return [row[:row.index(eos_id)] if eos_id in row else row for row in tokens]

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
        """Load a directory written by save_pretrained, or a Hugging Face LLaVA-1.5 directory.
        overrides replace config fields (e.g. attention="composite" for training-free composite
        attention on a causal model); config, if given, is the config the checkpoint must match
        (resuming a run), or, for a LLaVA directory, the run it starts (its ViT and LLM)."""
        raw = read_config(path)
        if raw.get("model_type") == "llava":
            return hf.load_llava(cls, SparseCutConfig, path, raw, device, dtype, config, **overrides)
        if config is None:
            try:
                config = SparseCutConfig.from_dict(raw)
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{path}/config.json is not a SparseCut config ({error})") from None
            config = replace(config, **overrides)                 # a bad override names itself
        names = version_1_names(config.fusion) if raw.get("config_version", 1) == 1 else lambda name: name
        if not config.vit_path:
            return load_weights(cls, config, path, names, dtype=dtype, device=device)
        model = cls.from_backbones(config, device, dtype)
        return fill_weights(model, path, names, dtype=dtype, device=device,
                            optional_prefixes=("vit.", "llm.") if config.llm_path else ("vit.",))
