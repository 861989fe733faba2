"""Data: the Shapes captioning set, real caption formats, the tokenizer, batching.

Shapes (DESIGN.md section 6) is generated from a seed, no download. The geometry is chosen so
that the set probes what multi-grained fusion adds:
- the canvas is the high-resolution view (2R = 96 px); the low-resolution view is 48 px;
- a 3x3 grid of 32 px cells; a large object fills 94% of a cell, a small one 56% (18 px at 2R,
  9 px at R: more than an 8 px patch at either view), so shape, colour, size and position are
  plain at R;
- textures are zero-mean modulations of the object's colour (stripes: one orientation; dots: a
  2-D grid) with a 4 px period at 2R (2 px, the Nyquist limit, at R), so the low-res view's
  anti-aliased downsampling averages them back to the plain colour while the high-res crops show
  them. The period divides the patch size (8) and the crop offset (48), so every patch sees the
  texture at the same phase and a linear patch embedding can detect it. (With a 3 px period the
  phase changed from patch to patch, and a tiny model had learned no texture at all after
  8 CPU-minutes while every other attribute was at 99%.)
Shapes are drawn with PIL at 4x and box-filtered down (anti-aliasing); textures are sampled at
4x and averaged the same way.
"""

import csv
import functools
import json
import os
import random
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (195, 60, 60), "green": (60, 170, 60), "blue": (60, 90, 195),
          "yellow": (195, 185, 60), "purple": (150, 60, 180), "white": (195, 195, 195)}
SIZES = {"small": 0.56, "large": 0.94}                          # fraction of a cell
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")          # row-major = reading order
CANVAS, GRID, SUPERSAMPLE = 96, 3, 4
TEXTURE_PERIOD, TEXTURE_AMPLITUDE = 4.0, 60.0       # px at 2R, grey levels
BACKGROUND = (20, 20, 20)
SPLIT_SEEDS = {"train": 1_000_003, "val": 2_000_003, "test": 3_000_017}
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]           # ids 0, 1, 2, 3


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    texture: str
    position: str

    def phrase(self):
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return f"a {self.size} {self.color}{texture} {self.shape} at the {self.position}"


def caption_of(objects):
    """Objects in reading order (top to bottom, left to right), joined by 'and'."""
    ordered = sorted(objects, key=lambda o: POSITIONS.index(o.position))
    return " and ".join(o.phrase() for o in ordered)


PHRASE = re.compile(r"^a (small|large) ({colors})(?: (striped|dotted))? ({shapes}) at the ({positions})$".format(
    colors="|".join(COLORS), shapes="|".join(SHAPES), positions="|".join(POSITIONS)))


def parse_caption(caption):
    """Caption -> (objects, unparsed phrases). The inverse of caption_of on valid captions."""
    objects, unparsed = [], []
    for phrase in caption.strip().split(" and "):
        match = PHRASE.match(phrase.strip())
        if match is None:
            unparsed.append(phrase)
            continue
        size, color, texture, shape, position = match.groups()
        objects.append(ShapeObject(shape, color, size, texture or "plain", position))
    return objects, unparsed


def shape_mask(shape, side):
    """Anti-aliased coverage (side, side) in [0, 1]: drawn at SUPERSAMPLE x, box-filtered down."""
    big = side * SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([0, 0, big - 1, big - 1], fill=255)
    elif shape == "square":
        inset = big * 0.08                                     # same visual weight as a circle
        draw.rectangle([inset, inset, big - 1 - inset, big - 1 - inset], fill=255)
    elif shape == "triangle":
        draw.polygon([(big / 2, 0), (big - 1, big - 1), (0, big - 1)], fill=255)
    else:                                                      # five-pointed star
        centre, outer, inner = big / 2, big / 2, big / 5
        points = [(centre + r * np.sin(k * np.pi / 5), centre - r * np.cos(k * np.pi / 5))
                  for k, r in zip(range(10), [outer, inner] * 5)]
        draw.polygon(points, fill=255)
    return np.asarray(image.resize((side, side), Image.BOX), dtype=np.float32) / 255.0


