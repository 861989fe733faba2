"""Fusion units: one class per mode, DeepStack's stacks, shortcuts without multi-resolution, the
one constructor, and checkpoints written before the fusion units existed (a01a673)."""

import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import fusion as fusion_module
from conftest import tiny_config, tiny_model
from fusion import FUSIONS, LLaVA, dilated_stacks
from model import SparseCut
from test_attention import greedy_by_recomputation
from test_model import layer_inputs

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "a01a673")
INJECTING = {  # mode -> the LLM layers it injects into at the tiny config (3 ViT / 3 LLM layers)
    "deepstack": dict(fusion="deepstack"),
    "llava+shortcuts": dict(fusion="llava", shortcuts="uniform"),
    "llava+dense": dict(fusion="llava", shortcuts="dense"),
    "concat+shortcuts": dict(fusion="concat", shortcuts="skew_top"),
    "sparsecut": dict(fusion="sparsecut"),
}


def test_dilated_stacks_hold_the_right_high_res_tokens():
    """Stack (i, j) position (a, b) is the high-res token at row 2a + i, column 2b + j of the whole
    image's 2G x 2G grid, which lives in crop (row >= G, col >= G) at (row % G, col % G)."""
    G, B = 3, 2
    crops = torch.zeros(4, B, G * G, 3)
    for crop in range(4):
        for patch in range(G * G):
            crops[crop, :, patch] = torch.tensor([crop, patch, 0.0])
    crops[..., 2] = torch.arange(B, dtype=torch.float)[:, None]  # the batch row
    stacks = dilated_stacks(crops, G)
    assert stacks.shape == (4, B, G * G, 3)
    for i in range(2):
        for j in range(2):
            for a in range(G):
                for b in range(G):
                    row, col = 2 * a + i, 2 * b + j
                    crop = 2 * (row >= G) + (col >= G)
                    patch = (row % G) * G + col % G
                    for batch in range(B):
                        expected = torch.tensor([crop, patch, batch], dtype=torch.float)
                        assert torch.equal(stacks[2 * i + j, batch, a * G + b], expected), (i, j, a, b)


def test_deepstack_adds_its_stacks_before_start_interval_layers():
    model = tiny_model(fusion="deepstack", deepstack_start=0, deepstack_interval=2)
    assert [llm for _, llm in model.fusion.plan] == [0, 2]          # 4 stacks, 2 fit in 3 layers
    assert all(vit == model.fusion.input_layer for vit, _ in model.fusion.plan)
    assert len(model.fusion.fusers) == 1                             # no parameters beyond it
    assert sum(p.numel() for p in model.fusion.parameters()) == \
        sum(p.numel() for p in tiny_model(fusion="llava").fusion.parameters())
    images = torch.rand(2, 3, 32, 32)
    visual, injected = model.encode_images(images)
    assert visual.shape == (2, 16, 32) and sorted(injected) == [0, 2]
    # the stacks are the projected high-res tokens of the input layer
    views = fusion_module.image_views(images, 16)
    hidden = model.vit(model.vit.normalize(views))[model.fusion.input_layer][:, 1:]
    _, crops = fusion_module.split_views(hidden, 2)
    stacks = dilated_stacks(crops, 4)
    torch.testing.assert_close(injected[0], model.fusion.fusers[0](stacks[0]))
    torch.testing.assert_close(injected[2], model.fusion.fusers[0](stacks[1]))
    with pytest.raises(ValueError, match="deepstack adds its own 4 stacks"):
        tiny_config(fusion="deepstack", shortcuts="uniform")


