"""studies/lookup_oracle.py, the README's lookup diagnosis: its inputs are what it says they are."""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from studies import lookup_oracle as oracle  # noqa: E402
from sources.shapes import POSITIONS, ShapeObject  # noqa: E402


def test_each_object_fills_the_two_by_two_tokens_of_its_cell_and_nothing_else():
    star = ShapeObject("star", "red", "small", "dotted", "top right")
    features = oracle.object_features([star]).view(6, 6, -1)
    cell_row, cell_col = divmod(POSITIONS.index("top right"), 3)
    for row in range(6):
        for col in range(6):
            inside = row // 2 == cell_row and col // 2 == cell_col
            assert features[row, col].sum().item() == (4 if inside else 0)   # colour, shape, size, texture
    attributes = [v for values in oracle.ATTRIBUTES for v in values]
    named = {attributes[i] for i in features[0, 4].nonzero().flatten().tolist()}
    assert named == {"red", "star", "small", "dotted"}


@pytest.mark.parametrize("order", ["image-first", "question-first"])
def test_the_image_run_sits_where_the_order_says_and_only_the_answer_is_scored(order):
    _, input_ids, labels, kinds = oracle.batch(random.Random(0), 8, order, "the image .")
    prefix = len(oracle.words("the image ."))
    for ids, row_labels in zip(input_ids.tolist(), labels.tolist()):
        start = ids.index(oracle.IMAGE_ID)
        assert ids[start:start + oracle.N_IMAGE_TOKENS] == [oracle.IMAGE_ID] * oracle.N_IMAGE_TOKENS
        answer_at = ids.index(oracle.WORD_ID["<answer>"])
        assert (start == prefix) == (order == "image-first")
        assert start + oracle.N_IMAGE_TOKENS == answer_at or order == "image-first"
        scored = [i for i, label in enumerate(row_labels) if label != -100]
        assert scored[0] == answer_at                                      # predicts the first answer word
        assert [row_labels[i] for i in scored] == ids[answer_at + 1:answer_at + 1 + len(scored)]
    assert all(named in ("by_position", "by_content", "by_") for _, named in kinds)


def test_a_short_run_prints_the_table_and_bad_options_are_one_line(capsys):
    oracle.main(["--steps", "2", "--order", "question-first"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split()[:4] == ["step", "all", "by_position", "by_content"] and len(rows) == 3
    for argv, message in ((["--prefix", "hello there"], "'hello' is not a Shapes word"),
                          (["--order", "sideways"], "--order takes image-first or question-first"),
                          (["--steps", "0"], "must be positive")):
        with pytest.raises(SystemExit) as stop:
            oracle.run_cli(oracle.main, argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_with_an_encoder_its_frozen_tokens_and_shortcut_additions_reach_the_image_rows_only(tmp_path):
    """--encoder: rendered scenes through a run's ViT and fusion (frozen); the shortcuts' additions
    change the image rows and what follows them, never the rows before the image."""
    import torch
    from model import SparseCut
    SparseCut(oracle.tiny_chat().model).save_pretrained(tmp_path / "run")
    encoder = oracle.frozen_encoder(str(tmp_path / "run"))
    images, input_ids, labels, _ = oracle.batch(random.Random(0), 4, "question-first", "", images=True)
    assert images.shape[:2] == (4, 3) and 0 <= images.min() and images.max() <= 1   # the Shapes canvas
    torch.manual_seed(0)
    model = oracle.OracleModel(encoder, shortcuts=True)
    logits = model(images, input_ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    assert model.project.weight.grad is not None and model.llm.embed_tokens.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    model.shortcuts = False
    plain = model(images, input_ids)
    start = (input_ids == oracle.IMAGE_ID).int().argmax(1)
    for row in range(4):
        first = int(start[row])
        assert torch.equal(logits[row, :first], plain[row, :first])          # the question, before the image
        assert not torch.allclose(logits[row, first:], plain[row, first:])    # the image rows and the answer


def test_an_encoder_that_makes_other_tokens_is_one_line(tmp_path, capsys):
    from model import SparseCut
    config = oracle.tiny_chat().model
    config.vit.patch_size = 16                                             # 9 tokens, not 36
    SparseCut(config).save_pretrained(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        oracle.run_cli(oracle.main, ["--encoder", str(tmp_path / "run"), "--steps", "1"])
    assert stop.value.code == 2 and "makes 9 visual tokens of width 128" in capsys.readouterr().err
