"""Data: the tokenizer, the two sources (Shapes scenes with their captions and questions, from
shapes.py, or a folder read by formats.py), each sample's tokens in the run's conversation
template, and a loader that prepares each step's batches in worker processes.
"""

import os
import random
import re
import signal
import sys
from contextlib import contextmanager

import torch

from sources.conversation import IMAGE, SPECIAL_TEXT, TEMPLATES, ConversationError, render, tokenize
from sources.formats import DataError, Sample, caption_turns, load_image, read_samples, tolerated_bad
from sources.shapes import (CAPTION_REQUEST, QUESTION_TYPES, parse_caption, question_about, question_vocabulary,
                    SPLIT_SEEDS, shapes_split, shapes_vocabulary, type_weights)

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]           # ids 0, 1, 2, 3
TEMPLATE_TOKENS = list(SPECIAL_TEXT)                             # ids 4.. (conversation.py)


# --- tokenizer --------------------------------------------------------------------------------

def build_tokenizer(words, template_tokens=True):
    """A word-level tokenizer (lower-cased, punctuation split off) from the `tokenizers` package;
    with template_tokens, the templates' special tokens (</s>, <|im_start|>, <|im_end|>) too."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    specials = SPECIAL_TOKENS + (TEMPLATE_TOKENS if template_tokens else [])
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)                        # same ids; skipped by decode
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


# --- data --------------------------------------------------------------------------------------

def template_words():
    """The words of every template's fixed text (system prompts, role names), for word-level vocabularies."""
    texts = [t.system_format.format(t.system) + t.user + t.assistant for t in TEMPLATES.values()]
    return [w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.replace("{}", " ").lower())]


def shapes_turns(caption, rng, template, n_questions=3, mix="random", caption_share=0.5, weights=None):
    """A Shapes training conversation, the image in the first user turn: `random`, the caption
    request and n_questions questions of random types (weights: one per QUESTION_TYPES entry, or
    all alike) in random order; `split`, either the caption request alone (a caption_share of the
    time) or the questions alone. `plain`: the caption alone."""
    if template == "plain":
        return caption_turns(caption)
    objects, _ = parse_caption(caption)
    kind = lambda: rng.choice(QUESTION_TYPES) if weights is None else rng.choices(QUESTION_TYPES, weights)[0]
    questions = [question_about(objects, kind(), rng) for _ in range(n_questions)]
    if mix == "random" or not questions:
        exchanges = [(CAPTION_REQUEST, caption)] + questions
        rng.shuffle(exchanges)
    else:
        exchanges = [(CAPTION_REQUEST, caption)] if rng.random() < caption_share else questions
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
        chat = config.model.template != "plain"            # plain: the caption words alone, as ever
        self.tokenizer = tokenizer or build_tokenizer(
            shapes_vocabulary() + (question_vocabulary() + template_words() if chat else []), chat)
        self._cached = (None, None, None)                         # (step, parts), images, samples

    def samples(self, captions, seed):
        rng = random.Random(seed)
        c = self.config
        weights = type_weights(c.question_weights)
        return [Sample(shapes_turns(caption, rng, c.model.template, c.questions_per_image, c.question_mix,
                                    c.caption_share, weights), caption) for caption in captions]

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
        return to_tensor(images), self.samples(captions, SPLIT_SEEDS[name])   # the questions of val_loss


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
        pieces = render(sample.turns, m.template, sample.has_image, for_generation,
                        image_place=config.image_place)
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
