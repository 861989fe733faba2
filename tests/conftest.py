"""Shared fixtures: tiny configs that run in milliseconds on a CPU."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm import LLMConfig  # noqa: E402
from model import SparseCut, SparseCutConfig  # noqa: E402
from vit import ViTConfig  # noqa: E402

FUSIONS = ("llava", "concat", "deepstack", "sparsecut")
ATTENTIONS = ("causal", "composite")


@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path_factory, monkeypatch):
    """Each test runs in an empty folder of its own, so default outputs (out/tiny) land there: a
    run the user made in the checkout (README: train, then test) neither fails a test nor is
    touched by one."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def tiny_config(**overrides):
    """ViT: 16x16 views of 4x4 patches (G = 4, 16 tokens), 3 layers; LLM: 3 layers, GQA 4/2."""
    vit = ViTConfig(image_size=16, patch_size=4, width=24, n_layer=3, n_head=2, mlp_dim=48)
    llm = LLMConfig(vocab_size=40, width=32, n_layer=3, n_head=4, n_kv_head=2, mlp_dim=64,
                    tie_embeddings=False)
    return SparseCutConfig(vit=vit, llm=llm, **overrides)


def tiny_model(std=0.02, seed=0, **overrides):
    """A tiny model; a larger init std spreads the logits so greedy decoding has no near-ties."""
    torch.manual_seed(seed)
    model = SparseCut(tiny_config(**overrides))
    if std != 0.02:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, std)
    return model.eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 32)
