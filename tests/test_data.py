"""The Shapes set, caption formats, image loading and the caption metrics."""

import json

import numpy as np
import pytest
from PIL import Image

from sources.data import build_tokenizer, decode, encode, to_tensor
from sources.formats import DataError, load_image, read_caption_pairs
from sources.shapes import (CANVAS, COLORS, ShapeObject, ShapesRenderer, caption_of, parse_caption, shapes_split,
                    shapes_vocabulary)
from training.metrics import bleu4, cider, shapes_metrics
from fusion import resize


def test_shapes_is_deterministic_and_splits_differ():
    a_images, a_captions = shapes_split("train", 20)
    b_images, b_captions = shapes_split("train", 20)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions
    test_images, _ = shapes_split("test", 20)
    assert not np.array_equal(a_images, test_images)
    assert a_images.shape == (20, CANVAS, CANVAS, 3) and a_images.dtype == np.uint8


def test_caption_grammar_and_parser_round_trip():
    objects = [ShapeObject("circle", "blue", "large", "plain", "center"),
               ShapeObject("circle", "red", "small", "striped", "top left")]
    caption = caption_of(objects)
    assert caption == "a small red striped circle at the top left and a large blue circle at the center"
    parsed, unparsed = parse_caption(caption)
    assert unparsed == [] and parsed == objects[::-1]
    for caption in shapes_split("val", 200)[1]:
        parsed, unparsed = parse_caption(caption)
        assert unparsed == [] and caption_of(parsed) == caption and 1 <= len(parsed) <= 3
    parsed, unparsed = parse_caption("a small red circle at the top and a big dog")
    assert len(parsed) == 1 and unparsed == ["a big dog"]


def texture_contrast(texture, size):
    """Pixel std inside one large object's interior, at the 2R canvas and at the R view."""
    renderer = ShapesRenderer()
    image = renderer.render([ShapeObject("square", "red", "large", texture, "center")], [(0, 0)])
    view = resize(to_tensor(image[None]), size)[0] * 255           # (3, s, s)
    s = view.shape[-1]
    interior = view[0, s * 3 // 8:s * 5 // 8, s * 3 // 8:s * 5 // 8]
    return float(interior.std())


@pytest.mark.parametrize("texture", ["striped", "dotted"])
def test_textures_survive_high_res_and_blur_at_low_res(texture):
    high, low = texture_contrast(texture, CANVAS), texture_contrast(texture, CANVAS // 2)
    assert high > 20, "texture must be plain to see in the high-res view"
    assert low < 0.35 * high, "texture must mostly blur away in the low-res view"
    assert texture_contrast("plain", CANVAS) < 1


def test_colours_and_object_mean_do_not_give_the_texture_away():
    renderer = ShapesRenderer()
    means = [renderer.render([ShapeObject("square", "blue", "large", t, "center")], [(0, 0)])
             [40:56, 40:56].reshape(-1, 3).mean(0) for t in ("plain", "striped", "dotted")]
    assert np.abs(means[1] - means[0]).max() < 8 and np.abs(means[2] - means[0]).max() < 8
    assert len(set(COLORS.values())) == len(COLORS)


def test_tokenizer_round_trip(tmp_path):
    tokenizer = build_tokenizer(shapes_vocabulary())
    caption = shapes_split("val", 1)[1][0]
    ids = encode(tokenizer, caption)
    assert ids[0] == 1 and ids[-1] == 2 and 3 not in ids        # BOS, EOS, no unknown word
    assert decode(tokenizer, ids) == caption
    tokenizer.save(str(tmp_path / "tokenizer.json"))


def write_images(folder, names):
    for name in names:
        Image.new("RGB", (20, 10), (255, 0, 0)).save(folder / name)


def test_caption_formats(tmp_path):
    expected = [("a.png", "a red thing"), ("b.png", "another, red thing")]
    formats = {
        "coco.json": json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                                 "annotations": [{"image_id": 1, "caption": "a red thing"},
                                                 {"image_id": 2, "caption": "another, red thing"}]}),
        "captions.csv": 'image,caption\na.png,a red thing\nb.png,"another, red thing"\n',
        "captions.tsv": "a.png\ta red thing\nb.png\tanother, red thing\n",
        "captions.jsonl": "\n".join(json.dumps({"image": i, "caption": c}) for i, c in expected),
        "llava.json": json.dumps([{"image": i, "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": c}]}
            for i, c in expected]),
    }
    for name, text in formats.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        write_images(folder, ["a.png", "b.png"])
        (folder / name).write_text(text)
        pairs = read_caption_pairs(str(folder))
        assert [(p.split("/")[-1], c) for p, c in pairs] == expected, name


def test_bad_data_folders(tmp_path):
    with pytest.raises(DataError, match="has no caption file"):
        read_caption_pairs(str(tmp_path))
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "gone.png", "caption": "x"}))
    with pytest.raises(DataError, match="gone.png"):
        read_caption_pairs(str(tmp_path))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "CMYK"])
def test_load_image_any_mode(mode, tmp_path):
    image = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode)
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    path = tmp_path / ("x.tiff" if mode in ("I;16", "CMYK") else "x.png")
    image.save(path)
    pixels = load_image(str(path), size=32)
    assert pixels.shape == (3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    if mode == "I;16":
        assert abs(float(pixels.mean()) - 40000 / 65535) < 0.01


def test_bad_images(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match="directory"):
        load_image(str(tmp_path))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_image(str(tmp_path / "empty.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        load_image(str(tmp_path / "text.png"))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable image"):
        load_image(str(tmp_path / "cut.jpg"))


def test_shapes_metrics():
    truth = ["a small red striped circle at the top left and a large blue square at the center",
             "a large green star at the bottom"]
    assert shapes_metrics(truth, truth)["object_f1"] == 1.0
    predicted = ["a small red dotted circle at the top left and a large blue square at the center",
                 "a large green star at the bottom and a small white square at the top"]
    m = shapes_metrics(predicted, truth)
    assert m["exact_match"] == 0.0
    assert m["object_f1"] == pytest.approx(2 * 2 / (4 + 3))      # 2 objects right of 4 vs 3
    assert m["texture_acc"] == pytest.approx(2 / 3)
    assert m["shape_acc"] == m["color_acc"] == m["position_acc"] == 1.0
    assert m["count_acc"] == 0.5


def test_bleu_and_cider():
    refs = [["a dog runs on the grass", "a brown dog runs"], ["two people ride bikes down a road"]]
    perfect = [r[0] for r in refs]
    assert bleu4(perfect, refs) == pytest.approx(1.0)
    wrong = ["a cat sleeps", "one car parked"]
    assert bleu4(wrong, refs) == 0.0
    assert cider(perfect, refs) > cider(["a dog sits on grass", "people ride down a road"], refs) > cider(wrong, refs)


def test_llava_json_is_read_record_by_record(tmp_path):
    """The streamed reader gives what json.load gives, with records cut across chunks."""
    from sources.formats import json_array
    records = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nDescribe. [x]"},
                                                       {"from": "gpt", "value": f"caption {i}, with \"quotes\""}]}
               for i in range(30)] + [{"id": "text-only", "conversations": []}]
    (tmp_path / "llava.json").write_text(" \n" + json.dumps(records, indent=1))
    with open(tmp_path / "llava.json") as f:
        assert list(json_array(f, chunk_size=7)) == records
    (tmp_path / "cut.json").write_text(json.dumps(records)[:-40])
    with open(tmp_path / "cut.json") as f, pytest.raises(json.JSONDecodeError):
        list(json_array(f, chunk_size=64))
