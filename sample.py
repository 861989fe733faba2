"""Caption one or more images, or answer a question about them, with a trained checkpoint.

    python sample.py --image cat.jpg [more.png ...] [--checkpoint DIR] [--prompt TEXT]
                     [--temperature T] [--top_k K] [--top_p P] [--repetition_penalty R]
                     [--attention composite] [--show out.png]

Any image PIL reads, of any size and mode; greedy decoding by default. With a chat template
(the run's own: vicuna_v1, chatml) --prompt is the user's question and the reply is printed
(no prompt: the caption request the run was trained with); with `plain` the caption starts with
--prompt. The reply length is the run's own (its saved training config), unless
--max_new_tokens says otherwise; --repetition_penalty 1.3 (off by default) keeps a reply from
repeating a word it has already said, as a model shown an image it does not know tends to. A
checkpoint trained on Shapes says so on stderr when an image is not a Shapes scene. `--show` draws the
(first) image with its caption under it and, for a model with shortcuts, which ViT layer feeds
which LLM layer and how much each adds: the norm of the added features relative to the hidden
state they are added to, at the image positions, on this image (matplotlib, needed only here).
"""

import os
import sys
from dataclasses import dataclass, field

import torch
from PIL import Image

from config import RUN_CONFIG, TrainConfig, check_device, check_writable, load_run_config, parse_options, run_cli
from sources.conversation import IMAGE, stop_id
from sources.data import Sample, decode, encode, load_tokenizer, sample_tokens
from sources.formats import load_image
from sources.shapes import BACKGROUND, CANVAS, CAPTION_REQUEST
from llm import take_rows
from model import SparseCut
from ckpt.weights import CheckpointError, checkpoint_dir

DEFAULT_CHECKPOINT = "out/tiny"
UNTRAINED_MAX_NEW_TOKENS = 64         # for checkpoints that no training run wrote


@dataclass
class SampleOptions:
    image: list = field(default_factory=list)   # image file(s)
    checkpoint: str = DEFAULT_CHECKPOINT
    prompt: str = ""                  # the question (chat templates), or the caption's start (plain)
    temperature: float = 0.0
    top_k: int = 0                    # 0: no top-k filtering
    top_p: float = 1.0
    repetition_penalty: float = 1.0   # > 1 penalises tokens already generated (transformers' name); 1: off
    max_new_tokens: int = 0           # 0: the run's caption length
    attention: str = ""               # composite on a causal checkpoint = training-free EE-MLLM-F
    seed: int = 0
    device: str = "cpu"
    show: str = ""                    # write a picture: the image, its caption, the shortcuts' share


def main(argv):
    options = SampleOptions()
    parse_options(options, argv, __doc__)
    if not options.image:
        raise ValueError("--image is required: the image file(s) to caption")
    if not options.temperature >= 0 or not 0 < options.top_p <= 1 or options.top_k < 0 \
            or options.max_new_tokens < 0 or not options.repetition_penalty > 0:
        raise ValueError("--temperature must be >= 0, --top_k and --max_new_tokens >= 0, "
                         "--top_p in (0, 1], --repetition_penalty > 0")
    check_device(options.device)
    if options.show:
        check_writable(options.show)
    path = checkpoint_dir(options.checkpoint)
    if options.checkpoint == DEFAULT_CHECKPOINT and not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint in {DEFAULT_CHECKPOINT}: train one first with "
                              "`python train.py --config tiny`, or pass --checkpoint DIR")
    overrides = {"attention": options.attention} if options.attention else {}
    model = SparseCut.from_pretrained(path, device=options.device, **overrides)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise CheckpointError(f"{path} has no tokenizer.json: is it a SparseCut checkpoint?")
    tokenizer = load_tokenizer(path)
    run = run_config(path, model)
    max_new_tokens = options.max_new_tokens or run.max_caption_tokens - 1
    size = 2 * model.config.vit.image_size                      # the high-resolution view
    images = torch.stack([load_image(p, size) for p in options.image]).to(options.device)
    if model.config.template == "plain":                      # [image][BOS] + the caption's start
        prompt, lead = encode(tokenizer, options.prompt, model.config.bos_id)[:-1], options.prompt.strip()
        if len(prompt) + model.config.n_image_tokens > run.context_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens and {model.config.n_image_tokens} image tokens "
                             f"does not fit the context of {run.context_length}: shorten it")
    else:                                                     # the user's turn; the reply follows
        turns = [{"from": "human", "value": f"{IMAGE}\n{options.prompt.strip() or CAPTION_REQUEST}"}]
        prompt, lead = sample_tokens(tokenizer, Sample(turns, ""), run, for_generation=True)[0], ""
    if os.path.isfile(os.path.join(path, RUN_CONFIG)) and run.data == "shapes":     # every check passed: a note
        for image_path, image in zip(options.image, images):
            if not_a_shapes_scene(image_path, image.cpu()):
                print(f"note: {image_path} is not a Shapes scene ({CANVAS} x {CANVAS} px, a dark background): "
                      "this checkpoint knows only the Shapes set and cannot describe it; to caption photos, "
                      "use real weights (README.md, \"Real weights\")", file=sys.stderr)
    generator = torch.Generator(device=options.device).manual_seed(options.seed)
    outputs = model.generate(images, [prompt] * len(options.image), max_new_tokens=max_new_tokens,
                             temperature=options.temperature, top_k=options.top_k or None,
                             top_p=options.top_p, generator=generator, repetition_penalty=options.repetition_penalty,
                             eos_id=stop_id(tokenizer, model.config.template, model.config.eos_id))
    for image_path, ids in zip(options.image, outputs):
        caption = " ".join(filter(None, [lead, decode(tokenizer, ids)]))
        print(caption if len(options.image) == 1 else f"{image_path}: {caption}")
    if options.show:
        ids = prompt + outputs[0]
        shares = shortcut_shares(model, images[:1], torch.tensor([ids], device=options.device))
        caption = " ".join(filter(None, [lead, decode(tokenizer, outputs[0])]))
        draw(images[0], caption, shares, model.config, options.show)
        print(f"wrote {options.show}")


