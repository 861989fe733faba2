"""Model core: every fusion x attention mode trains, shortcuts, fusion geometry, save/load."""

import pytest
import torch

from conftest import ATTENTIONS, FUSIONS, tiny_config, tiny_model
from fusion import image_views, patch_tokens, split_views
from model import SparseCut
from ckpt.weights import CheckpointError

VARIANTS = [dict(fusion=f, attention=a) for f in FUSIONS for a in ATTENTIONS] + [
    dict(fusion="sparsecut", fuser="cross_attn"),
    dict(fusion="sparsecut", shortcut_projector="per_layer"),
    dict(fusion="sparsecut", attention="composite", visual_ffn=False),
    dict(fusion="sparsecut", shortcuts="dense"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_forward_backward_every_trainable_parameter_gets_a_gradient(variant, images):
    model = tiny_model(**variant).train()
    input_ids = torch.randint(3, 40, (2, 6))
    labels = input_ids.clone()
    labels[:, :2] = -100
    logits, loss = model(images, input_ids, labels)
    assert logits.shape == (2, 6, 40)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_zero_gate_parameters_get_gradients(images):
    model = tiny_model(fusion="sparsecut", shortcut_gate="zero").train()
    _, loss = model(images, torch.randint(3, 40, (2, 6)), torch.randint(3, 40, (2, 6)))
    loss.backward()
    assert model.fusion.gates.gate.grad.abs().sum() > 0


def test_sequence_lengths(images):
    lengths = {}
    for fusion in FUSIONS:
        model = tiny_model(fusion=fusion)
        visual, injected = model.encode_images(images)
        lengths[fusion] = visual.shape[1]
        assert model.config.n_image_tokens == visual.shape[1]
        for features in injected.values():
            assert features.shape == visual.shape
    G2 = tiny_config().vit.grid ** 2
    assert lengths["llava"] == lengths["sparsecut"] == G2
    assert lengths["concat"] == 5 * G2


def layer_inputs(llm, **kwargs):
    """The residual stream entering each decoder layer."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
             for layer in llm.layers]
    llm(**kwargs)
    for hook in hooks:
        hook.remove()
    return seen


def test_injection_touches_only_image_positions_from_its_layer_on():
    torch.manual_seed(0)
    llm = tiny_model().llm
    h = torch.randn(2, 10, 32)
    span, layer = (2, 6), 1
    plain = layer_inputs(llm, inputs_embeds=h, image_span=span)
    injected = layer_inputs(llm, inputs_embeds=h, image_span=span,
                            injections={layer: torch.randn(2, 4, 32)})
    for i in range(layer):
        assert torch.equal(plain[i], injected[i]), f"layer {i} changed before the injection"
    changed = (plain[layer] != injected[layer]).any(-1)          # (B, T)
    assert changed[:, 2:6].all()
    assert not changed[:, :2].any() and not changed[:, 6:].any()


def test_zero_gate_equals_model_without_shortcuts(images):
    gated = tiny_model(fusion="sparsecut", shortcut_gate="zero")
    assert len(gated.fusion.plan) == 3
    plain = SparseCut(tiny_config(fusion="sparsecut", shortcuts="none")).eval()
    state = {k: v for k, v in gated.state_dict().items() if not k.startswith("fusion.gates.")}
    plain.load_state_dict(state)
    ids = torch.randint(3, 40, (2, 6))
    assert torch.equal(gated(images, ids)[0], plain(images, ids)[0])
    with torch.no_grad():
        gated.fusion.gates.gate.fill_(1.0)
    assert not torch.allclose(gated(images, ids)[0], plain(images, ids)[0])


@pytest.mark.parametrize("fuser", ["cross_mlp", "cross_attn"])
def test_high_res_crop_changes_only_its_quadrant(fuser, images):
    model = tiny_model(fusion="sparsecut", fuser=fuser)
    B, R, G = images.shape[0], model.config.vit.image_size, model.config.vit.grid
    views = image_views(images, R)                               # (5B, 3, R, R)
    edited = views.clone()
    edited[B:2 * B] += 0.5 * torch.randn_like(edited[B:2 * B])   # the top-left crop only

    def fused(v):
        hidden = model.vit(model.vit.normalize(v))
        return model.fusion.fusers[0](*split_views(patch_tokens(hidden[-2], True), B))  # (B, G*G, d)

    changed = (fused(views) - fused(edited)).abs().amax(-1).view(B, G, G) > 0
    top_left = torch.zeros(G, G, dtype=torch.bool)
    top_left[:G // 2, :G // 2] = True
    if fuser == "cross_mlp":
        assert torch.equal(changed, top_left.expand(B, G, G))
    else:                                                       # attention sees every crop
        assert changed[:, top_left].all()


def test_views_are_low_res_and_four_crops():
    image = torch.rand(1, 3, 32, 32)
    views = image_views(image, 16)
    assert views.shape == (5, 3, 16, 16)
    assert torch.equal(views[1], image[0, :, :16, :16])          # 2R = 32: no resize
    assert torch.equal(views[4], image[0, :, 16:, 16:])


def test_save_and_load_reproduce_logits(tmp_path, images):
    model = tiny_model(fusion="sparsecut", shortcut_gate="zero", std=0.1)
    with torch.no_grad():
        model.fusion.gates.gate.fill_(0.5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SparseCut.from_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, 40, (2, 6))
    assert torch.equal(model(images, ids)[0], loaded(images, ids)[0])
    # frozen parts stay frozen after loading
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in loaded.named_parameters() if not p.requires_grad}


def test_save_and_load_tied_embeddings(tmp_path, images):
    config = tiny_config()
    config.llm.tie_embeddings = True
    torch.manual_seed(0)
    model = SparseCut(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SparseCut.from_pretrained(tmp_path / "ckpt")
    assert loaded.llm.lm_head.weight is loaded.llm.embed_tokens.weight
    ids = torch.randint(3, 40, (2, 6))
    assert torch.equal(model(images, ids)[0], loaded(images, ids)[0])


def test_save_replaces_previous_checkpoint_atomically(tmp_path):
    model = tiny_model()
    out = tmp_path / "ckpt"
    model.save_pretrained(out)

    def crash(_):
        raise RuntimeError("simulated crash while writing")

    with pytest.raises(RuntimeError):
        tiny_model(seed=1).save_pretrained(out, write_extra=crash)
    loaded = SparseCut.from_pretrained(out)                      # the first checkpoint is whole
    assert torch.equal(loaded.llm.embed_tokens.weight, model.llm.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SparseCut.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        SparseCut.from_pretrained(tmp_path / "empty")
    tiny_model().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        SparseCut.from_pretrained(tmp_path / "ckpt")
    other = tiny_config()
    other.llm.width = 48
    SparseCut(other).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="wrong shape"):
        SparseCut.from_pretrained(tmp_path / "other")


def test_unknown_config_value_is_an_error():
    with pytest.raises(ValueError, match="fusion must be one of"):
        tiny_config(fusion="late")


def test_activation_checkpointing_gives_the_same_gradients(images):
    ids = torch.randint(3, 40, (2, 6))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(std=0.1).train()
        model.llm.checkpoint_layers = checkpointing
        _, loss = model(images, ids, ids)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_repetition_penalty_is_off_by_default_and_penalises_what_was_generated(images):
    model = tiny_model(std=0.3)
    plain = model.generate(images, max_new_tokens=12, eos_id=-1)
    assert model.generate(images, max_new_tokens=12, eos_id=-1, repetition_penalty=1.0) == plain
    assert any(len(set(row)) < len(row) for row in plain)             # greedy repeats itself here
    penalty = 4.0
    penalised = model.generate(images, max_new_tokens=12, eos_id=-1, repetition_penalty=penalty)
    assert penalised != plain
    bos = model.config.bos_id
    with torch.no_grad():                                             # each step again, without the cache
        for b, row in enumerate(penalised):
            logits, _ = model(images[b:b + 1], torch.tensor([[bos] + row]))
            for t, token in enumerate(row):
                step = logits[0, t].clone()                           # predicts row[t] from [bos] + row[:t]
                seen = torch.tensor(sorted(set(row[:t])), dtype=torch.long)
                if len(seen):
                    step[seen] = torch.where(step[seen] > 0, step[seen] / penalty, step[seen] * penalty)
                assert int(step.argmax()) == token
