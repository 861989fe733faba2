"""Conversations: templates, label masks, the image anywhere in a batch, Shapes questions, LLaVA's
data formats and their bad input."""

import json
import random
from collections import Counter

import pytest
import torch

import sample
import train
from config import run_cli
from conftest import tiny_model
from sources.conversation import ConversationError, render, stop_id, tokenize
from sources.data import Sample, build_tokenizer, read_samples, sample_tokens, template_words
from training.metrics import shapes_questions
from sources.shapes import (COLORS, COUNT_WORDS, POSITIONS, QUESTION_TYPES, SHAPES, named_by, parse_caption, question_about,
                    shapes_split)
from test_bad_input import TINY_RUN, expect_error, image, run_dir  # noqa: F401 (a fixture)

N_IMAGE = 3
WORDS = ["what", "colour", "is", "the", "star", "?", "red", "how", "many", "objects", "are", "there", "two"]
TWO_TURNS = [{"from": "human", "value": "<image>\nwhat colour is the star?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "how many objects are there?"}, {"from": "gpt", "value": "two"}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(sorted(set(template_words() + WORDS)))


def llava_v1_labels(tokenizer, system, turns, n_image):
    """LLaVA's own algorithm (llava/train/train.py, preprocess_v1), written independently: the
    prompt joined as conv_vicuna_v1 writes it, cut into rounds at "</s>", each round's instruction
    (up to and including "ASSISTANT: ") masked, counted in tokens with <image> as n_image."""
    def count(text):
        parts = text.split("<image>")
        return sum(len(tokenizer.encode(p, add_special_tokens=False).ids) for p in parts) + n_image * (len(parts) - 1)

    def ids(text):
        out = []
        for k, part in enumerate(text.split("<image>")):
            out += [-200] * n_image * bool(k) + tokenizer.encode(part, add_special_tokens=False).ids
        return out
    rounds = [f"USER: {turns[i]['value']} ASSISTANT: {turns[i + 1]['value']}" for i in range(0, len(turns), 2)]
    conversation = system + " " + "</s>".join(rounds) + "</s>"
    input_ids = [1] + ids(conversation)
    labels = list(input_ids)
    position = 1
    labels[0] = -100
    for k, round_text in enumerate(conversation.split("</s>")[:-1]):
        if k == 0:
            round_text = round_text[len(system) + 1:]
            labels[position:position + count(system + " ")] = [-100] * count(system + " ")
            position += count(system + " ")
        instruction = round_text.split("ASSISTANT: ")[0] + "ASSISTANT: "
        labels[position:position + count(instruction)] = [-100] * count(instruction)
        position += count(round_text) + 1                       # the round and its "</s>"
    return input_ids, labels


def test_vicuna_v1_two_turns_label_mask_matches_llava(tokenizer):
    from sources.conversation import VICUNA_SYSTEM
    pieces = render(TWO_TURNS, "vicuna_v1")
    assert "".join(p for p, _ in pieces) == (
        f"{VICUNA_SYSTEM} USER: <image>\nwhat colour is the star? ASSISTANT: red</s>"
        "USER: how many objects are there? ASSISTANT: two</s>")
    ids, labels = tokenize(pieces, tokenizer, "vicuna_v1", N_IMAGE, -200, 1, 2)
    expected_ids, expected_labels = llava_v1_labels(tokenizer, VICUNA_SYSTEM, TWO_TURNS, N_IMAGE)
    assert ids == expected_ids
    assert labels == expected_labels
    trained = [tokenizer.id_to_token(t) for t in labels if t != -100]
    assert trained == ["red", "</s>", "two", "</s>"]            # the answers and their end of turn
    assert stop_id(tokenizer, "vicuna_v1", 2) == tokenizer.token_to_id("</s>")


def test_chatml_and_plain(tokenizer):
    pieces = render(TWO_TURNS, "chatml")
    assert "".join(p for p, _ in pieces) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        "what colour is the star?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\n"
        "how many objects are there?<|im_end|>\n<|im_start|>assistant\ntwo<|im_end|>\n")
    ids, labels = tokenize(pieces, tokenizer, "chatml", N_IMAGE, -200, 1, 2)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>")      # no BOS
    assert [tokenizer.id_to_token(t) for t in labels if t != -100] == ["red", "<|im_end|>", "two", "<|im_end|>"]
    prompt = render(TWO_TURNS[:1], "chatml", for_generation=True)
    assert "".join(p for p, _ in prompt).endswith("<|im_start|>assistant\n")
    ids, labels = tokenize(render(TWO_TURNS, "plain"), tokenizer, "plain", N_IMAGE, -200, 1, 2)
    assert ids == [-200] * N_IMAGE + [1, tokenizer.token_to_id("red"), 2]       # the image, BOS, answer, EOS
    assert labels == [-100] * (N_IMAGE + 1) + ids[-2:]


def test_image_place_end_puts_the_image_after_its_turns_text_and_trains_the_same_tokens(tokenizer):
    start, end = render(TWO_TURNS, "chatml"), render(TWO_TURNS, "chatml", image_place="end")
    assert "".join(p for p, _ in end) == "".join(p for p, _ in start).replace(
        "user\n<image>\nwhat colour is the star?", "user\nwhat colour is the star?\n<image>")
    ids, labels = tokenize(end, tokenizer, "chatml", N_IMAGE, -200, 1, 2)
    question = [tokenizer.token_to_id(w) for w in ("what", "colour", "is", "the", "star", "?")]
    first_image = ids.index(-200)
    assert ids[first_image:first_image + N_IMAGE] == [-200] * N_IMAGE
    assert [t for t in ids[:first_image] if t in question] == question     # the whole question before it
    assert labels.count(-100) == tokenize(start, tokenizer, "chatml", N_IMAGE, -200, 1, 2)[1].count(-100)
    assert [t for t in labels if t != -100] == [t for t in tokenize(start, tokenizer, "chatml", N_IMAGE, -200, 1, 2)[1]
                                                if t != -100]
    plain = render(TWO_TURNS, "plain", image_place="end")                   # plain: the image leads always
    assert plain == render(TWO_TURNS, "plain")


@pytest.mark.parametrize("turns,has_image,match", [
    ([{"from": "robot", "value": "hi"}], True, "unknown role 'robot'"),
    ([{"from": "human", "value": "hi <image>"}, {"from": "gpt", "value": "x"}], False, "<image> in a record that has no image"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], True, "one <image> placeholder, not 2"),
    ([{"from": "gpt", "value": "x"}], False, "a assistant turn where a user turn belongs"),
])
def test_bad_conversations(turns, has_image, match):
    with pytest.raises(ConversationError, match=match):
        render(turns, "vicuna_v1", has_image)
    with pytest.raises(ConversationError, match="unknown template 'alpaca'"):
        render(TWO_TURNS, "alpaca")


