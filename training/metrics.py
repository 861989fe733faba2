"""Caption metrics: Shapes attribute metrics (DESIGN.md section 6), BLEU-4 and CIDEr for real data.

Shapes: captions are parsed back into objects. `exact_match` compares whole captions;
`object_f1` matches objects on all five attributes (micro-averaged over the split); the i-th
predicted object is compared with the i-th true one (both in reading order) for `shape_acc`,
`color_acc`, `size_acc`, `texture_acc` and `position_acc`, a missing object counting as wrong;
`count_acc` is the share of images with the right number of objects; `unparsed` is the share of
predicted phrases that were not valid object phrases. Questions (chat templates): two per image,
of types that rotate over the split; `vqa_acc` is the share answered exactly, overall and per
type (`vqa_color_acc`, ...), and over the questions that name their object by its position or by
its content (`vqa_by_position_acc`, `vqa_by_content_acc`; shapes.named_by). `evaluate_run` gives
a run's eval.json.
"""

import math
import random
from collections import Counter

import torch

from sources.conversation import stop_id
from sources.data import Sample, caption_turns, conversation_tokens, decode, sample_tokens
from fusion import FUSIONS
from sources.shapes import QUESTION_TYPES, named_by, parse_caption, question_about

ATTRIBUTES = ("shape", "color", "size", "texture", "position")


def shapes_metrics(predictions, references):
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    true_positive = n_pred = n_true = right_count = n_phrases = n_unparsed = 0
    correct = Counter()
    for prediction, reference in zip(predictions, references):
        predicted, unparsed = parse_caption(prediction)
        truth, _ = parse_caption(reference)
        n_phrases += len(predicted) + len(unparsed)
        n_unparsed += len(unparsed)
        true_positive += sum((Counter(predicted) & Counter(truth)).values())
        n_pred, n_true = n_pred + len(predicted), n_true + len(truth)
        right_count += len(predicted) == len(truth)
        for i, obj in enumerate(truth):
            if i < len(predicted):
                for attribute in ATTRIBUTES:
                    correct[attribute] += getattr(predicted[i], attribute) == getattr(obj, attribute)
    n = max(len(references), 1)
    metrics = {"exact_match": exact / n,
               "object_f1": 2 * true_positive / max(n_pred + n_true, 1)}
    metrics.update({f"{a}_acc": correct[a] / max(n_true, 1) for a in ATTRIBUTES})
    metrics["count_acc"] = right_count / n
    metrics["unparsed"] = n_unparsed / max(n_phrases, 1)
    return metrics


def ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(predictions, references_list):
    """Corpus BLEU-4 (Papineni et al.): clipped n-gram precisions, geometric mean, brevity penalty."""
    matches, totals = [0] * 4, [0] * 4
    pred_len = ref_len = 0
    for prediction, references in zip(predictions, references_list):
        words = prediction.split()
        refs = [r.split() for r in references]
        pred_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            counts = ngrams(words, n)
            best = Counter()
            for ref in refs:
                best |= ngrams(ref, n)
            matches[n - 1] += sum((counts & best).values())
            totals[n - 1] += max(len(words) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = min(0.0, 1 - ref_len / max(pred_len, 1))
    return math.exp(log_precision + brevity)


def cider(predictions, references_list, sigma=6.0):
    """CIDEr-D (Vedantam et al.): tf-idf n-gram cosine (n = 1..4) with a length penalty, x10."""
    n_images = len(references_list)
    frequency = Counter()
    for refs in references_list:                                  # document frequency per image
        seen = set()
        for ref in refs:
            for n in range(1, 5):
                seen |= set(ngrams(ref.split(), n))
        frequency.update(seen)

    def vector(text, n):
        counts = ngrams(text.split(), n)
        return {g: c * math.log(max(1.0, n_images) / max(1.0, frequency[g])) for g, c in counts.items()}

    total = 0.0
    for prediction, references in zip(predictions, references_list):
        score = 0.0
        for n in range(1, 5):
            vp = vector(prediction, n)
            norm_p = math.sqrt(sum(v * v for v in vp.values()))
            for ref in references:
                vr = vector(ref, n)
                norm_r = math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(vp[g], vr[g]) * vr[g] for g in vp if g in vr)
                penalty = math.exp(-((len(prediction.split()) - len(ref.split())) ** 2) / (2 * sigma ** 2))
                if norm_p and norm_r:
                    score += penalty * dot / (norm_p * norm_r)
        total += score / 4 / len(references) * 10
    return total / max(len(predictions), 1)


@torch.no_grad()
def answer(model, tokenizer, images, samples, config, device, max_new_tokens, batch=100, **sampling):
    """The model's reply to each sample (a conversation ending with a user turn), in the run's
    template, greedy unless sampling options say otherwise."""
    model.eval()
    m = config.model
    stop = stop_id(tokenizer, m.template, m.eos_id)
    replies = []
    for i in range(0, len(samples), batch):
        prompts = [sample_tokens(tokenizer, s, config, for_generation=True)[0] for s in samples[i:i + batch]]
        for ids in model.generate(images[i:i + batch].to(device), prompts, max_new_tokens=max_new_tokens,
                                  eos_id=stop, **sampling):
            replies.append(decode(tokenizer, ids).strip())
    return replies


def caption_request(sample, shapes):
    """What the caption metrics ask: on Shapes the caption request alone (a training conversation
    may open with a question), else the sample's first user turn (the instruction its caption
    answers)."""
    if shapes:
        return Sample(caption_turns(sample.caption)[:1], sample.caption)
    return Sample(sample.turns[:1] if sample.turns[0]["from"] != "system" else sample.turns[:2],
                  sample.caption, sample.has_image)


