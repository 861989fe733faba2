"""Composite attention (EE-MLLM) and KV-cache generation."""

import pytest
import torch
import torch.nn.functional as F

import llm as llm_module
from conftest import ATTENTIONS, FUSIONS, tiny_model

SPAN = (0, 5)                                                   # 5 visual tokens, then 7 text


def run(llm, h, attention="composite", **kwargs):
    return llm(inputs_embeds=h, image_span=SPAN, attention=attention, return_hidden=True, **kwargs)


@pytest.fixture
def llm():
    return tiny_model(std=0.2).llm


def test_visual_tokens_never_see_each_other(llm):
    torch.manual_seed(0)
    h = torch.randn(2, 12, 32)
    edited = h.clone()
    edited[:, 2] += torch.randn(32)                              # one visual token's input
    changed = (run(llm, h) != run(llm, edited)).any(-1)          # after every layer
    assert changed[:, 2].all()
    assert not changed[:, [0, 1, 3, 4]].any(), "a visual token saw another visual token"
    assert changed[:, 5:].all(), "text must see every visual token"
    # and layer by layer: a single block's visual outputs are independent too
    block = llm.layers[0]
    cos, sin = llm_module.rope_cos_sin(torch.arange(12).expand(2, 12), 8, 10000.0, h.dtype)
    mask = llm_module.build_mask(12, 0, torch.ones(2, 12, dtype=torch.bool), h.device)
    one = block(h, cos, sin, mask, None, SPAN)
    two = block(edited, cos, sin, mask, None, SPAN)
    assert not (one != two).any(-1)[:, [0, 1, 3, 4]].any()


def test_text_never_sees_later_text(llm):
    torch.manual_seed(0)
    h = torch.randn(2, 12, 32)
    edited = h.clone()
    edited[:, 8] += torch.randn(32)
    changed = (run(llm, h) != run(llm, edited)).any(-1)
    assert not changed[:, :8].any(), "an earlier token (text or visual) saw a later text token"
    assert changed[:, 8:].all()


def test_composite_without_visual_tokens_equals_causal(llm):
    torch.manual_seed(0)
    h = torch.randn(2, 9, 32)
    causal = llm(inputs_embeds=h, return_hidden=True)
    composite = llm(inputs_embeds=h, image_span=(0, 0), attention="composite", return_hidden=True)
    torch.testing.assert_close(composite, causal, rtol=1e-5, atol=1e-5)


def test_aligner_is_w_o_w_v_norm(llm):
    """A visual token's attention update is exactly o_proj(v_proj(norm(h))) with heads repeated."""
    torch.manual_seed(0)
    h = torch.randn(1, 12, 32)
    block, c = llm.layers[0], llm.config
    x = block.input_layernorm(h)
    v = block.self_attn.v_proj(x[:, SPAN[0]:SPAN[1]]).view(1, 5, c.n_kv_head, 8)
    expected = block.self_attn.o_proj(v.repeat_interleave(c.n_head // c.n_kv_head, 2).flatten(2))
    cos, sin = llm_module.rope_cos_sin(torch.arange(12)[None], 8, 10000.0, h.dtype)
    mask = llm_module.build_mask(12, 0, torch.ones(1, 12, dtype=torch.bool), h.device)
    y = block.self_attn.composite(x, cos, sin, mask, None, SPAN)
    torch.testing.assert_close(y[:, :5], expected)


def test_no_visual_queries_and_no_visual_ffn(llm, monkeypatch):
    """The saving is real: attention queries are text rows only; with visual_ffn=False the FFN
    sees text rows only."""
    query_rows, ffn_rows = [], []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        query_rows.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(llm_module.F, "scaled_dot_product_attention", recording_sdpa)
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: ffn_rows.append(a[0].shape[1]))
             for layer in llm.layers]
    run(llm, torch.randn(2, 12, 32), visual_ffn=False)
    assert query_rows == [(7, 12)] * 3
    assert ffn_rows == [7] * 3
    query_rows.clear(), ffn_rows.clear()
    run(llm, torch.randn(2, 12, 32), visual_ffn=True)
    assert ffn_rows == [12] * 3
    for hook in hooks:
        hook.remove()


def greedy_by_recomputation(model, image, prompt, steps, attention=None):
    """Reference decoding: the whole sequence re-run through forward() for every new token."""
    ids = list(prompt)
    for _ in range(steps):
        logits, _ = model(image[None], torch.tensor([ids]), attention=attention)
        token = int(logits[0, -1].argmax())
        if token == model.config.eos_id:
            break
        ids.append(token)
    return ids[len(prompt):]


PROMPTS = [[1, 7, 9, 11, 5], [1, 30], [1, 4, 8]]


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cached_generation_matches_recomputation(fusion, attention):
    model = tiny_model(std=0.3, fusion=fusion, attention=attention)
    model.config.eos_id = 3
    torch.manual_seed(2)
    images = torch.rand(3, 3, 32, 32)
    expected = [greedy_by_recomputation(model, images[b], PROMPTS[b], 10) for b in range(3)]
    assert any(len(e) > 3 for e in expected)
    assert model.generate(images, PROMPTS, max_new_tokens=10) == expected
    for b in range(3):                                           # unbatched, no padding
        assert model.generate(images[b:b + 1], [PROMPTS[b]], max_new_tokens=10) == [expected[b]]
    # the same prompts as padded tensors, padding on the right or on the left
    width = max(map(len, PROMPTS))
    for side in ("right", "left"):
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.bool)
        for b, p in enumerate(PROMPTS):
            cols = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
            ids[b, cols], mask[b, cols] = torch.tensor(p), True
        assert model.generate(images, ids, prompt_mask=mask, max_new_tokens=10) == expected


def test_training_free_composite_on_a_causal_model():
    """EE-MLLM-F: a causally trained model decodes with composite attention switched on."""
    model = tiny_model(std=0.3, fusion="sparsecut", attention="causal")
    images = torch.rand(2, 3, 32, 32)
    expected = [greedy_by_recomputation(model, images[b], [1], 6, attention="composite")
                for b in range(2)]
    assert model.generate(images, max_new_tokens=6, attention="composite") == expected


def test_sampling_options():
    model = tiny_model(std=0.3)
    images = torch.rand(2, 3, 32, 32)
    gen = lambda **kw: model.generate(images, max_new_tokens=8, generator=torch.Generator().manual_seed(0), **kw)
    assert gen(temperature=1.0, top_k=5) == gen(temperature=1.0, top_k=5)      # seeded
    assert gen(temperature=1.0, top_k=1) == model.generate(images, max_new_tokens=8)  # top-1 = greedy
    assert gen(temperature=1.0, top_p=1e-6) == model.generate(images, max_new_tokens=8)