def test_image_after_text_in_a_padded_batch_equals_each_row_alone():
    """Rows whose images start at different places (left padding), one marker or a run: each row's
    logits are those it has alone; a single marker is the same as a run."""
    model = tiny_model(std=0.3, fusion="sparsecut")
    N, M = model.config.n_image_tokens, model.config.image_token_id
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    rows = [[1, 7, 8] + [M] * N + [9, 10], [1] + [M] * N + [11, 12, 13, 14]]
    alone = [model(images[b:b + 1], torch.tensor([r]))[0] for b, r in enumerate(rows)]
    one_marker = model(images[:1], torch.tensor([[1, 7, 8, M, 9, 10]]))[0]
    torch.testing.assert_close(one_marker, alone[0])
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), True
    for attention in ("causal", "composite"):
        model.config.attention = attention
        alone = [model(images[b:b + 1], torch.tensor([r]))[0] for b, r in enumerate(rows)]
        batched, _ = model(images, ids, attention_mask=mask)
        for b, r in enumerate(rows):
            text = len(r) - N
            torch.testing.assert_close(batched[b, -text:], alone[b][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one run of 16 image_token_id"):
        model(images[:1], torch.tensor([[1, M, 5, M]]))


def test_loss_is_next_token_over_the_whole_sequence():
    """The token after the image is predicted from the image's last row, as in transformers' LLaVA."""
    model = tiny_model(std=0.3)
    N, M = model.config.n_image_tokens, model.config.image_token_id
    images = torch.rand(1, 3, 32, 32)
    ids = torch.tensor([[1, 5] + [M] * N + [9, 10]])
    labels = torch.full_like(ids, -100)
    labels[0, -2] = 9                                          # the first text token after the image
    _, loss = model(images, ids, labels)
    h, span, injected, _, _, _ = model.embed(images, ids)
    hidden = model.llm(inputs_embeds=h, injections=injected, image_span=span, return_hidden=True)
    expected = torch.nn.functional.cross_entropy(model.llm.lm_head(hidden[:, 1 + N]), torch.tensor([9]))
    torch.testing.assert_close(loss, expected)


def test_text_only_rows_never_see_their_blank_image(tokenizer):
    """A text-only sample's image run goes after its text, where causal order hides it."""
    config = train.parse_args(["--template", "vicuna_v1", "--vit.image_size", "16", "--vit.patch_size", "8"])
    text_only = Sample([{"from": "human", "value": "what is the star?"}, {"from": "gpt", "value": "red"}], "red", False)
    ids, labels = sample_tokens(tokenizer, text_only, config)
    N, M = config.model.n_image_tokens, config.model.image_token_id
    assert ids[-N:] == [M] * N and M not in ids[:-N] and labels[-N:] == [-100] * N
    model = tiny_model(std=0.3)
    ids = torch.tensor([[1, 5, 7, 9, 11] + [M] * model.config.n_image_tokens])      # text, then the run
    for attention in ("causal", "composite"):
        model.config.attention = attention
        a, _ = model(torch.rand(1, 3, 32, 32), ids)
        b, _ = model(torch.rand(1, 3, 32, 32), ids)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shapes_questions_are_answered_by_the_scene():
    rng = random.Random(0)
    _, captions = shapes_split("val", 200)
    kinds = set()
    for caption in captions:
        objects, _ = parse_caption(caption)
        for kind in QUESTION_TYPES:
            question, answer = question_about(objects, kind, rng)
            words = question.rstrip("?").split()
            by_position = any(question.endswith(f"at the {p}?") for p in POSITIONS)
            assert named_by(question) == ("" if kind == "count" else "position" if by_position else "content")
            if question.startswith("is there"):
                kinds.add("exists")
                assert answer == ("yes" if any((o.color, o.shape) == (words[3], words[4]) for o in objects) else "no")
            elif question.startswith("how many"):
                assert answer == COUNT_WORDS[len(objects)]
            elif question.startswith("where"):
                assert [o.position for o in objects if (o.color, o.shape) == (words[3], words[4])] == [answer]
            elif "at the" in question:
                position = question.rstrip("?").split(" at the ")[1]
                obj = next(o for o in objects if o.position == position)
                assert answer == getattr(obj, "color" if words[1] == "colour" else words[1])
            else:                                                # named by colour and shape, or shape
                named = [o for o in objects if o.shape == words[-1] and (words[-2] not in COLORS or o.color == words[-2])]
                assert len(named) == 1 and answer == getattr(named[0], "color" if words[1] == "colour" else words[1])
            kinds.add(kind)
    assert kinds == set(QUESTION_TYPES) and {w for w in COLORS} and SHAPES
    exists = [q.caption for _, kind, q in shapes_questions([Sample([], c) for c in captions]) if kind == "exists"]
    assert 0.3 < exists.count("yes") / len(exists) < 0.7          # balanced


def test_vqa_is_reported_by_how_the_question_names_its_object(monkeypatch):
    """vqa_by_position_acc / vqa_by_content_acc: a reader that answers only the questions naming
    the object by position (and counts) scores 1 and 0 on them; the types mix the two."""
    from training import metrics
    _, captions = shapes_split("val", 60)
    samples = [Sample([], c) for c in captions]
    questions = shapes_questions(samples)

    def position_reader(model, tokenizer, images, prompts, *args, **kwargs):   # knows where, not what
        asks = [q.turns[0]["value"] for q in prompts]
        return [q.caption if ask.startswith("<image>\nhow many") or any(ask.endswith(f" at the {p}?") for p in POSITIONS)
                else "?" for q, ask in zip(prompts, asks)]
    monkeypatch.setattr(metrics, "answer", position_reader)
    result = metrics.vqa_metrics(None, None, torch.zeros(len(samples), 1), samples, None, "cpu")
    assert result["vqa_by_position_acc"] == 1.0 and result["vqa_by_content_acc"] == 0.0
    assert result["vqa_count_acc"] == 1.0 and result["vqa_where_acc"] == result["vqa_exists_acc"] == 0.0
    assert 0 < result["vqa_color_acc"] < 1                         # by position or by shape
    named = Counter(named_by(q.turns[0]["value"]) for _, _, q in questions)
    right = named["position"] + named[""]
    assert result["vqa_acc"] == right / len(questions)


def test_shapes_conversations_mix_caption_and_questions():
    """random: the caption request and every question in one conversation, the image in the first
    user turn; split: the caption alone or the questions alone, about half each; 0 questions: the
    caption alone."""
    from sources.data import shapes_turns
    from sources.shapes import CAPTION_REQUEST
    _, captions = shapes_split("val", 200)
    rng = random.Random(0)
    caption_alone = 0
    for mix in ("random", "split"):
        for caption in captions:
            turns = shapes_turns(caption, rng, "chatml", 4, mix)
            asked = [t["value"].replace("<image>\n", "") for t in turns[0::2]]
            assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
            has_caption = CAPTION_REQUEST in asked
            if has_caption:
                assert turns[asked.index(CAPTION_REQUEST) * 2 + 1]["value"] == caption
            if mix == "random":
                assert has_caption and len(asked) == 5
            else:
                assert asked == [CAPTION_REQUEST] if has_caption else len(asked) == 4
                caption_alone += has_caption
        assert shapes_turns(captions[0], rng, "chatml", 0, mix) == [
            {"from": "human", "value": f"<image>\n{CAPTION_REQUEST}"}, {"from": "gpt", "value": captions[0]}]
    assert 60 < caption_alone < 140
    for share in (0.0, 1.0):                  # split: the caption alone in that share of conversations
        asked = [shapes_turns(caption, rng, "chatml", 2, "split", share)[0]["value"] for caption in captions]
        assert sum(CAPTION_REQUEST in question for question in asked) == share * len(captions)


def test_llava_formats(tmp_path, tokenizer):
    """LLaVA-665K: several turns, <image> anywhere in the first turn, records without an image;
    LCS-558K with plain: the caption alone."""
    image(tmp_path, "a.png")
    records = [{"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "what colour is the star?\n<image>"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many objects are there?"}, {"from": "gpt", "value": "two"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "what is the star?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    samples = read_samples(str(tmp_path))
    assert [(p is not None, s.has_image, s.caption) for p, s in samples] == [(True, True, "red"), (False, False, "red")]
    config = train.parse_args(["--template", "vicuna_v1", "--vit.image_size", "16", "--vit.patch_size", "8"])
    N, M = config.model.n_image_tokens, config.model.image_token_id
    ids, labels = sample_tokens(tokenizer, samples[0][1], config)
    first_text = ids.index(M)
    assert ids[first_text:first_text + N] == [M] * N
    assert [tokenizer.id_to_token(t) for t in labels if t != -100] == ["red", "</s>", "two", "</s>"]
    config.model.template = "plain"
    ids, labels = sample_tokens(tokenizer, samples[0][1], config)
    assert ids[:N + 1] == [M] * N + [1] and [t for t in labels if t != -100] == [tokenizer.token_to_id("red"), 2]


def test_conversation_bad_input_ends_in_one_line(tmp_path, capsys, run_dir):  # noqa: F811
    image(tmp_path, "a.png")
    for records, match in (
            ([{"image": "a.png", "conversations": [{"from": "robot", "value": "<image>"}]}], "unknown role 'robot'"),
            ([{"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}],
             "<image> in a record that has no image"),
            ([{"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                   {"from": "gpt", "value": "x"}]}], "one <image> placeholder, not 2")):
        (tmp_path / "data.json").write_text(json.dumps(records * 30))
        expect_error(train.main, [*TINY_RUN, "--data", tmp_path, "--out_dir", tmp_path / "out"], match, capsys)
        assert not (tmp_path / "out" / "checkpoint").exists()
    expect_error(train.main, [*TINY_RUN, "--template", "alpaca", "--out_dir", tmp_path / "out"],
                 "--template must be one of plain, vicuna_v1, chatml, not 'alpaca'", capsys)
    expect_error(train.main, [*TINY_RUN, "--question_mix", "shuffled", "--out_dir", tmp_path / "out"],
                 "--question_mix takes random or split, not 'shuffled'", capsys)
    expect_error(train.main, [*TINY_RUN, "--image_place", "middle", "--out_dir", tmp_path / "out"],
                 "--image_place takes start or end, not 'middle'", capsys)
    expect_error(sample.main, ["--image", tmp_path / "a.png", "--checkpoint", run_dir, "--prompt", "what " * 300],
                 "does not fit the context of", capsys)


def test_a_chat_run_reports_vqa_per_type_and_answers_a_prompt(tmp_path, capsys):
    """tiny-chat end to end: trains on conversations, eval.json holds vqa_acc overall and per
    question type, the checkpoint records its template, and sample.py answers --prompt."""
    import eval as eval_script
    from test_cli import run
    out = tmp_path / "chat"
    run("train.py", "--config", "tiny-chat", *TINY_RUN, "--n_test", 7, "--out_dir", out)
    metrics = json.loads((out / "eval.json").read_text())
    assert {"vqa_acc", "object_f1"} <= set(metrics)
    assert {f"vqa_{kind}_acc" for kind in QUESTION_TYPES} <= set(metrics)   # 7 images, 14 questions
    saved = json.loads((out / "checkpoint" / "config.json").read_text())
    assert saved["template"] == "chatml" and saved["visual_norm"] and saved["llm"]["qk_norm"]
    image(tmp_path, "a.png")
    result = run("sample.py", "--image", tmp_path / "a.png", "--checkpoint", out, "--prompt", "what colour is the star?")
    assert len(result.stdout.strip().splitlines()) == 1
    run_cli(eval_script.main, ["--checkpoint", str(out)])
    assert json.loads((out / "eval_test.json").read_text()) == metrics        # eval reads the run's template
    expect_error(sample.main, ["--image", tmp_path / "a.png", "--checkpoint", out, "--prompt", "what " * 300],
                 "a prompt of 318 tokens (the image counts 4) does not fit the context of 256", capsys)


def test_question_weights_set_how_often_each_type_is_asked():
    """--question_weights: the training questions' types drawn with those weights (unnamed types
    1); weight 0 never asked; without weights every type alike, drawn as before the option."""
    from sources.data import shapes_turns
    from sources.shapes import type_weights
    _, captions = shapes_split("val", 300)
    kind_of = lambda q: ("exists" if q.startswith("is there") else "where" if q.startswith("where") else
                         "count" if q.startswith("how many") else q.split()[1].replace("colour", "color"))
    def asked(weights):
        rng = random.Random(0)
        return [kind_of(t["value"].replace("<image>\n", "")) for c in captions
                for t in shapes_turns(c, rng, "chatml", 4, "split", 0.0, weights)[0::2]]
    counts = Counter(asked(type_weights("count=0,exists=4,where=4,color=0")))
    assert set(counts) == {"shape", "texture", "size", "exists", "where"}
    assert 3 < counts["exists"] / counts["shape"] < 5.5 and 3 < counts["where"] / counts["size"] < 5.5
    assert type_weights("") is None and type_weights("where=2") == (1.0,) * 6 + (2.0,)
    plain = asked(None)
    assert set(plain) == set(QUESTION_TYPES) and max(Counter(plain).values()) < 1.3 * min(Counter(plain).values())
    rng, expected = random.Random(0), []
    for caption in captions:                          # no weights: the draw before --question_weights
        objects, _ = parse_caption(caption)
        expected += [kind_of(question_about(objects, rng.choice(QUESTION_TYPES), rng)[0]) for _ in range(4)]
        rng.random()                                  # split's caption-or-questions draw
    assert expected == plain