@torch.no_grad()
def shortcut_shares(model, images, input_ids):
    """[(vit_layer, llm_layer, share)]: per shortcut, the mean over image positions of
    |added features| / |hidden state before the addition|, on these images."""
    plan = model.fusion.plan
    if not plan:
        return []
    _, injected = model.encode_images(images)                 # {llm_layer: (1, N, d)}
    seen = {}

    def keep_input(llm_layer):
        def hook(module, args):
            seen[llm_layer] = args[0].detach()                 # (1, N + T, d), the addition made
        return hook

    hooks = [model.llm.layers[llm_layer].register_forward_pre_hook(keep_input(llm_layer))
             for _, llm_layer in plan]
    try:
        model(images, input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    n_image = next(iter(injected.values())).shape[1]
    starts = model.place_image(input_ids, n_image)[0]          # where the image rows are
    rows = starts[:, None] + torch.arange(n_image, device=starts.device)   # (1, N)
    shares = []
    for vit_layer, llm_layer in plan:
        added = injected[llm_layer]                            # (1, N, d)
        before = take_rows(seen[llm_layer], rows) - added      # the layer's input less the addition
        shares.append((vit_layer, llm_layer, float((added.norm(dim=-1) / before.norm(dim=-1)).mean())))
    return shares


def draw(image, caption, shares, config, path):
    import textwrap

    import matplotlib                                          # optional: only --show needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 2 if shares else 1
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels + (1.5 if shares else 0), 4.8), squeeze=False)
    ax = axes[0][0]
    ax.imshow(image.permute(1, 2, 0).cpu().numpy())
    ax.set_axis_off()
    ax.set_title(f"{config.fusion} + {config.attention}", fontsize=9)
    ax.text(0.5, -0.04, "\n".join(textwrap.wrap(caption, 44)), transform=ax.transAxes,
            ha="center", va="top", fontsize=9)
    if shares:
        ax = axes[0][1]
        labels = [f"ViT {v} -> LLM {l}" for v, l, _ in shares]
        ax.barh(range(len(shares)), [share for _, _, share in shares], color="tab:orange")
        ax.set_yticks(range(len(shares)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("|added| / |hidden state| at image positions", fontsize=8)
        ax.set_title("what each shortcut adds, on this image", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def not_a_shapes_scene(path, pixels):
    """True where an image cannot be a Shapes scene: its file is not CANVAS x CANVAS px, or under
    half of it is the dark background (three large objects cover less than a third of a scene).
    pixels: (3, H, W) in [0, 1], as loaded."""
    with Image.open(path) as image:
        size = image.size
    background = torch.tensor(BACKGROUND, dtype=pixels.dtype)[:, None, None] / 255
    on_background = ((pixels - background).abs() < 8 / 255).all(0)           # (H, W)
    return size != (CANVAS, CANVAS) or float(on_background.float().mean()) < 0.5


def run_config(path, model):
    """The training config of the run that wrote the checkpoint; for checkpoints written outside
    a run (save_pretrained, a Hugging Face LLaVA), the defaults around the model's own config."""
    has_run = any(os.path.isfile(os.path.join(path, f)) for f in (RUN_CONFIG, "train_state.pt"))
    config = load_run_config(path) if has_run else TrainConfig(max_caption_tokens=UNTRAINED_MAX_NEW_TOKENS + 1)
    config.model = model.config
    return config


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main, sys.argv[1:])