@pytest.mark.parametrize("mode", INJECTING)
@pytest.mark.parametrize("text_before", [0, 3], ids=["image-first", "after-text"])
def test_injections_touch_only_image_positions_from_their_layer_on(mode, text_before):
    """Through the whole model: ids that place the image after `text_before` text tokens."""
    model = tiny_model(std=0.1, **INJECTING[mode])
    images = torch.rand(2, 3, 32, 32)
    _, injected = model.encode_images(images)
    assert injected, f"{mode} injects nothing"
    N, M = model.config.n_image_tokens, model.config.image_token_id
    ids = torch.cat([torch.randint(3, 40, (2, text_before)), torch.full((2, N), M), torch.randint(3, 40, (2, 5))], 1)
    h, span, injected, _, _, _ = model.embed(images, ids)
    assert bool((span[0] == text_before).all())
    plain = layer_inputs(model.llm, inputs_embeds=h, image_span=span)
    shortcut = layer_inputs(model.llm, inputs_embeds=h, image_span=span, injections=injected)
    first = min(injected)
    for i in range(first):
        assert torch.equal(plain[i], shortcut[i]), f"layer {i} changed before the first injection"
    changed = (plain[first] != shortcut[first]).any(-1)           # (B, T)
    image = slice(text_before, text_before + N)
    assert changed[:, image].all() and not changed[:, :text_before].any() and not changed[:, image.stop:].any()


@pytest.mark.parametrize("mode", INJECTING)
def test_sequence_length_and_cached_generation(mode):
    model = tiny_model(std=0.3, **INJECTING[mode])
    model.config.eos_id = 3
    llava = tiny_config(fusion="llava")
    expected_tokens = 5 * 16 if INJECTING[mode]["fusion"] == "concat" else 16
    assert model.config.n_image_tokens == expected_tokens
    if INJECTING[mode]["fusion"] != "concat":
        assert model.config.n_image_tokens == llava.n_image_tokens
    torch.manual_seed(2)
    images = torch.rand(2, 3, 32, 32)
    prompts = [[1, 7, 9], [1]]
    expected = [greedy_by_recomputation(model, images[b], prompts[b], 8) for b in range(2)]
    assert model.generate(images, prompts, max_new_tokens=8) == expected


@pytest.mark.parametrize("mode", ["llava", "concat", "deepstack", "sparsecut"])
def test_visual_norm_puts_every_visual_token_at_unit_rms(mode):
    """visual_norm rescales each token the LLM receives (input tokens and every shortcut's
    features) to RMS 1, keeping its direction; the zero gates still switch the shortcuts off."""
    plain = tiny_model(std=0.3, fusion=mode)
    normed = SparseCut(tiny_config(fusion=mode, visual_norm=True)).eval()
    normed.load_state_dict(plain.state_dict())                         # same weights, no new ones
    images = torch.rand(2, 3, 32, 32)
    raw_inputs, raw_injected = plain.encode_images(images)
    inputs, injected = normed.encode_images(images)
    assert set(injected) == set(raw_injected) and (mode in ("llava", "concat")) == (not injected)
    for raw, scaled in [(raw_inputs, inputs)] + [(raw_injected[k], injected[k]) for k in injected]:
        rms = scaled.pow(2).mean(-1).sqrt()                            # (B, N)
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
        assert torch.allclose(raw / raw.pow(2).mean(-1, keepdim=True).sqrt(), scaled, atol=1e-5)
        assert not torch.allclose(raw, scaled, atol=1e-2)              # std 0.3: far from RMS 1
    gated = SparseCut(tiny_config(fusion=mode, visual_norm=True, shortcut_gate="zero")).eval()
    gated_injections = gated.encode_images(images)[1]
    assert set(gated_injections) == set(injected) and not any(f.any() for f in gated_injections.values())


def test_llava_shortcuts_use_low_res_only_and_one_projector():
    plain, shortcuts = tiny_model(fusion="llava"), tiny_model(fusion="llava", shortcuts="dense")
    assert plain.fusion.plan == [] and not plain.fusion.high_res       # LLaVA-1.5 by default
    assert len(shortcuts.fusion.plan) == 3 and not shortcuts.fusion.high_res
    assert len(shortcuts.fusion.fusers) == 1
    images, ids = torch.rand(2, 3, 32, 32), torch.randint(3, 40, (2, 6))
    shortcuts.load_state_dict(plain.state_dict())                      # same weights
    assert not torch.allclose(plain(images, ids)[0], shortcuts(images, ids)[0])


