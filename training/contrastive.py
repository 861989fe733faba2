"""Contrastive image-caption pretraining of a tiny ViT, the way CLIP was made (Radford et al. 2021,
section 2.3, figure 3): the paper's frozen, pretrained encoder at tiny scale (DESIGN.md 6b).

An image tower (the ViT, on the low-resolution view only, so it never needs fine detail) and a
text tower (a small causal decoder from llm.py) map a batch of images and their captions to unit
vectors; a symmetric cross-entropy over the B x B cosine similarities, with a learned temperature,
pulls each image toward its own caption. As in CLIP, the image embedding is the last layer's class
token after the final layernorm, the text embedding the last hidden state at the EOS token, each
followed by a linear projection.

With `clip.objective` other than `clip` (tiny-premise) colour is made a nuisance and the layer
LLaVA reads is pressed to drop it (training/premise.py): each scene is shown twice, the second
time recoloured, both against the caption without its colour words.

The encoder is written as a Hugging Face `CLIPVisionModel` directory (`save_clip_vision`), so a run
loads it with `--vit_path` exactly as it loads OpenAI's CLIP, and `transformers` can load it too.
"""

import json
import math
import os
import time
from dataclasses import asdict, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from config import cosine_schedule
from sources.data import batch_captions, encode
from fusion import resize
from llm import LLM, LLMConfig
from model import init_weights
from vit import ViT
from ckpt.weights import atomic_directory
from training.premise import OBJECTIVES, PremiseHeads, premise_loss, recoloured_pairs

PRETRAIN_SEED = 900_001               # the encoder's images are not the runs' training images


class ContrastivePair(nn.Module):
    """Image tower + text tower + projections + temperature. forward -> (loss, accuracy)."""

    def __init__(self, vit_config, vocab_size, config):
        super().__init__()
        self.vit = ViT(vit_config)
        self.text = LLM(LLMConfig(vocab_size=vocab_size, width=config.text_width, n_layer=config.text_layers,
                                  n_head=2, n_kv_head=2, mlp_dim=4 * config.text_width))
        self.image_proj = nn.Linear(vit_config.width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))      # CLIP's initial 1/T

    def embed_views(self, images):
        """images (V, 3, H, W) in [0, 1] -> unit vectors (V, E) from the low-res view only, the
        low-res views (V, 3, R, R) and the ViT's states."""
        low = resize(images, self.vit.config.image_size)
        hidden = self.vit(self.vit.normalize(low))                           # n_layer + 1 x (V, 1 + G*G, D)
        return F.normalize(self.image_proj(self.vit.post_layernorm(hidden[-1][:, 0])), dim=-1), low, hidden

    def embed_texts(self, input_ids, eos_index):
        """input_ids (B, T) right-padded; eos_index (B,) -> unit vectors (B, E)."""
        hidden = self.text(input_ids, return_hidden=True)                    # (B, T, w)
        at_eos = hidden[torch.arange(len(input_ids)), eos_index]             # (B, w)
        return F.normalize(self.text_proj(at_eos), dim=-1)

    def losses(self, images, input_ids, eos_index):
        """forward's loss and accuracy for V = k x B images, k views of each caption's scene
        (view-major), and what training/premise.py reads: the low-res views, the ViT's states, the
        text embeddings (B, E) and each view's caption index (V,)."""
        image, low, hidden = self.embed_views(images)                    # (V, E)
        text = self.embed_texts(input_ids, eos_index)                        # (B, E)
        logits = image @ text.T * self.log_scale.clamp(max=math.log(100)).exp()  # (V, B)
        views = len(image) // len(text)
        target = torch.arange(len(text), device=logits.device).repeat(views)
        to_image = sum(F.cross_entropy(part.T, target[:len(text)]) for part in logits.split(len(text)))
        loss = (F.cross_entropy(logits, target) + to_image / views) / 2
        return loss, (logits.argmax(1) == target).float().mean(), low, hidden, text, target

    def forward(self, images, input_ids, eos_index):
        return self.losses(images, input_ids, eos_index)[:2]


def hf_clip_vision_key(name):
    """Our ViT tensor name -> the Hugging Face CLIPVisionModel name (the inverse of hf.vit_key)."""
    name = name.replace("layers.", "encoder.layers.").replace("pre_layernorm.", "pre_layrnorm.")
    return "vision_model." + name