def texture_field(texture):
    """Zero-mean modulation in [-1, 1] over the whole canvas (CANVAS, CANVAS)."""
    fine = (np.arange(CANVAS * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    wave = np.cos(2 * np.pi * fine / TEXTURE_PERIOD)
    if texture == "plain":
        field = np.zeros((fine.size, fine.size))
    elif texture == "striped":
        field = np.repeat(wave[:, None], fine.size, axis=1)     # horizontal stripes
    else:
        field = wave[:, None] * wave[None, :]                  # a grid of dots
    return field.reshape(CANVAS, SUPERSAMPLE, CANVAS, SUPERSAMPLE).mean((1, 3)).astype(np.float32)


class ShapesRenderer:
    """Renders objects onto a CANVAS x CANVAS RGB array; masks and textures are computed once."""

    def __init__(self):
        cell = CANVAS // GRID
        self.cell = cell
        self.masks = {(shape, size): shape_mask(shape, round(cell * frac))
                      for shape in SHAPES for size, frac in SIZES.items()}
        self.textures = {t: texture_field(t) for t in TEXTURES}

    def render(self, objects, jitter):
        canvas = np.empty((CANVAS, CANVAS, 3), dtype=np.float32)
        canvas[:] = BACKGROUND
        for obj, (dy, dx) in zip(objects, jitter):
            mask = self.masks[(obj.shape, obj.size)]
            side = mask.shape[0]
            row, col = divmod(POSITIONS.index(obj.position), GRID)
            y = row * self.cell + (self.cell - side) // 2 + dy
            x = col * self.cell + (self.cell - side) // 2 + dx
            y, x = min(max(y, row * self.cell), (row + 1) * self.cell - side), \
                min(max(x, col * self.cell), (col + 1) * self.cell - side)
            texture = self.textures[obj.texture][y:y + side, x:x + side, None]
            color = np.asarray(COLORS[obj.color], dtype=np.float32) + TEXTURE_AMPLITUDE * texture
            alpha = mask[..., None]
            canvas[y:y + side, x:x + side] = canvas[y:y + side, x:x + side] * (1 - alpha) + color * alpha
        return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def random_objects(rng):
    """1 to 3 objects in distinct cells, every attribute uniform."""
    cells = rng.sample(range(GRID * GRID), rng.randint(1, 3))
    return [ShapeObject(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)),
                        rng.choice(TEXTURES), POSITIONS[cell]) for cell in cells]


@functools.lru_cache(maxsize=1)
def shared_renderer():
    return ShapesRenderer()


def shapes_split(split, n, seed=None):
    """n (image uint8 (n, CANVAS, CANVAS, 3), captions) of a split; disjoint seeds per split."""
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    renderer = shared_renderer()
    max_jitter = (renderer.cell - renderer.masks[(SHAPES[0], "large")].shape[0]) // 2
    images = np.empty((n, CANVAS, CANVAS, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        objects = random_objects(rng)
        jitter = [(rng.randint(-max_jitter, max_jitter), rng.randint(-max_jitter, max_jitter))
                  for _ in objects]
        images[i] = renderer.render(objects, jitter)
        captions.append(caption_of(objects))
    return images, captions


def shapes_vocabulary():
    words = {"a", "and", "at", "the"} | set(SIZES) | set(COLORS) | set(TEXTURES[1:]) | set(SHAPES)
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


# --- tokenizer --------------------------------------------------------------------------------

def build_tokenizer(words):
    """A word-level tokenizer (lower-cased, punctuation split off) from the `tokenizers` package."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)                  # same ids; skipped by decode
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


def read_caption_pairs(folder):
    """(image path, caption) pairs from a folder holding one caption file in any supported format:
    COCO captions JSON, CSV/TSV `image,caption`, JSONL `{"image", "caption"}`, or LLaVA
    conversation JSON (the first assistant turn is the caption)."""
    if not os.path.isdir(folder):
        raise DataError(f"data folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.endswith((".json", ".jsonl", ".csv", ".tsv")))
    if not files:
        raise DataError(f"{folder} has no caption file (.json COCO/LLaVA, .jsonl, .csv or .tsv)")
    pairs = []
    for name in files:
        pairs += parse_caption_file(os.path.join(folder, name))
    if not pairs:
        raise DataError(f"{folder}: the caption files hold no captions")
    pairs = [(os.path.join(folder, image), caption) for image, caption in pairs]
    missing = [image for image, _ in pairs if not os.path.isfile(image)]
    if len(missing) > tolerated_bad(len(pairs)):      # a few are skipped like unreadable ones
        raise DataError(f"{folder}: {len(missing)} of {len(pairs)} captioned images are missing, "
                        f"e.g. {missing[:3]}")
    return pairs


def tolerated_bad(n_images):
    """How many missing or unreadable images a folder may hold before the run stops: 1%."""
    return n_images // 100


def field(record, key, where):
    """record[key], or a DataError that names the file, the record and the field."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where} has no field {key!r}")
    return record[key]


def parse_caption_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".csv", ".tsv")):
                rows = list(csv.reader(f, delimiter="\t" if path.endswith(".tsv") else ","))
                if rows and [c.strip().lower() for c in rows[0][:2]] == ["image", "caption"]:
                    rows = rows[1:]
                return [(row[0].strip(), row[1].strip()) for row in rows if len(row) >= 2]
            if path.endswith(".jsonl"):
                records = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
                return [(field(r, "image", f"{path} line {n}"), field(r, "caption", f"{path} line {n}"))
                        for n, r in records]
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
        return pairs
    if isinstance(data, list):                                    # LLaVA conversations
        pairs = []
        for i, record in enumerate(data):
            if not isinstance(record, dict) or "image" not in record:
                continue
            answers = [field(turn, "value", f"{path} [{i}] conversations") for turn in
                       field(record, "conversations", f"{path} [{i}]") if turn.get("from") in ("gpt", "assistant")]
            if answers:
                pairs.append((record["image"], answers[0].strip()))
        return pairs
    raise DataError(f"{path} is neither COCO captions JSON nor LLaVA conversation JSON")