def test_a_new_mode_is_one_class_and_one_registry_entry(monkeypatch):
    """What a researcher adds: a subclass and an entry; the model and the config need nothing."""

    class MeanPool(LLaVA):
        """Toy mode: the low-res grid average-pooled 2x2 (a quarter of the tokens)."""

        @staticmethod
        def image_tokens(vit_config):
            return (vit_config.grid // 2) ** 2

        def features(self, tokens, batch, slot):
            G = self.grid
            grid = tokens.view(batch, G // 2, 2, G // 2, 2, -1).mean((2, 4)).flatten(1, 2)
            return self.fuser(slot)(grid)

    monkeypatch.setitem(FUSIONS, "meanpool", MeanPool)
    model = tiny_model(std=0.3, fusion="meanpool")
    images = torch.rand(2, 3, 32, 32)
    assert model.encode_images(images)[0].shape == (2, 4, 32) and model.config.n_image_tokens == 4
    logits, loss = model(images, torch.randint(3, 40, (2, 6)), torch.randint(3, 40, (2, 6)))
    assert torch.isfinite(loss)
    model.config.eos_id = 3
    expected = [greedy_by_recomputation(model, images[b], [1], 5) for b in range(2)]
    assert model.generate(images, max_new_tokens=5) == expected


def test_the_constructor_builds_only_what_it_is_not_given():
    """from_backbones goes through SparseCut(config, vit, llm): a part a subclass adds in
    __init__ is real (at a01a673 it stayed on the meta device), the given backbones are kept."""

    class WithExtra(SparseCut):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.extra = nn.Parameter(torch.ones(3))

    config = tiny_config()
    torch.manual_seed(0)
    source = SparseCut(config)
    model = WithExtra(config, vit=source.vit, llm=source.llm)
    assert model.vit is source.vit and model.llm is source.llm
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.extra, torch.ones(3))


def test_from_backbones_builds_everything_for_real(tmp_path):
    pytest.importorskip("transformers", reason="transformers (test-only) writes the backbones")
    from test_hf_parity import clip_vision, llama

    class WithExtra(SparseCut):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.extra = nn.Parameter(torch.ones(3))

    clip_vision().save_pretrained(tmp_path / "vit")
    llama().save_pretrained(tmp_path / "llm")
    config = tiny_config(vit_path=str(tmp_path / "vit"), llm_path=str(tmp_path / "llm"))
    model = WithExtra.from_backbones(config)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.extra, torch.ones(3))


@pytest.mark.parametrize("name", ["sparsecut", "llava"])
def test_checkpoints_from_a01a673_load_and_give_the_same_logits(name):
    """Written by save_pretrained at a01a673 (fusers at the top level; llava configs said
    shortcuts "uniform", which that version ignored outside sparsecut). The expected logits were
    computed on another CPU: equal to float32 round-off (7e-7 of logits near 2 on an AVX-512
    machine), where a weight in the wrong place would move them by tenths."""
    path = os.path.join(FIXTURES, name)
    model = SparseCut.from_pretrained(path)
    expected = load_file(os.path.join(path, "expected.safetensors"))
    logits, _ = model(expected["images"], expected["input_ids"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    if name == "llava":
        assert model.fusion.plan == []
    else:
        assert model.fusion.gates is not None and len(model.fusion.fusers) == 1 + len(model.fusion.plan)


def test_composite_attention_needs_an_image_span():
    llm = tiny_model().llm
    with pytest.raises(ValueError, match="composite attention needs image_span"):
        llm(inputs_embeds=torch.randn(1, 6, 32), attention="composite")


def test_loaded_weights_own_aligned_memory_as_a_new_model_does(tmp_path):
    """from_pretrained copies each tensor out of the safetensors buffer (a view of it sits 32
    bytes off a 64-byte boundary), so a loaded model's memory is laid out as a new one's. It was
    first suspected for a resumed run's last-bit drift; that was thread timing (test_cli.ONE_THREAD)."""
    SparseCut(tiny_config()).save_pretrained(tmp_path)
    loaded = SparseCut.from_pretrained(tmp_path)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