def save_clip_vision(vit, path, provenance):
    """Write the ViT as a CLIPVisionModel directory (config.json, model.safetensors), atomically."""
    c = vit.config
    hf_config = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                 "hidden_size": c.width, "intermediate_size": c.mlp_dim, "num_hidden_layers": c.n_layer,
                 "num_attention_heads": c.n_head, "image_size": c.image_size, "patch_size": c.patch_size,
                 "num_channels": 3, "hidden_act": c.act, "layer_norm_eps": c.norm_eps,
                 "projection_dim": c.width, "sparsecut_pretraining": provenance}
    preprocessor = {"image_mean": list(c.image_mean), "image_std": list(c.image_std),
                    "crop_size": c.image_size, "size": c.image_size}
    tensors = {hf_clip_vision_key(k): v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    with atomic_directory(path) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, content in (("config.json", hf_config), ("preprocessor_config.json", preprocessor)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)


def pretrain_encoder(train_config, data, path, say=print):
    """Train a fresh ViT (train_config.model.vit) contrastively on data's captions; save to path."""
    with torch.random.fork_rng():                 # the run's own random stream stays untouched
        torch.manual_seed(train_config.clip.seed)
        return _pretrain(train_config, data, path, say)


def _pretrain(train_config, data, path, say):
    c, m = train_config.clip, train_config.model
    pair = ContrastivePair(m.vit, data.tokenizer.get_vocab_size(), c)
    pair.apply(init_weights)
    parameters, heads = list(pair.parameters()), None
    if OBJECTIVES[c.objective] is not None:       # what the premise objectives train beside the encoder
        heads = PremiseHeads(m.vit)
        heads.apply(init_weights)
        parameters += list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay)
    # Its own image stream: the Shapes (or folder) batches of another seed, at its own batch size.
    stream = type(data)(replace(train_config, batch_size=c.batch_size, seed=PRETRAIN_SEED + c.seed),
                        data.tokenizer)
    started = time.time()
    say(f"pretraining the encoder contrastively (CLIP-style, low-res view, objective {c.objective}): {c.iters} "
        f"steps of {c.batch_size}, into {path}", flush=True)
    for step in range(c.iters):
        for group in optimizer.param_groups:
            group["lr"] = cosine_schedule(step, c.lr, c.warmup_iters, c.iters)
        if OBJECTIVES[c.objective] is None:       # plain CLIP: one view of each scene, its caption
            images, samples = stream.batch(step)
            captions = [sample.caption for sample in samples]
        else:                                     # colour a nuisance: each scene twice, recoloured
            images, recoloured, captions, objects = recoloured_pairs(c.batch_size, stream_seed(c, step))
            images = torch.cat([images, recoloured])                          # (2B, 3, C, C)
        ids = [encode(data.tokenizer, caption, m.bos_id, m.eos_id) for caption in captions]
        input_ids, _ = batch_captions(ids, max(map(len, ids)))                # (B, T), right-padded
        loss, accuracy, low, hidden, text, target = pair.losses(images, input_ids,
                                                                torch.tensor([len(row) - 1 for row in ids]))
        if OBJECTIVES[c.objective] is not None:
            loss = loss + premise_loss(c.objective, pair, heads, hidden, low, objects, text, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pair.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == c.iters:
            say(f"clip step {step + 1:>5}/{c.iters}  loss {float(loss.detach()):.4f}  "
                f"image->caption acc {float(accuracy):.2f}  elapsed {(time.time() - started) / 60:.1f} min",
                flush=True)
    save_clip_vision(pair.vit, path, {**pretraining_settings(train_config), "final_loss": float(loss.detach()),
                                      "seconds": time.time() - started})
    return pair


def stream_seed(clip_config, step):
    """The scenes of a premise objective's step: a pure function of (clip seed, step)."""
    return (PRETRAIN_SEED + clip_config.seed) * 1_000_003 + step


def pretraining_settings(train_config):
    """What an encoder pretrained here depends on, as stored in (and compared with) its config.json."""
    settings = {"config": asdict(train_config.clip), "vit": asdict(train_config.model.vit), "data": train_config.data}
    if OBJECTIVES[train_config.clip.objective]:   # what the objective's name stands for
        settings["objective"] = OBJECTIVES[train_config.clip.objective]
    return json.loads(json.dumps(settings))


def check_encoder(train_config, path):
    """An encoder this recipe pretrained earlier is reused only if made with the same settings."""
    with open(os.path.join(path, "config.json")) as f:
        stored = json.load(f).get("sparsecut_pretraining")
    wanted = pretraining_settings(train_config)
    if stored is not None:                        # fields added since it was written: their defaults
        stored["config"] = {**asdict(type(train_config.clip)()), **stored.get("config", {})}
    if stored is not None and any(stored.get(key) != wanted[key] for key in wanted):
        differing = [key for key in wanted if stored.get(key) != wanted[key]]
        raise ValueError(f"{path} holds an encoder pretrained with other {' and '.join(differing)} "
                         f"settings: delete it to pretrain again, or choose another --model.vit_path")
