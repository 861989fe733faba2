"""Data: real caption formats, image loading, the tokenizer, batching, and the two sources
(Shapes, from shapes.py, or a folder of captioned images) with a loader that prepares each
step's batches in worker processes.
"""

import csv
import json
import os
import re
import signal
import sys
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import random
from dataclasses import dataclass

from conversation import IMAGE, SPECIAL_TEXT, TEMPLATES, ConversationError, check_turns, render, tokenize
from shapes import (CAPTION_REQUEST, QUESTION_TYPES, parse_caption, question_about, question_vocabulary,
                    shapes_split, shapes_vocabulary)

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]           # ids 0, 1, 2, 3
TEMPLATE_TOKENS = list(SPECIAL_TEXT)                             # ids 4.. (conversation.py)


# --- tokenizer --------------------------------------------------------------------------------

def build_tokenizer(words):
    """A word-level tokenizer (lower-cased, punctuation split off) from the `tokenizers` package."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + TEMPLATE_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL_TOKENS + TEMPLATE_TOKENS)  # same ids; skipped by decode
    return tokenizer


def tokenizer_for_captions(captions, min_count=1):
    counts = {}
    for caption in captions:
        for word in re.findall(r"\w+|[^\w\s]", caption.lower()):
            counts[word] = counts.get(word, 0) + 1
    return build_tokenizer(sorted(w for w, c in counts.items() if c >= min_count))


def load_tokenizer(path):
    from tokenizers import Tokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise DataError(f"{path} has no tokenizer.json: is it a SparseCut checkpoint (or an LLM directory)?")
    try:
        return Tokenizer.from_file(file)
    except Exception as error:                    # the tokenizers package raises plain Exception
        raise DataError(f"{file} is not a readable tokenizer ({error})") from None


def encode(tokenizer, text, bos_id=1, eos_id=2):
    """[BOS] + token ids + [EOS] (the tokenizer's own template, if any, is not applied)."""
    return [bos_id] + tokenizer.encode(text, add_special_tokens=False).ids + [eos_id]


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def batch_captions(token_lists, max_len):
    """Right-padded input_ids and labels (-100 at padding) of shape (B, T)."""
    T = min(max_len, max(len(t) for t in token_lists))
    input_ids = torch.zeros(len(token_lists), T, dtype=torch.long)
    labels = torch.full((len(token_lists), T), -100, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        tokens = tokens[:T]
        input_ids[i, :len(tokens)] = torch.tensor(tokens)
        labels[i, :len(tokens)] = torch.tensor(tokens)
    return input_ids, labels


def to_tensor(images_uint8):
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div_(255)


# --- images and real caption formats -----------------------------------------------------------

class DataError(ValueError):
    """Bad input data; the message says what is wrong and what to do."""


def load_image(path, size=None):
    """Any file PIL reads (RGB, L, RGBA, P, 16-bit, ...) -> RGB float (3, H, W) in [0, 1]."""
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory, not an image file")
    if not os.path.exists(path):
        raise DataError(f"image {path} does not exist")
    if os.path.getsize(path) == 0:
        raise DataError(f"image {path} is an empty file")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                pixels = np.asarray(image, dtype=np.float32)
                pixels = pixels / (65535.0 if pixels.max() > 255 else 255.0)
                image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, (0, 0, 0))
                image.paste(rgba, mask=rgba.getchannel("A"))
            image = image.convert("RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path} is not a readable image ({error.__class__.__name__}: {error})") from None
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


@dataclass
class Sample:
    """One training or evaluation sample: a conversation (conversation.py) about an image (or
    none), and the caption that reference metrics and contrastive pretraining use."""
    turns: list
    caption: str
    has_image: bool = True


def caption_turns(caption, request=CAPTION_REQUEST):
    """A caption as a conversation: the user asks for it, the assistant gives it."""
    return [{"from": "human", "value": f"{IMAGE}\n{request}"}, {"from": "gpt", "value": caption}]


def read_samples(folder):
    """(image path or None, Sample) of a folder holding caption or conversation files in any
    supported format: COCO captions JSON, CSV/TSV `image,caption`, JSONL `{"image", "caption"}`,
    or LLaVA conversation JSON (LLaVA-665K, LCS-558K; records without an image are text-only)."""
    if not os.path.isdir(folder):
        raise DataError(f"data folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.endswith((".json", ".jsonl", ".csv", ".tsv")))
    if not files:
        raise DataError(f"{folder} has no caption file (.json COCO/LLaVA, .jsonl, .csv or .tsv)")
    records = []
    for name in files:
        records += parse_caption_file(os.path.join(folder, name))
    if not records:
        raise DataError(f"{folder}: the caption files hold no captions")
    records = [(os.path.join(folder, image) if image is not None else None, sample) for image, sample in records]
    missing = [image for image, _ in records if image is not None and not os.path.isfile(image)]
    if len(missing) > tolerated_bad(len(records)):      # a few are skipped like unreadable ones
        raise DataError(f"{folder}: {len(missing)} of {len(records)} captioned images are missing, "
                        f"e.g. {missing[:3]}")
    return records


def read_caption_pairs(folder):
    """(image path, caption) of the folder's records that have an image."""
    return [(image, sample.caption) for image, sample in read_samples(folder) if image is not None]


def tolerated_bad(n_images):
    """How many missing or unreadable images a folder may hold before the run stops: 1%."""
    return n_images // 100


def field(record, key, where):
    """record[key], or a DataError that names the file, the record and the field."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where} has no field {key!r}")
    return record[key]


JSON_SPACE = re.compile(r"[\s,]*")


def json_array(f, chunk_size=1 << 20):
    """The records of a file holding one JSON array, decoded one at a time: a 1 GB LLaVA-665K
    file is never held as text and as objects at once (only what the caller keeps stays)."""
    decoder, buffer = json.JSONDecoder(), f.read(chunk_size)
    position = JSON_SPACE.match(buffer).end() + 1                 # past the "["
    while True:
        position = JSON_SPACE.match(buffer, position).end()
        if position < len(buffer) and buffer[position] == "]":
            return
        try:
            if position == len(buffer):
                raise json.JSONDecodeError("more", buffer, position)
            record, position = decoder.raw_decode(buffer, position)
        except json.JSONDecodeError:                              # the record goes on in the file
            more = f.read(chunk_size)
            if not more:
                raise
            buffer, position = buffer[position:] + more, 0
            continue
        yield record


def llava_samples(records, path):
    """(image or None, Sample) of LLaVA conversation records, checked turn by turn."""
    for i, record in enumerate(records):
        where = f"{path} [{i}]"
        if not isinstance(record, dict):
            raise DataError(f"{where} is not a record (a JSON object with conversations)")
        image = record.get("image")
        try:
            _, turns = check_turns(field(record, "conversations", where), image is not None, where)
        except ConversationError as error:
            raise DataError(str(error)) from None
        answers = [text for role, text in turns if role == "assistant"]
        if answers:
            yield image, Sample(record["conversations"], answers[0].strip(), image is not None)


def pairs_to_samples(pairs):
    return [(image, Sample(caption_turns(caption), caption)) for image, caption in pairs]


def parse_caption_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".csv", ".tsv")):
                rows = list(csv.reader(f, delimiter="\t" if path.endswith(".tsv") else ","))
                if rows and [c.strip().lower() for c in rows[0][:2]] == ["image", "caption"]:
                    rows = rows[1:]
                return pairs_to_samples([(row[0].strip(), row[1].strip()) for row in rows if len(row) >= 2])
            if path.endswith(".jsonl"):
                records = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
                return pairs_to_samples([(field(r, "image", f"{path} line {n}"),
                                          str(field(r, "caption", f"{path} line {n}")).strip()) for n, r in records])
            opening = f.read(4096).lstrip()[:1]
            f.seek(0)
            if opening == "[":                                    # LLaVA conversations, streamed
                return list(llava_samples(json_array(f), path))
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error})") from None
    if isinstance(data, dict) and "annotations" in data:          # COCO captions
        files = {field(image, "id", f"{path} images[{i}]"): field(image, "file_name", f"{path} images[{i}]")
                 for i, image in enumerate(field(data, "images", path))}
        pairs = []
        for i, a in enumerate(data["annotations"]):
            where = f"{path} annotations[{i}]"
            image_id = field(a, "image_id", where)
            if image_id not in files:
                raise DataError(f"{where}: image_id {image_id} is not in the file's images")
            pairs.append((files[image_id], str(field(a, "caption", where)).strip()))
        return pairs_to_samples(pairs)
    raise DataError(f"{path} is neither COCO captions JSON nor LLaVA conversation JSON")


# --- data --------------------------------------------------------------------------------------

def template_words():
    """The words of every template's fixed text (system prompts, role names), for word-level vocabularies."""
    texts = [t.system + t.user + t.assistant for t in TEMPLATES.values()]
    return [w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.replace("{}", " ").lower())]


def shapes_turns(caption, rng, template):
    """A Shapes training conversation: the caption and one question of a random type, in random
    order, the image in the first user turn (`plain`: the caption alone)."""
    if template == "plain":
        return caption_turns(caption)
    objects, _ = parse_caption(caption)
    exchanges = [(CAPTION_REQUEST, caption), question_about(objects, rng.choice(QUESTION_TYPES), rng)]
    rng.shuffle(exchanges)
    turns = []
    for k, (question, answer) in enumerate(exchanges):
        turns += [{"from": "human", "value": f"{IMAGE}\n{question}" if k == 0 else question},
                  {"from": "gpt", "value": answer}]
    return turns


class ShapesData:
    """Fresh Shapes images every step, deterministic in (seed, step): resuming at a step
    resumes the data exactly, and no image repeats."""

    def __init__(self, config, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or build_tokenizer(shapes_vocabulary() + question_vocabulary() + template_words())
        self._cached = (None, None, None)                         # (step, parts), images, samples

    def samples(self, captions, seed):
        rng = random.Random(seed)
        return [Sample(shapes_turns(c, rng, self.config.model.template), c) for c in captions]

    def batch(self, step, part=0, parts=1):
        """Part `part` of `parts` equal parts (batch_size rows each) of the global batch of step.
        The global batch is generated once per step and cut for the micro-batches and ranks."""
        if self._cached[0] != (step, parts):
            seed = self.config.seed * 1_000_003 + step
            images, captions = shapes_split("train", self.config.batch_size * parts, seed=seed)
            self._cached = ((step, parts), to_tensor(images), self.samples(captions, seed))
        _, images, samples = self._cached
        rows = slice(part * self.config.batch_size, (part + 1) * self.config.batch_size)
        return images[rows], samples[rows]

    def split(self, name, n):
        images, captions = shapes_split(name, n)
        return to_tensor(images), self.samples(captions, len(name))


class FolderData:
    """A folder of captioned images or conversations: 90/5/5 train/val/test split, shuffled each
    epoch by seed. An unreadable image is skipped (one warning line naming it; the next sample
    takes its place); more than `tolerated_bad` of them stop the run. Text-only records get a
    blank image, which their tokens never see (conversation_tokens)."""

    def __init__(self, config, tokenizer=None):
        self.config = config
        records = read_samples(config.data)
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed))
        records = [records[i] for i in order]
        n_held = max(1, len(records) // 20)
        self.splits = {"test": records[:n_held], "val": records[n_held:2 * n_held],
                       "train": records[2 * n_held:] or records}
        texts = [turn["value"] for _, sample in self.splits["train"] for turn in sample.turns]
        self.tokenizer = tokenizer or tokenizer_for_captions(texts + [" ".join(template_words())])
        self.size = 2 * config.model.vit.image_size
        self.n_images, self.skipped = len(records), {}          # path -> why

    def load(self, records, n):
        """The first n usable samples of records (an iterable), and their images."""
        images, samples = [], []
        for path, sample in records:
            if len(images) == n:
                break
            try:
                images.append(load_image(path, self.size) if path is not None else
                              torch.zeros(3, self.size, self.size))
                samples.append(sample)
            except DataError as error:
                self.skip(path, error)
        if not images:
            raise DataError(f"{self.config.data}: no readable image to load")
        return torch.stack(images), samples

    def skip(self, path, error):
        if path in self.skipped:
            return
        self.skipped[path] = str(error)
        print(f"warning: skipped {error}", file=sys.stderr, flush=True)
        if len(self.skipped) > tolerated_bad(self.n_images):
            raise DataError(f"{self.config.data}: {len(self.skipped)} of {self.n_images} images "
                            "are unreadable (listed above): fix or remove them")

    def batch(self, step, part=0, parts=1):
        """Part `part` of `parts` equal parts (batch_size rows each) of the global batch of step."""
        train, bs = self.splits["train"], self.config.batch_size
        epoch, offset = divmod((step * parts + part) * bs, len(train))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        return self.load((train[order[(offset + k) % len(train)]] for k in range(len(train))), bs)

    def split(self, name, n):
        return self.load(self.splits[name], n)


def make_data(config, tokenizer=None):
    """Shapes or a caption folder. The tokenizer: the one given (a checkpoint's), that of a
    pretrained LLM (llm_path), or a new one (the Shapes words, or the folder's captions)."""
    if tokenizer is None and config.model.llm_path:
        if not os.path.isfile(os.path.join(config.model.llm_path, "tokenizer.json")):
            raise DataError(f"{config.model.llm_path} has no tokenizer.json: the tokenizer comes from "
                            "the LLM's directory (download it with the weights)")
        tokenizer = load_tokenizer(config.model.llm_path)
    return (ShapesData if config.data == "shapes" else FolderData)(config, tokenizer)


def sample_tokens(tokenizer, sample, config, for_generation=False):
    """(input_ids, labels) of one sample in the run's template, the image a run of image ids.
    A text-only sample gets its image run after its text, where causal attention hides it."""
    m = config.model
    try:
        pieces = render(sample.turns, m.template, sample.has_image, for_generation)
    except ConversationError as error:
        raise DataError(str(error)) from None
    ids, labels = tokenize(pieces, tokenizer, m.template, m.n_image_tokens, m.image_token_id, m.bos_id, m.eos_id)
    if not sample.has_image:
        ids, labels = ids + [m.image_token_id] * m.n_image_tokens, labels + [-100] * m.n_image_tokens
    if len(ids) > config.context_length:
        if for_generation or m.image_token_id in ids[config.context_length:]:
            raise DataError(f"a {'prompt' if for_generation else 'sample'} of {len(ids)} tokens (the image "
                            f"counts {m.n_image_tokens}) does not fit the context of {config.context_length}: "
                            "shorten it or raise --context_length")
        ids, labels = ids[:config.context_length], labels[:config.context_length]   # as LLaVA truncates
    return ids, labels


def conversation_tokens(tokenizer, samples, config):
    """input_ids and labels (B, T) of samples, right-padded (labels -100 on padding)."""
    rows = [sample_tokens(tokenizer, sample, config) for sample in samples]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), config.model.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, :len(ids)], labels[i, :len(ids)] = torch.tensor(ids), torch.tensor(row_labels)
    return input_ids, labels


