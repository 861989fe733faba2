"""The named configs (`--config NAME`): each a function that returns a TrainConfig.

- `tiny`: the embedded default, a CPU captioner on Shapes in minutes.
- `tiny-chat`: the tiny model as an assistant in one run (captions and questions in chatml).
- `tiny-assistant`: the same in three stages, each a named config that trains the one before it
  when its run is not there yet (`init_config`, train.py): `tiny-stage1` (captions),
  `tiny-stage2` (a new LLM learns questions on stage 1's frozen encoder and fusion), then
  `tiny-assistant` (captions back beside the questions).
- `tiny-frozen`: the paper's setting at tiny scale (a pretrained, frozen encoder).
- `tiny-premise`: the same with an encoder whose top layer was pretrained to drop colour.
- `llava15-7b`, `smol`: real backbones on a GPU.
"""

from config import TrainConfig
from llm import LLMConfig
from model import SparseCutConfig
from vit import ViTConfig


def tiny():
    """The embedded default: a CPU captioner on Shapes in minutes."""
    return TrainConfig(model=SparseCutConfig(
        vit=ViTConfig(image_size=48, patch_size=8, width=96, n_layer=4, n_head=4, mlp_dim=384),
        llm=LLMConfig(width=128, n_layer=4, n_head=4, n_kv_head=2, mlp_dim=384)))


def tiny_chat():
    """The tiny model as an assistant: each Shapes sample a chatml conversation (a system prompt,
    the image, its caption and questions about it, in random order; data.shapes_turns). Visual
    tokens at RMS 1 (visual_norm: the same quality in 1,500 steps as in 2,700 without) and each
    head's queries and keys RMS-normalised (qk_norm, as in Qwen3: questions that name an object by
    its position 0.993 right instead of 0.971, three seeds; README, "Questions about the image")."""
    config = tiny()
    config.model.template, config.model.visual_norm, config.model.llm.qk_norm = "chatml", True, True
    config.out_dir, config.max_iters = "out/tiny-chat", 1500
    return config


def tiny_stage1():
    """tiny-assistant's first stage: the tiny captioner with visual tokens at RMS 1. Its encoder
    and fusion are kept (frozen) by the later stages, its LLM is not."""
    config = tiny()
    config.model.visual_norm, config.out_dir = True, "out/tiny-stage1"
    return config


def tiny_stage2():
    """Second stage: a new chatml LLM and a new input map (model.input_map, with a learned vector
    per visual token: image_positions) learn questions alone, one per conversation with the image
    after it, on stage 1's frozen encoder and fusion, for 3,000 steps; the questions that look an
    object up by its colour and shape (exists, where) asked 2.5 times as often as the others, how
    many objects half as often (the lookup by content forms last: README, "Three stages"). With
    captions in this mix the LLM learns the captions and not that lookup."""
    config = tiny_chat()
    config.init_config, config.reinit, config.freeze = "tiny-stage1", "llm", "vit,fusion"
    config.model.input_map, config.model.image_positions = True, True
    config.image_place, config.questions_per_image, config.question_mix = "end", 1, "split"
    config.caption_share, config.question_weights = 0.0, "count=0.5,exists=2.5,where=2.5"
    config.max_iters, config.out_dir = 3000, "out/tiny-stage2"
    return config


def tiny_assistant():
    """Third stage: stage 2's model, encoder and fusion still frozen, 500 steps more with 30% of
    the conversations a caption request: it captions again and keeps the answers (with half of
    them captions, `where` fell to 0.937 on one seed of three; README)."""
    config = tiny_stage2()
    config.init_config, config.reinit, config.caption_share = "tiny-stage2", "", 0.3
    config.max_iters, config.out_dir = 500, "out/tiny-assistant"
    return config


def tiny_frozen():
    """The paper's setting at tiny scale: the tiny ViT pretrained CLIP-style (contrastive, on the
    low-res view) into out/tiny-clip once and reused by every run that names it, then frozen;
    stage 1 trains the fusion alone, stage 2 the fusion and the (new) LLM."""
    config = tiny()
    config.model.vit_path = "out/tiny-clip"
    config.clip.iters = 600
    config.freeze, config.stage1_iters, config.out_dir = "vit", 100, "out/tiny-frozen"
    return config


def tiny_premise():
    """The paper's premise at tiny scale: tiny-frozen with a 6-layer encoder pretrained so that the
    layer llava reads (the penultimate) drops colour while the lower layers keep it (captions
    without colour, each scene also recoloured, colour's class means made equal at that layer:
    clip.objective mean-matching, training/premise.py; studies/premise.py probes it), then frozen
    and reused by every run that names it; stage 1 the fusion alone, stage 2 with the LLM."""
    config = tiny_frozen()
    config.model.vit.n_layer = 6
    config.model.visual_norm = True               # its states grow about 40-fold in norm from layer 0 to 5
    config.model.vit_path, config.out_dir = "out/tiny-premise-clip", "out/tiny-premise"
    config.clip.objective, config.clip.batch_size = "mean-matching", 64
    return config


def llava15_7b():
    """The paper's setting at 7B: CLIP ViT-L/14-336 + Vicuna-7B v1.5, shortcuts scaled from the
    released 13B lists to 24 ViT / 32 LLM layers ((1, 3), (4, 7), ..., (22, 31)). These are the
    stage-1 settings (fusion only, lr 1e-3, LCS-558K, template plain); stage 2 (LLaVA-665K
    conversations, vicuna_v1) adds `--freeze vit --lr 2e-5 --template vicuna_v1 --init_from
    out/llava15-7b --data data/llava-665k --out_dir out/llava15-7b-s2`.
    Global batch 256 as in LLaVA-1.5 (16 per GPU x 2 accumulation x 8 GPUs), 3% warmup, cosine."""
    return TrainConfig(
        model=SparseCutConfig(vit_path="checkpoints/clip-vit-large-patch14-336",
                              llm_path="checkpoints/vicuna-7b-v1.5"),
        data="data/llava-pretrain", out_dir="out/llava15-7b", device="cuda", batch_size=16,
        grad_accum=2, max_iters=2180, lr=1e-3, warmup_iters=65, weight_decay=0.0,
        freeze="vit,llm", fsdp=True, activation_checkpointing=True, log_interval=10,
        eval_interval=500, checkpoint_interval=500, max_caption_tokens=128, context_length=2048)


def smol():
    """SigLIP-B/16 + SmolLM2-135M: one GPU trains it in hours on Flickr8k or COCO captions."""
    return TrainConfig(
        model=SparseCutConfig(vit_path="checkpoints/siglip-base-patch16-224",
                              llm_path="checkpoints/SmolLM2-135M"),
        data="data/flickr8k", out_dir="out/smol", device="cuda", batch_size=64, max_iters=3000,
        lr=2e-4, warmup_iters=100, freeze="vit", log_interval=20, eval_interval=500,
        checkpoint_interval=500, max_caption_tokens=64)


CONFIGS = {"tiny": tiny, "tiny-chat": tiny_chat, "tiny-assistant": tiny_assistant, "tiny-stage1": tiny_stage1,
           "tiny-stage2": tiny_stage2, "tiny-frozen": tiny_frozen, "tiny-premise": tiny_premise,
           "llava15-7b": llava15_7b, "smol": smol}


def named_config(name):
    if name not in CONFIGS:
        raise ValueError(f"unknown --config {name!r}: choose one of {', '.join(CONFIGS)}")
    config = CONFIGS[name]()
    config.config_name = name
    return config
