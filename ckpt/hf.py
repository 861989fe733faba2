"""Hugging Face checkpoint formats: config.json translated to our config fields, and tensor names
mapped to ours, for CLIP / SigLIP vision towers, Llama / Mistral / Qwen2 / Qwen3 decoders and
LLaVA-1.5 (`LlavaForConditionalGeneration`, loaded whole by `load_llava`). Used by the
`from_pretrained` methods of vit.py, llm.py and model.py; the weights are read by weights.py.
"""

import json
import os
from dataclasses import replace

import torch

from ckpt.weights import CheckpointError, fill_weights, load_weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- vision towers -----------------------------------------------------------------------------

def vit_fields(hf, path):
    """A Hugging Face CLIP/SigLIP config.json (vision or full model) -> ViTConfig fields."""
    model_type = hf.get("model_type", "")
    vision = hf.get("vision_config", hf)
    if model_type.startswith("clip"):
        family = "clip"
    elif model_type.startswith("siglip"):
        family = "siglip"
    else:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a CLIP or SigLIP vision model")
    is_clip = family == "clip"
    mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else ((0.5,) * 3, (0.5,) * 3)
    preprocessor = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(preprocessor):
        with open(preprocessor) as f:
            pre = json.load(f)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    act = vision.get("hidden_act", "quick_gelu" if is_clip else "gelu_pytorch_tanh")
    act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(act, act)
    return dict(
        image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32 if is_clip else 16),
        width=vision.get("hidden_size", 768), n_layer=vision.get("num_hidden_layers", 12),
        n_head=vision.get("num_attention_heads", 12), mlp_dim=vision.get("intermediate_size", 3072),
        class_token=is_clip, pre_norm=is_clip, patch_bias=not is_clip, act=act,
        norm_eps=vision.get("layer_norm_eps", 1e-5 if is_clip else 1e-6),
        image_mean=mean, image_std=std)


def vit_key(name):
    """Hugging Face tensor name -> ours, or None for tensors the vision tower does not use.

    Full CLIPModel/SiglipModel files (and older vision-only ones) prefix the tower's tensors with
    `vision_model.`; vision-only files written by transformers 5 do not."""
    name = name.removeprefix("vision_model.")
    if name.split(".")[0] not in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm"):
        return None                                  # text tower, projections, SigLIP's pooling head
    return name.replace("encoder.layers.", "layers.").replace("pre_layrnorm.", "pre_layernorm.")


# --- decoders ---------------------------------------------------------------------------------

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")   # Llama 2/3.x, Vicuna, SmolLM2, Qwen2/2.5, Qwen3
MISSING = {"gemma": "Gemma's (1 + weight) RMSNorm, scaled embeddings and GeGLU MLP",
           "phi3": "Phi-3's fused qkv_proj and gate_up_proj", "phi": "Phi's LayerNorm and parallel blocks"}


def llm_fields(hf, path):
    """A Hugging Face Llama / Mistral / Qwen2 / Qwen3 config.json -> LLMConfig fields."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        missing = next((f": {v} is not implemented" for k, v in MISSING.items()
                        if str(model_type).startswith(k)), "")
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a supported causal LM "
                              f"({', '.join(FAMILIES)}){missing}")
    rope = hf.get("rope_parameters") or {}                      # transformers 5; older: top level
    scaling = hf.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{path}: rope scaling {rope_type!r} is not supported (only Llama 3's)")
    llama3 = () if rope_type == "default" else tuple(float(scaling[k]) for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{path}: attention_bias/mlp_bias checkpoints are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    return dict(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        mlp_dim=hf["intermediate_size"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        tie_embeddings=hf.get("tie_word_embeddings", model_type == "qwen2"),
        head_dim=head_dim if head_dim != hf["hidden_size"] // n_head else 0, rope_llama3=llama3)


def llm_key(name):
    """Hugging Face tensor name -> ours (drop the `model.` prefix); None for unused tensors."""
    if name.startswith("model."):
        return name[len("model."):]
    if name == "lm_head.weight":
        return name
    return None


# --- LLaVA-1.5 -----------------------------------------------------------------------------------

# Tensor name prefixes: the hub's layout (llava-hf/llava-1.5-7b-hf) and the one newer transformers write.
LLAVA_PREFIXES = (("model.language_model.", "llm."), ("language_model.model.", "llm."),
                  ("language_model.lm_head.", "llm.lm_head."), ("lm_head.", "llm.lm_head."),
                  ("model.vision_tower.", "vit."), ("vision_tower.", "vit."),
                  ("model.multi_modal_projector.", "fusion.fusers.0."),
                  ("multi_modal_projector.", "fusion.fusers.0."))


def llava_fields(hf, path):
    """A LlavaForConditionalGeneration config.json -> SparseCutConfig fields of a `llava` model:
    its encoder, LLM, feature layer, image token, and the vicuna_v1 template it was trained with."""
    for key, expected in (("vision_feature_select_strategy", "default"), ("projector_hidden_act", "gelu"),
                          ("multimodal_projector_bias", True)):
        if hf.get(key, expected) != expected:
            raise CheckpointError(f"{path}: {key} {hf[key]!r} is not supported (LLaVA-1.5 uses {expected!r})")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{path}: vision_feature_layer {layer!r}: only one feature layer is supported")
    text = hf.get("text_config") or {}
    ids = {key: text.get(f"{key[:-3]}_token_id", hf.get(f"{key[:-3]}_token_id")) for key in ("bos_id", "eos_id", "pad_id")}
    return dict(vit=vit_fields(hf.get("vision_config") or {}, path), llm=llm_fields(text, path),
                fusion="llava", input_layer=layer, template="vicuna_v1",
                image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)),
                **{key: value for key, value in ids.items() if isinstance(value, int)})


def llava_key(name, keep_projector=True):
    """LLaVA tensor name -> ours (None for tensors the model does not use)."""
    for prefix, ours in LLAVA_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if ours == "vit.":
                rest = vit_key(rest)
                return None if rest is None else ours + rest
            if ours.startswith("fusion."):
                return ours + rest.replace("linear_1.", "fc1.").replace("linear_2.", "fc2.") if keep_projector else None
            return ours + rest
    return name                                   # reported as unexpected


def load_llava(model_class, config_class, path, raw, device, dtype, config=None, **overrides):
    """A transformers LlavaForConditionalGeneration directory as a `llava` model (SparseCut, its
    config class); with config (a run's: init_from), its encoder and LLM under that config's
    fusion (new unless llava)."""
    llava = config_class.from_dict(llava_fields(raw, path))
    if config is None:
        config = replace(llava, **overrides)
    else:
        config = replace(config, **{f: getattr(llava, f) for f in ("vit", "llm", "input_layer", "image_token_id",
                                                                 "bos_id", "eos_id", "pad_id")})
    keep_projector = config.fusion == "llava"
    names = lambda name: llava_key(name, keep_projector)
    if keep_projector:
        return load_weights(model_class, config, path, names, dtype=dtype, device=device)
    with torch.device(device):
        model = model_class(config).to(dtype)                     # the new fusion initialised
    return fill_weights(model, path, names, dtype=dtype, device=device, optional_prefixes=("fusion.",))
