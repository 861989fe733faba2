"""Composite attention (EE-MLLM) and KV-cache generation."""

import pytest
import torch
import torch.nn.functional as F

import llm as llm_module
from conftest import ATTENTIONS, FUSIONS, tiny_model

SPAN = (0, 5)                                                   # 5 visual tokens, then 7 text
# The image first; after 3 text tokens; after 3 text tokens in row 0 and 1 in row 1 (left padding).
SPANS = [(0, 5), (3, 8), (torch.tensor([3, 1]), torch.tensor([8, 6]))]
SPAN_IDS = ["first", "after-text", "per-row"]


def run(llm, h, attention="composite", span=SPAN, **kwargs):
    return llm(inputs_embeds=h, image_span=span, attention=attention, return_hidden=True, **kwargs)


@pytest.fixture
def llm():
    return tiny_model(std=0.2).llm


def image_mask(span, batch=2, length=12):
    image_index, _ = llm_module.image_rows(span, batch, length, "cpu")
    return torch.zeros(batch, length, dtype=torch.bool).scatter(1, image_index, True), image_index


@pytest.mark.parametrize("span", SPANS, ids=SPAN_IDS)
def test_visual_tokens_never_see_each_other(llm, span):
    torch.manual_seed(0)
    h = torch.randn(2, 12, 32)
    is_image, image_index = image_mask(span)
    edited = h.clone()
    edited[torch.arange(2), image_index[:, 2]] += torch.randn(32)   # one visual token's input
    changed = (run(llm, h, span=span) != run(llm, edited, span=span)).any(-1)   # after every layer
    assert changed[torch.arange(2), image_index[:, 2]].all()
    others = is_image.clone()
    others[torch.arange(2), image_index[:, 2]] = False
    assert not changed[others].any(), "a visual token saw another visual token"
    later_text = ~is_image & (torch.arange(12) > image_index[:, :1])
    earlier_text = ~is_image & (torch.arange(12) < image_index[:, :1])
    assert changed[later_text].all() and not changed[earlier_text].any()
    # and layer by layer: a single block's visual outputs are independent too
    block = llm.layers[0]
    cos, sin = llm_module.rope_cos_sin(torch.arange(12).expand(2, 12), 8, 10000.0, h.dtype)
    mask = llm_module.build_mask(12, 0, torch.ones(2, 12, dtype=torch.bool), h.device)
    rows = llm_module.image_rows(span, 2, 12, h.device)
    one = block(h, cos, sin, mask, None, rows)
    two = block(edited, cos, sin, mask, None, rows)
    assert not (one != two).any(-1)[others].any()


@pytest.mark.parametrize("span", SPANS, ids=SPAN_IDS)
def test_text_sees_every_visual_token_and_no_later_text(llm, span):
    torch.manual_seed(0)
    h = torch.randn(2, 12, 32)
    is_image, _ = image_mask(span)
    text = (~is_image).nonzero()[:, 1].view(2, -1)
    edited = h.clone()
    edited[torch.arange(2), text[:, -3]] += torch.randn(32)       # the third-last text token
    changed = (run(llm, h, span=span) != run(llm, edited, span=span)).any(-1)
    position = text[:, -3:-2]
    assert not changed[torch.arange(12) < position].any(), "an earlier token saw a later text token"
    assert not changed[is_image].any(), "a visual token saw a text token"
    assert changed[~is_image & (torch.arange(12) >= position)].all()
    # a text token before the image (causal) does not see it; every text token after it does
    edited = h.clone()
    edited[is_image] += 1.0
    changed = (run(llm, h, span=span) != run(llm, edited, span=span)).any(-1)
    first_image = is_image.int().argmax(1, keepdim=True)
    assert changed[~is_image & (torch.arange(12) > first_image)].all()
    assert not changed[~is_image & (torch.arange(12) < first_image)].any()


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
    y = block.self_attn.composite(x, cos, sin, mask, None, llm_module.image_rows(SPAN, 1, 12, h.device))
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


def image_after_text(model, prompts, run):
    """The prompts with the image's place marked after their BOS (and text after it, so that
    forward's text logits hold every prediction): one marker, or a run."""
    marker = [model.config.image_token_id] * (model.config.n_image_tokens if run else 1)
    return [p[:1] + marker + p[1:] for p in prompts]


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("layout", ["image-first", "one-marker", "marker-run"])
def test_cached_generation_matches_recomputation(fusion, attention, layout):
    model = tiny_model(std=0.3, fusion=fusion, attention=attention)
    model.config.eos_id = 3
    torch.manual_seed(2)
    images = torch.rand(3, 3, 32, 32)
    PROMPTS = globals()["PROMPTS"] if layout == "image-first" else \
        image_after_text(model, globals()["PROMPTS"], layout == "marker-run")
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