def shapes_questions(samples, seed=0):
    """Two questions per Shapes image, of types rotating over the split: (image index, type, Sample)."""
    questions = []
    for i, sample in enumerate(samples):
        objects, _ = parse_caption(sample.caption)
        rng = random.Random(seed * 1_000_003 + i)
        for kind in (QUESTION_TYPES[(2 * i) % len(QUESTION_TYPES)], QUESTION_TYPES[(2 * i + 1) % len(QUESTION_TYPES)]):
            question, reply = question_about(objects, kind, rng)
            questions.append((i, kind, Sample([{"from": "human", "value": f"<image>\n{question}"}], reply)))
    return questions


def vqa_metrics(model, tokenizer, images, samples, config, device, **sampling):
    questions = shapes_questions(samples)
    index = torch.tensor([i for i, _, _ in questions])
    replies = answer(model, tokenizer, images[index], [q for _, _, q in questions], config, device,
                     max_new_tokens=4, **sampling)
    right, asked = Counter(), Counter()
    for (_, kind, question), reply in zip(questions, replies):
        for group in (kind, "by_" + named_by(question.turns[0]["value"])):
            asked[group] += 1
            right[group] += reply == question.caption
    metrics = {"vqa_acc": sum(right[kind] for kind in QUESTION_TYPES) / max(len(questions), 1)}
    metrics.update({f"vqa_{group}_acc": right[group] / asked[group]
                    for group in (*QUESTION_TYPES, "by_position", "by_content") if asked[group]})
    return metrics


def evaluate(model, tokenizer, images, samples, config, shapes=True, device="cpu", **sampling):
    """Caption the images (reply to each sample's first request) greedily and score the replies
    against the samples' captions; on Shapes with a chat template, ask questions too."""
    predictions = answer(model, tokenizer, images, [caption_request(s, shapes) for s in samples], config, device,
                         config.max_caption_tokens - 1, **sampling)
    references = [s.caption for s in samples]
    if not shapes:
        return {"bleu4": bleu4(predictions, [[r] for r in references]),
                "cider": cider(predictions, [[r] for r in references])}
    metrics = shapes_metrics(predictions, references)
    if config.model.template != "plain":
        metrics.update(vqa_metrics(model, tokenizer, images, samples, config, device, **sampling))
    return metrics


@torch.no_grad()
def split_loss(model, data, images, samples, config, device, dtype, batch=64):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch):
        input_ids, labels = conversation_tokens(data.tokenizer, samples[i:i + batch], config)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(images[i:i + batch].to(device), input_ids.to(device), labels.to(device))
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def evaluate_run(model, data, config, split="test", device="cpu", dtype=torch.float32, **sampling):
    """The metrics of a run, as train.py writes them to eval.json and eval.py reproduces them:
    captions (and questions) of `split` (n_test images, or n_val for val) scored, and val_loss
    on the val split. Everything comes from the run's config: data, splits, seed, template."""
    device = torch.device(device)
    images, samples = data.split(split, config.n_val if split == "val" else config.n_test)
    metrics = evaluate(model, data.tokenizer, images, samples, config, shapes=config.data == "shapes",
                       device=device, **sampling)
    metrics["val_loss"] = split_loss(model, data, *data.split("val", config.n_val), config, device, dtype)
    return metrics


def print_table(metrics, title):
    print(f"| {title} | value |\n|---|---|")
    for name, value in metrics.items():
        print(f"| {name} | {value:.4f} |")


def closed_form_flops(config, text_tokens, head_rows=None):
    """Forward FLOPs per sample, 2 per multiply-add, split vision / fusion / llm (+ llm_attention,
    the part of llm inside scaled_dot_product_attention, which computes the full rectangle).

    vision: V views (5, or 1 for a mode that sees the low-res view only) x (patch embedding +
            vit_depth blocks of qkv/out (4 D^2), MLP (2 D M) and attention (2 T^2 D)).
    fusion: the mode's own count (`Fusion.flops`: its fusers on the input and every injection).
    llm:    per layer, q rows Q (T, or the text rows under composite attention), F rows through
            the FFN (T, or the text rows without visual FFN): q 2 Q d Hh, k/v 2 T d 2 Kh, o 2 T Hh d
            (the aligner also uses o), FFN 2 F 3 d M, attention 2 Q T Hh x 2; then the head on
            head_rows rows (training: the text; prefill: the last row only).
    """
    with torch.device("meta"):                                   # shapes only, no memory
        fusion = FUSIONS[config.fusion](config)
    v, l = config.vit, config.llm
    G2, D, d = v.grid ** 2, v.width, l.width
    views = 5 if fusion.high_res else 1
    T_vit = G2 + int(v.class_token)
    vit_attention = views * fusion.vit_depth * 2 * 2 * T_vit * T_vit * D
    block = 2 * T_vit * (4 * D * D + 2 * D * v.mlp_dim)
    vision = views * (2 * G2 * 3 * v.patch_size ** 2 * D + fusion.vit_depth * block) + vit_attention
    N = config.n_image_tokens
    T = N + text_tokens
    composite = config.attention == "composite"
    Q = T - N if composite else T
    F = T - N if composite and not config.visual_ffn else T
    hd, H, K = l.dim_per_head, l.n_head, l.n_kv_head
    attention = 2 * 2 * Q * T * H * hd
    layer = 2 * Q * d * H * hd + 2 * T * d * 2 * K * hd + 2 * T * H * hd * d + 2 * F * 3 * d * l.mlp_dim
    head = 2 * (text_tokens if head_rows is None else head_rows) * d * l.vocab_size
    return {"vision": vision, "fusion": fusion.flops(), "llm": l.n_layer * (layer + attention) + head,
            "vision_attention": vit_attention, "llm_attention": l.n_layer * attention}