# --- data --------------------------------------------------------------------------------------

class ShapesData:
    """Fresh Shapes images every step, deterministic in (seed, step): resuming at a step
    resumes the data exactly, and no image repeats."""

    def __init__(self, config, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or build_tokenizer(shapes_vocabulary())
        self._cached = (None, None, None)                         # (step, parts), images, captions

    def batch(self, step, part=0, parts=1):
        """Part `part` of `parts` equal parts (batch_size rows each) of the global batch of step.
        The global batch is generated once per step and cut for the micro-batches and ranks."""
        if self._cached[0] != (step, parts):
            images, captions = shapes_split("train", self.config.batch_size * parts,
                                            seed=self.config.seed * 1_000_003 + step)
            self._cached = ((step, parts), to_tensor(images), captions)
        _, images, captions = self._cached
        rows = slice(part * self.config.batch_size, (part + 1) * self.config.batch_size)
        return images[rows], captions[rows]

    def split(self, name, n):
        images, captions = shapes_split(name, n)
        return to_tensor(images), captions


class FolderData:
    """A folder of captioned images: 90/5/5 train/val/test split, shuffled each epoch by seed.
    An unreadable image is skipped (one warning line naming it; the next image takes its place);
    more than `tolerated_bad` of them stop the run."""

    def __init__(self, config, tokenizer=None):
        self.config = config
        pairs = read_caption_pairs(config.data)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed))
        pairs = [pairs[i] for i in order]
        n_held = max(1, len(pairs) // 20)
        self.splits = {"test": pairs[:n_held], "val": pairs[n_held:2 * n_held],
                       "train": pairs[2 * n_held:] or pairs}
        self.tokenizer = tokenizer or tokenizer_for_captions([c for _, c in self.splits["train"]])
        self.size = 2 * config.model.vit.image_size
        self.n_images, self.skipped = len(pairs), {}            # path -> why

    def load(self, pairs, n):
        """The first n readable images of pairs (an iterable), and their captions."""
        images, captions = [], []
        for path, caption in pairs:
            if len(images) == n:
                break
            try:
                images.append(load_image(path, self.size))
                captions.append(caption)
            except DataError as error:
                self.skip(path, error)
        if not images:
            raise DataError(f"{self.config.data}: no readable image to load")
        return torch.stack(images), captions

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


def caption_tokens(data, captions, config):
    """input_ids and labels (B, T) of captions, framed by the model's BOS and EOS."""
    m = config.model
    return batch_captions([encode(data.tokenizer, c, m.bos_id, m.eos_id) for c in captions],
                          config.max_caption_tokens)
