"""The Shapes captioning set (DESIGN.md section 6): generated from a seed with PIL, no download.

Captions are parseable back into objects (`parse_caption`), which is how eval scores them. The
geometry is chosen so that the set probes what multi-grained fusion adds:
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

import functools
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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


def scene_jitter(objects, rng):
    """Each object's (dy, dx) offset inside its cell, as draw_scene draws it."""
    renderer = shared_renderer()
    max_jitter = (renderer.cell - renderer.masks[(SHAPES[0], "large")].shape[0]) // 2
    return [(rng.randint(-max_jitter, max_jitter), rng.randint(-max_jitter, max_jitter)) for _ in objects]


def draw_scene(objects, rng):
    """The scene as a uint8 (CANVAS, CANVAS, 3) image, each object jittered inside its cell."""
    return shared_renderer().render(objects, scene_jitter(objects, rng))


def shapes_split(split, n, seed=None):
    """n (image uint8 (n, CANVAS, CANVAS, 3), captions) of a split; disjoint seeds per split."""
    rng = random.Random(SPLIT_SEEDS[split] if seed is None else seed)
    images = np.empty((n, CANVAS, CANVAS, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        objects = random_objects(rng)
        images[i] = draw_scene(objects, rng)
        captions.append(caption_of(objects))
    return images, captions


def shapes_vocabulary():
    words = {"a", "and", "at", "the"} | set(SIZES) | set(COLORS) | set(TEXTURES[1:]) | set(SHAPES)
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


# --- questions about a scene (the assistant part) ----------------------------------------------

QUESTION_TYPES = ("color", "shape", "texture", "size", "count", "exists", "where")
COUNT_WORDS = ("zero", "one", "two", "three")
CAPTION_REQUEST = "describe the image."


def type_weights(spec):
    """"exists=2.5,where=2.5" -> a weight per QUESTION_TYPES entry (unnamed types 1); "" -> None
    (every type equally likely, drawn as before)."""
    if not spec:
        return None
    weights = dict.fromkeys(QUESTION_TYPES, 1.0)
    for item in spec.split(","):
        kind, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if kind.strip() not in weights or not weight >= 0:
            raise ValueError(f"--question_weights takes TYPE=WEIGHT,... with a type of {', '.join(QUESTION_TYPES)} "
                             f"and a weight >= 0, not {item!r}")
        weights[kind.strip()] = weight
    if sum(weights.values()) <= 0:
        raise ValueError(f"--question_weights {spec!r} gives every question type weight 0")
    return tuple(weights.values())


def question_about(objects, kind, rng):
    """(question, answer) of one type about a scene, from its objects. An object is named by its
    position, or by colour and shape where that pair is unique in the scene."""
    unique = [o for o in objects if sum((p.color, p.shape) == (o.color, o.shape) for p in objects) == 1]
    if kind in ("color", "shape", "texture", "size"):
        obj = rng.choice(objects)
        word = "colour" if kind == "color" else kind
        if kind in ("texture", "size") and obj in unique and rng.random() < 0.5:
            return f"what {word} is the {obj.color} {obj.shape}?", getattr(obj, kind)
        if kind == "color" and sum(p.shape == obj.shape for p in objects) == 1 and rng.random() < 0.5:
            return f"what colour is the {obj.shape}?", obj.color
        return f"what {word} is the object at the {obj.position}?", getattr(obj, kind)
    if kind == "count":
        return "how many objects are there?", COUNT_WORDS[len(objects)]
    if kind == "where" and unique:
        obj = rng.choice(unique)
        return f"where is the {obj.color} {obj.shape}?", obj.position
    present = {(o.color, o.shape) for o in objects}             # exists (and where, lacking a unique pair)
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        return f"is there a {color} {shape}?", "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = rng.choice(absent)
    return f"is there a {color} {shape}?", "no"


def named_by(question):
    """How a question of question_about names its object: "position" (the object at the top
    left), "content" (its colour and shape: where is the red star?, is there a red star?, what
    colour is the star?), or "" (how many objects: none named)."""
    if "how many" in question:
        return ""
    return "position" if "object at the" in question else "content"


def question_vocabulary():
    return sorted({"what", "colour", "is", "the", "object", "at", "shape", "texture", "size", "how", "many",
                   "objects", "are", "there", "where", "yes", "no", "plain", "describe", "image", "?", "."}
                  | set(COUNT_WORDS))


if __name__ == "__main__":           # python -m sources.shapes a.png b.png: test scenes to caption
    import sys
    images, captions = shapes_split("test", len(sys.argv[1:]))
    for path, image, caption in zip(sys.argv[1:], images, captions):
        Image.fromarray(image).save(path)
        print(f"{path}: {caption}")
