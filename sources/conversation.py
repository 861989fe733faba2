"""Conversations: chat templates, the image's place, and which tokens the loss is taken on.

A conversation is a list of turns `{"from": role, "value": text}`, as in LLaVA's JSON: roles
`system`, `human` (or `user`) and `gpt` (or `assistant`); the placeholder `<image>` marks where
the image goes, at most once. A template renders it to token ids and labels; the loss is taken
on the assistant turns and their end-of-turn token only (labels -100 elsewhere).

Templates:
- `plain` (LLaVA-1.5 stage 1): the image, then BOS, the first answer and EOS; instructions are
  dropped. (LLaVA's `conv_llava_plain` puts BOS before the image and ends with a newline; here the
  caption ends with EOS so that generation stops, and the image leads as in every checkpoint
  written before templates existed.)
- `vicuna_v1` (LLaVA-1.5 stage 2, LLaVA's `conversation.py`, SeparatorStyle.TWO): BOS, then
  `SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>`.
- `chatml` (Qwen2 / SmolLM2): `<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n
  <|im_start|>assistant\nA<|im_end|>\n`, no BOS.

Labels come from character ranges: the rendered text is tokenised whole (any tokenizer, BPE
merges across the template's seams included) and a token is trained when it overlaps an answer or
its end of turn. The image placeholder becomes a run of `n_image` image-token ids.

The image's place: LLaVA moves `<image>` to the start of its turn (`image_place="start"`, every
template's default); `"end"` puts it after the turn's text instead, so that the visual tokens can
attend to the question (not in LLaVA; measured in the README, "What was tried for the questions").
"""

from dataclasses import dataclass

IMAGE = "<image>"
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class ConversationError(ValueError):
    """A conversation the template cannot render; the message says which and why."""


@dataclass(frozen=True)
class Template:
    """How turns become text. user/assistant: format strings around a turn's text; end: the
    end-of-turn text after an answer (trained with it; generation stops at it)."""
    name: str
    system: str = ""               # the default system prompt
    system_format: str = "{}"
    user: str = "{}"
    assistant: str = "{}"          # the header before an answer, then the answer
    end: str = ""
    between: str = ""              # after an end of turn, untrained (chatml's newline)
    bos: bool = False


TEMPLATES = {
    "plain": Template("plain"),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, system_format="{} ", user="USER: {} ",
                          assistant="ASSISTANT: ", end="</s>", bos=True),
    "chatml": Template("chatml", system="You are a helpful assistant.",
                       system_format="<|im_start|>system\n{}<|im_end|>\n", user="<|im_start|>user\n{}<|im_end|>\n",
                       assistant="<|im_start|>assistant\n", end="<|im_end|>", between="\n"),
}
SPECIAL_TEXT = ("</s>", "<|im_start|>", "<|im_end|>")     # word-level tokenizers add these


def template(name):
    if name not in TEMPLATES:
        raise ConversationError(f"unknown template {name!r}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_turns(turns, has_image, where="conversation"):
    """(system text or None, [(role, text)]) of a LLaVA-style turn list, checked: known roles, user
    and assistant alternating from a user turn, one <image> exactly when there is an image."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError(f"{where}: conversations must be a non-empty list of turns")
    system, checked = None, []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"{where} turn {i}: a turn is {{\"from\": role, \"value\": text}}")
        role = ROLES.get(turn["from"])
        if role is None:
            raise ConversationError(f"{where} turn {i}: unknown role {turn['from']!r} (roles: "
                                    f"{', '.join(ROLES)})")
        if role == "system" and i == 0:
            system = str(turn["value"])
            continue
        expected = "user" if len(checked) % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(f"{where} turn {i}: a {role} turn where a {expected} turn belongs")
        checked.append((role, str(turn["value"])))
    n_images = sum(text.count(IMAGE) for _, text in checked)
    if has_image and n_images != 1:
        raise ConversationError(f"{where}: a record with an image needs one {IMAGE} placeholder, not {n_images}")
    if not has_image and n_images:
        raise ConversationError(f"{where}: {IMAGE} in a record that has no image")
    return system, checked


IMAGE_PLACES = ("start", "end")


def render(turns, template_name, has_image=True, for_generation=False, where="conversation",
           image_place="start"):
    """The conversation as (text pieces, trained) pairs. LLaVA's normalisation: the <image>
    placeholder moves to the start of its turn, followed by a newline (image_place "end": to its
    end, after a newline). for_generation: the turns end with a user turn, and the text ends with
    the assistant header."""
    t = template(template_name)
    system, checked = check_turns(turns, has_image, where)
    if for_generation and checked[-1][0] != "user":
        raise ConversationError(f"{where}: a prompt to answer ends with a user turn")
    if t.name == "plain":                                     # the image and the answer alone
        answers = [text for role, text in checked if role == "assistant"]
        pieces = [(IMAGE if has_image else "", False)]
        return pieces + ([(answers[0].strip(), True)] if answers and not for_generation else [])
    pieces = []
    system = t.system if system is None else system
    if system:
        pieces.append((t.system_format.format(system), False))
    for role, text in checked:
        if role == "user":
            if IMAGE in text:
                rest = text.replace(IMAGE, "").strip()
                text = IMAGE + "\n" + rest if image_place == "start" else rest + "\n" + IMAGE
            pieces.append((t.user.format(text.strip()), False))
        else:
            pieces += [(t.assistant, False), (text.strip() + t.end, True)] + [(t.between, False)] * bool(t.between)
    if for_generation:
        pieces.append((t.assistant.rstrip(" "), False))      # LLaVA's prompt ends "ASSISTANT:"
    return pieces


def tokenize(pieces, tokenizer, template_name, n_image, image_token_id, bos_id, eos_id):
    """(input_ids, labels) lists: the pieces' text tokenised whole between image placeholders, a
    token trained when it overlaps a trained piece; `n_image` image ids where <image> was."""
    t = template(template_name)
    text, trained_ranges = "", []
    for piece, trained in pieces:
        if trained:
            trained_ranges.append((len(text), len(text) + len(piece)))
        text += piece
    ids, labels = [], []
    if t.bos or (t.name == "plain" and IMAGE not in text):
        ids, labels = [bos_id], [-100]
    position = 0
    for k, chunk in enumerate(text.split(IMAGE)):
        if k:                                                 # the image run
            ids += [image_token_id] * n_image
            labels += [-100] * n_image
            position += len(IMAGE)
            if t.name == "plain":
                ids, labels = ids + [bos_id], labels + [-100]
        encoding = tokenizer.encode(chunk, add_special_tokens=False)
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            start, end = start + position, end + position
            ids.append(token)
            labels.append(token if any(start < e and s < end for s, e in trained_ranges) else -100)
        position += len(chunk)
    if t.name == "plain" and any(trained for _, trained in pieces):
        ids, labels = ids + [eos_id], labels + [eos_id]
    return ids, labels


def stop_id(tokenizer, template_name, eos_id):
    """The token that ends an answer: the template's end of turn, or EOS."""
    end = template(template_name).end
    token = tokenizer.token_to_id(end) if end else None
    return eos_id if token is None else token