# --- the loader: each step's batches prepared in worker processes ------------------------------

WORKER_TIMEOUT = 600                  # seconds a worker may take for one step before the run stops


class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this process's micro-batches of that step, decoded, resized and tokenised.
    A pure function of (seed, step): resume, and N processes splitting one global batch, see
    exactly the batches one process would. Bad data comes back as the error, to be raised by
    the training process with its own message (not as a worker's traceback)."""

    def __init__(self, data, config, rank=0, world=1):
        self.data, self.config, self.rank, self.world = data, config, rank, world

    def __len__(self):
        return self.config.max_iters

    def __getitem__(self, step):
        parts = self.config.grad_accum * self.world
        try:
            batches = []
            for micro in range(self.config.grad_accum):
                images, samples = self.data.batch(step, micro * self.world + self.rank, parts)
                batches.append((images, *conversation_tokens(self.data.tokenizer, samples, self.config)))
            return batches, dict(getattr(self.data, "skipped", {}))
        except DataError as error:
            return error, {}


def step_batches(data, config, start_step, rank=0, world=1, pin_memory=False):
    """(step, micro-batches) for start_step..max_iters, prepared by config.num_workers worker
    processes (0: in this process), `prefetch` steps ahead, pinned for a GPU."""
    workers = config.num_workers
    loader = torch.utils.data.DataLoader(
        StepBatches(data, config, rank, world), batch_size=None, sampler=range(start_step, config.max_iters),
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=2 if workers else None,
        timeout=WORKER_TIMEOUT if workers else 0)
    for step, (micro_batches, skipped) in zip(range(start_step, config.max_iters), loader):
        if isinstance(micro_batches, DataError):
            raise micro_batches
        if hasattr(data, "skipped"):
            data.skipped.update(skipped)
        yield step, micro_batches


@contextmanager
def worker_failures():
    """A worker killed (or hung past WORKER_TIMEOUT) reaches the training process as torch's
    RuntimeError, raised from its SIGCHLD handler wherever the process is, or first as a broken
    pipe to the worker: either becomes one line. torch's handler is then reset, since it would
    raise again for the same dead worker."""
    try:
        yield
        return
    except (RuntimeError, ConnectionError, EOFError) as error:
        if isinstance(error, RuntimeError) and not str(error).startswith("DataLoader"):
            raise
        reason = str(error).splitlines()[0]
    while True:                                   # the handler may fire once more in between
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            break
        except RuntimeError:
            continue
    raise DataError(f"a data worker failed ({reason}); the last checkpoint is kept: resume with --resume")
