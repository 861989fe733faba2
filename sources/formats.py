"""Real data on disk: image files (any mode PIL reads) and caption or conversation files (COCO
captions JSON, CSV/TSV `image,caption`, JSONL, LLaVA conversation JSON streamed record by record),
read into `Sample`s: a conversation (conversation.py) and the caption that metrics use.
"""

import csv
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sources.conversation import IMAGE, ConversationError, check_turns
from sources.shapes import CAPTION_REQUEST

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
