"""Shortcut plans."""

import pytest

from shortcuts import shortcut_plan


def test_uniform_reproduces_the_released_13b_layout():
    plan = shortcut_plan("uniform", vit_layers=24, llm_layers=40)
    assert [v for v, _ in plan] == [1, 4, 7, 10, 13, 16, 19, 22]
    assert [l for _, l in plan] == [4, 9, 14, 19, 24, 29, 34, 39]


@pytest.mark.parametrize("vit_layers,llm_layers", [(24, 32), (12, 30), (4, 4), (3, 8)])
def test_patterns_for_any_depth(vit_layers, llm_layers):
    for pattern in ("uniform", "skew_bottom", "skew_top", "reverse", "dense"):
        plan = shortcut_plan(pattern, vit_layers, llm_layers)
        assert plan, pattern
        assert all(1 <= v <= vit_layers and 0 <= l < llm_layers for v, l in plan)
        assert len({l for _, l in plan}) == len(plan)
    assert len(shortcut_plan("dense", vit_layers, llm_layers)) == llm_layers
    bottom = shortcut_plan("skew_bottom", vit_layers, llm_layers)
    top = shortcut_plan("skew_top", vit_layers, llm_layers)
    assert max(l for _, l in bottom) < llm_layers // 2 <= min(l for _, l in top)
    uniform = shortcut_plan("uniform", vit_layers, llm_layers)
    reverse = shortcut_plan("reverse", vit_layers, llm_layers)
    assert [v for v, _ in reverse] == [v for v, _ in uniform][::-1]
    assert shortcut_plan("none", vit_layers, llm_layers) == []


def test_explicit_plans_are_checked():
    assert shortcut_plan([(2, 0), [3, 5]], 4, 6) == [(2, 0), (3, 5)]
    with pytest.raises(ValueError, match=r"ViT layer 9 is out of range; valid ViT layers are 0\.\.4"):
        shortcut_plan([(9, 1)], 4, 6)
    with pytest.raises(ValueError, match=r"LLM layer 6 is out of range; valid LLM layers are 0\.\.5"):
        shortcut_plan([(1, 6)], 4, 6)
    with pytest.raises(ValueError, match="unknown shortcut pattern"):
        shortcut_plan("sparse", 4, 6)
