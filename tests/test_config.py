"""The one command-line parser, the named configs and the import direction of the scripts."""

import ast
import os
from dataclasses import dataclass, field

import pytest

from config import TrainConfig, parse_options
from recipes import named_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports go one way, from a higher level to a lower one (DESIGN.md section 2): the data and
# checkpoint packages import nothing of the project above them, the model files only those, the
# config and the training helpers the model, and the entry points and studies use the library,
# never each other.
LEVELS = {"sources": 0, "ckpt": 0, "vit": 1, "llm": 1, "shortcuts": 1, "fusion": 1, "model": 1,
          "config": 2, "recipes": 2, "training": 2,
          "train": 3, "sample": 3, "eval": 3, "studies": 3, "benchmarks": 3}


@dataclass
class Inner:
    seed: int = 0
    width: int = 8
    pairs: object = "none"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    seed: int = 1
    rate: float = 0.5
    flag: bool = False
    files: list = field(default_factory=list)


def test_fields_by_dotted_path_or_a_tail_that_names_one_field():
    config = Outer()
    given = parse_options(config, ["--inner.width", "16", "--inner.seed", "3", "--rate=0.25"])
    assert config.inner.width == 16 and config.inner.seed == 3 and config.rate == 0.25
    assert given == {"inner.width": 16, "inner.seed": 3, "rate": 0.25}
    parse_options(config, ["--width", "32"])                      # the only field named width
    assert config.inner.width == 32


@dataclass
class Twice:
    a: Inner = field(default_factory=Inner)
    b: Inner = field(default_factory=Inner)
    seed: int = 1


def test_a_full_path_wins_and_a_tail_that_could_mean_two_fields_is_an_error():
    config = Outer()
    parse_options(config, ["--seed", "5"])                     # the full path of the top-level seed
    assert config.seed == 5 and config.inner.seed == 0
    with pytest.raises(ValueError, match="--width could mean --a.width or --b.width"):
        parse_options(Twice(), ["--width", "5"])
    config = Twice()
    parse_options(config, ["--seed", "7", "--b.seed", "3"])
    assert (config.seed, config.a.seed, config.b.seed) == (7, 0, 3)


def test_values_by_the_fields_type():
    config = Outer()
    parse_options(config, ["--flag", "--files", "a.png", "b.png", "--pairs", "[(1, 2), [3, 4]]"])
    assert config.flag is True and config.files == ["a.png", "b.png"]
    assert config.inner.pairs == [[1, 2], [3, 4]]                   # data, whatever the field's name
    parse_options(config, ["--flag", "false", "--pairs", "uniform"])
    assert config.flag is False and config.inner.pairs == "uniform"
    with pytest.raises(ValueError, match="--flag takes true or false"):
        parse_options(config, ["--flag=maybe"])
    with pytest.raises(ValueError, match="--rate takes a number"):
        parse_options(config, ["--rate", "fast"])
    with pytest.raises(ValueError, match="unknown option --rte"):
        parse_options(config, ["--rte", "1"])
    with pytest.raises(ValueError, match="--pairs takes a name or a JSON list"):
        parse_options(config, ["--pairs", "[(1, 2"])


def test_train_options_reach_the_model_and_are_checked_in_the_config():
    config = named_config("tiny")
    parse_options(config, ["--fusion", "llava", "--vit.width", "64", "--shortcuts", "[[1, 0], [2, 3]]",
                           "--model.llm.n_layer", "5"])
    assert config.model.fusion == "llava" and config.model.vit.width == 64
    assert config.model.shortcuts == [[1, 0], [2, 3]] and config.model.llm.n_layer == 5
    config.check()
    for argv, message in ((["--fusion", "late"], "fusion must be one of"),
                          (["--shortcuts", "[[9, 0]]"], "ViT layer 9 is out of range"),
                          (["--fusion", "deepstack", "--shortcuts", "dense"], "deepstack adds its own"),
                          (["--max_caption_tokens", "1"], "at least 2"),
                          (["--dtype", "half"], "--dtype takes")):
        config = named_config("tiny")
        parse_options(config, argv)
        with pytest.raises(ValueError, match=message):
            config.check()
    with pytest.raises(ValueError, match="--width could mean --model.vit.width or --model.llm.width"):
        parse_options(named_config("tiny"), ["--width", "64"])


def test_saved_train_config_round_trips():
    config = named_config("tiny")
    parse_options(config, ["--fusion", "deepstack", "--deepstack_interval", "2", "--seed", "7"])
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config


def imports_of(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def project_modules():
    """(top-level name, path) of every Python file of the project: the root's and its folders'."""
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if name.endswith(".py"):
            yield name[:-3], path
        elif os.path.isfile(os.path.join(path, "__init__.py")) and name != "tests":
            for file in sorted(os.listdir(path)):
                if file.endswith(".py"):
                    yield name, os.path.join(path, file)


def test_imports_go_one_way_entry_points_to_library():
    modules = list(project_modules())
    assert {top for top, _ in modules} == set(LEVELS), "every file of the project has a level"
    for top, path in modules:
        for imported in imports_of(path) & set(LEVELS):
            if imported == top:
                continue                                          # within one package
            below = LEVELS[imported] < LEVELS[top] or (LEVELS[top] < 3 and LEVELS[imported] == LEVELS[top])
            assert below, f"{os.path.relpath(path, ROOT)} ({top}) imports {imported}, a level above or beside it"
