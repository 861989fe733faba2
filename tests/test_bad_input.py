"""Bad input through every script: one line on stderr that names the culprit, exit status 2, no
traceback; crashes at every step of a checkpoint swap; a new run never destroys another.

The scripts' `main` functions run in this process through `config.run_cli`, the same error path
as on the command line (an exception it does not expect would escape it and fail the test);
test_cli.py checks the same path in real subprocesses."""

import json
import os
import signal
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from benchmarks import bench
import eval as eval_script
import sample
import train
from config import run_cli
from test_cli import ONE_THREAD, ROOT, SMALL

TINY_RUN = [*SMALL, "--max_iters", 2, "--n_test", 2, "--n_val", 4, "--eval_interval", 1000]


def expect_error(main, argv, match, capsys):
    """main(argv) through run_cli ends in exit status 2 and one stderr line containing match."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert exit_info.value.code == 2, stderr
    assert len(lines) == 1 and match in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    run_cli(train.main, [str(a) for a in TINY_RUN + ["--out_dir", out]])
    return out


def copy_run(run_dir, to):
    """A writable copy of the trained run's checkpoint."""
    (to / "checkpoint").mkdir(parents=True)
    for name in os.listdir(run_dir / "checkpoint"):
        (to / "checkpoint" / name).write_bytes((run_dir / "checkpoint" / name).read_bytes())
    return to


def image(tmp_path, name="x.png"):
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / name)
    return tmp_path / name


TRAIN_OPTIONS = [  # (argv, what the message must contain)
    (["--config", "huge"], "unknown --config 'huge'"),
    (["--max_itres", 5], "unknown option --max_itres (did you mean --max_iters"),
    (["--max_iters", "ten"], "--max_iters takes an integer, not 'ten'"),
    (["--max_iters", 0], "--max_iters must be positive"),
    (["--grad_clip", -1], "--grad_clip must be positive, not -1.0"),
    (["--weight_decay", -0.1], "--weight_decay must be >= 0"),
    (["--lr", "nan"], "--lr must be positive, not nan"),
    (["--min_lr_ratio", 2], "--min_lr_ratio must be in [0, 1]"),
    (["--max_caption_tokens", 1], "--max_caption_tokens must be at least 2"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
     "no CUDA device is available" if not torch.cuda.is_available() else "--device takes"),
    (["--device", "tpu"], "--device takes cpu, cuda or mps, not 'tpu'"),
    (["--dtype", "half"], "--dtype takes auto, float32, bfloat16, not 'half'"),
    (["--vit.n_head", 5], "vit.width / vit.n_head must be a whole number, not 96 / 5"),
    (["--vit.patch_size", 7], "vit.image_size / vit.patch_size must be a whole number, not 48 / 7"),
    (["--llm.n_kv_head", 3], "llm.n_head / llm.n_kv_head must be a whole number, not 4 / 3"),
    (["--shortcuts", "[[1, 2, 3]]"], "shortcut [1, 2, 3] is not a (vit_layer, llm_layer) pair"),
    (["--shortcuts", "[1, 2]"], "shortcut 1 is not a (vit_layer, llm_layer) pair"),
    (["--shortcuts", "[[1, 2"], "--shortcuts takes a name or a JSON list"),
    (["--shortcuts", "[[1, 9]]"], "LLM layer 9 is out of range"),
    (["--fusion", "late"], "fusion must be one of llava, concat, deepstack, sparsecut, not 'late'"),
    (["--fusion", "deepstack", "--shortcuts", "uniform"], "deepstack adds its own 4 stacks"),
    (["--width", 64], "--width could mean --model.vit.width or --model.llm.width"),
    (["--fsdp", "maybe", "--max_iters", 2], "unexpected argument 'maybe'"),
    (["--caption_share", 1.5], "--caption_share must be in [0, 1], not 1.5"),
    (["--init_config", "tiny-stage9"], "--init_config names the config that makes --init_from: one of tiny,"),
    (["--question_weights", "exists=2,why=1"], "--question_weights takes TYPE=WEIGHT,... with a type of color, shape,"),
    (["--question_weights", "exists=-1"], "a weight >= 0, not 'exists=-1'"),
    (["--question_weights", "where=often"], "not 'where=often'"),
    (["--question_weights", "color=0,shape=0,texture=0,size=0,count=0,exists=0,where=0"], "gives every question type weight 0"),
    (["--image_positions", "true"], "image_positions are added by the input map: give --input_map true with them"),
]


@pytest.mark.parametrize("argv,match", TRAIN_OPTIONS, ids=[" ".join(map(str, a)) for a, _ in TRAIN_OPTIONS])
def test_train_options_are_checked_before_any_work(argv, match, capsys, tmp_path):
    expect_error(train.main, argv + ["--out_dir", tmp_path / "out"], match, capsys)
    assert not (tmp_path / "out").exists()


def test_bad_data_folders(capsys, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    expect_error(train.main, [*TINY_RUN, "--data", tmp_path / "none"], "data folder", capsys)
    expect_error(train.main, [*TINY_RUN, "--data", folder], "has no caption file", capsys)
    image(folder, "a.png")
    (folder / "captions.json").write_text('{"images": [}')
    expect_error(train.main, [*TINY_RUN, "--data", folder], "captions.json is not valid JSON", capsys)
    (folder / "captions.json").unlink()
    (folder / "captions.jsonl").write_text('{"image": "a.png", "caption": "red"}\n{"image": "a.png"}\n')
    expect_error(train.main, [*TINY_RUN, "--data", folder], "captions.jsonl line 2 has no field 'caption'", capsys)
    (folder / "captions.jsonl").unlink()
    (folder / "coco.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                  "annotations": [{"caption": "red"}]}))
    expect_error(train.main, [*TINY_RUN, "--data", folder], "coco.json annotations[0] has no field 'image_id'", capsys)


def test_out_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    expect_error(train.main, [*TINY_RUN, "--out_dir", tmp_path / "file"], "is a file, not a directory", capsys)


def test_resume_errors(run_dir, capsys, tmp_path):
    expect_error(train.main, ["--resume", "--out_dir", tmp_path / "none"], "no training checkpoint", capsys)
    expect_error(train.main, ["--resume", "--out_dir", run_dir, "--llm.n_layer", 3],
                 "--model.llm.n_layer 3 would change the model", capsys)
    copy = copy_run(run_dir, tmp_path / "truncated")
    state = copy / "checkpoint" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    expect_error(train.main, ["--resume", "--out_dir", copy], "train_state.pt is not a readable training state", capsys)
    expect_error(train.main, [*TINY_RUN, "--freeze", "vit,llm,fusion", "--out_dir", tmp_path / "frozen"],
                 "--freeze left nothing to train", capsys)
    expect_error(train.main, [*TINY_RUN, "--freeze", "vit,brain", "--out_dir", tmp_path / "brain"],
                 "--freeze takes a comma list of vit, llm, fusion, not 'brain'", capsys)


def test_a_new_run_never_destroys_another(run_dir, capsys, tmp_path):
    out = copy_run(run_dir, tmp_path / "out")
    (out / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    before = {name: (out / "checkpoint" / name).read_bytes() for name in os.listdir(out / "checkpoint")}
    metrics = (out / "metrics.jsonl").read_bytes()
    expect_error(train.main, [*TINY_RUN, "--out_dir", out], "already holds a run", capsys)
    assert {name: (out / "checkpoint" / name).read_bytes() for name in os.listdir(out / "checkpoint")} == before
    assert (out / "metrics.jsonl").read_bytes() == metrics
    run_cli(train.main, [str(a) for a in TINY_RUN + ["--out_dir", out, "--overwrite", "true", "--seed", 5]])
    assert (out / "metrics.jsonl.1").read_bytes() == metrics          # the old log, kept
    assert (out / "checkpoint" / "model.safetensors").read_bytes() != before["model.safetensors"]


def png_claiming_size(path, width, height):
    """A PNG header for a width x height image with no real pixels (a decompression bomb)."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))
    return path


def test_sample_errors(run_dir, capsys, tmp_path):
    ok = image(tmp_path)
    ckpt = ["--checkpoint", run_dir]
    expect_error(sample.main, ckpt, "--image is required", capsys)
    expect_error(sample.main, ["--image", tmp_path / "missing.png", *ckpt], "missing.png does not exist", capsys)
    expect_error(sample.main, ["--image", tmp_path, *ckpt], "is a directory", capsys)
    (tmp_path / "text.png").write_text("not an image")
    expect_error(sample.main, ["--image", tmp_path / "text.png", *ckpt], "text.png is not a readable image", capsys)
    bomb = png_claiming_size(tmp_path / "bomb.png", 20000, 20000)
    expect_error(sample.main, ["--image", bomb, *ckpt], "bomb.png is not a readable image (DecompressionBombError", capsys)
    expect_error(sample.main, ["--image", ok, *ckpt, "--temperature", "nan"], "--temperature must be >= 0", capsys)
    expect_error(sample.main, ["--image", ok, *ckpt, "--top_k", -1], "--top_k and --max_new_tokens >= 0", capsys)
    expect_error(sample.main, ["--image", ok, *ckpt, "--top_p", 0], "--top_p in (0, 1]", capsys)
    expect_error(sample.main, ["--image", ok, *ckpt, "--device", "tpu"], "--device takes", capsys)
    expect_error(sample.main, ["--image", ok, *ckpt, "--attention", "sparse"],
                 "attention must be one of causal, composite, not 'sparse'", capsys)
    expect_error(sample.main, ["--image", ok, "--checkpoint", tmp_path / "nowhere"], "does not exist", capsys)


def test_damaged_checkpoints(run_dir, capsys, tmp_path):
    ok = image(tmp_path)
    nan = copy_run(run_dir, tmp_path / "nan") / "checkpoint"
    weights = load_file(nan / "model.safetensors")
    weights["llm.norm.weight"][0] = float("nan")
    save_file(weights, nan / "model.safetensors")
    expect_error(sample.main, ["--image", ok, "--checkpoint", nan], "NaN or infinite values: ['llm.norm.weight']", capsys)
    tokenizer = copy_run(run_dir, tmp_path / "tok") / "checkpoint"
    (tokenizer / "tokenizer.json").write_text('{"model": ')
    expect_error(sample.main, ["--image", ok, "--checkpoint", tokenizer], "tokenizer.json is not a readable tokenizer", capsys)
    cut = copy_run(run_dir, tmp_path / "cut") / "checkpoint"
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(eval_script.main, ["--checkpoint", cut], "it may be truncated", capsys)
    shapes = copy_run(run_dir, tmp_path / "shapes") / "checkpoint"
    config = json.loads((shapes / "config.json").read_text())
    config["llm"]["mlp_dim"] += 8
    (shapes / "config.json").write_text(json.dumps(config))
    expect_error(eval_script.main, ["--checkpoint", shapes], "does not match the model config: wrong shape", capsys)
    (shapes / "config.json").write_text("{")
    expect_error(eval_script.main, ["--checkpoint", shapes], "config.json is not valid JSON", capsys)


def test_eval_and_bench_errors(run_dir, capsys, tmp_path):
    expect_error(eval_script.main, ["--checkpoint", tmp_path / "nowhere"], "does not exist", capsys)
    expect_error(eval_script.main, ["--checkpoint", run_dir, "--split", "dev"], "--split takes test, val or train", capsys)
    expect_error(eval_script.main, ["--checkpoint", run_dir, "--device", "tpu"], "--device takes", capsys)
    bare = tmp_path / "bare"
    from model import SparseCut
    SparseCut.from_pretrained(run_dir / "checkpoint").save_pretrained(bare)
    expect_error(eval_script.main, ["--checkpoint", bare], "has no train_config.json", capsys)
    expect_error(bench.main, ["--json", tmp_path / "no" / "dir" / "r.json"], "cannot write", capsys)
    expect_error(bench.main, ["--shape", "huge"], "--shape takes mini, tiny, paper, not 'huge'", capsys)


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
when, n = sys.argv[1], int(sys.argv[2])
real_rename, calls = os.rename, [0]

def rename(src, dst):                          # SIGKILL at the n-th rename of a checkpoint swap
    if "checkpoint" in str(dst) or "checkpoint" in str(src):
        calls[0] += 1
    if calls[0] == n and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst)
    if calls[0] == n and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename
import config, train
config.run_cli(train.main, sys.argv[3:])
"""
SWAP_RUN = [*SMALL, "--max_iters", 12, "--checkpoint_interval", 4, "--eval_interval", 1000, "--n_test", 1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    subprocess.run([sys.executable, "train.py", *map(str, SWAP_RUN), "--out_dir", str(out)], cwd=ROOT,
                   check=True, capture_output=True, env=ONE_THREAD)
    return (out / "checkpoint" / "model.safetensors").read_bytes()


# Renames of checkpoint/: save at step 4: (1) tmp -> checkpoint; at step 8: (2) checkpoint -> old,
# (3) tmp -> checkpoint. "before 3" is the instant with no checkpoint/ at all.
@pytest.mark.parametrize("when,n", [("before", 2), ("before", 3), ("after", 3)])
def test_a_kill_at_any_rename_leaves_a_checkpoint_that_resumes_exactly(when, n, straight, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=ROOT))
    killed = subprocess.run([sys.executable, str(script), when, str(n), *map(str, SWAP_RUN), "--out_dir",
                             str(out)], cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if (when, n) == ("before", 3):
        assert not (out / "checkpoint").exists()              # only the old and the new one, aside
        assert sorted(p.split("-")[0] for p in os.listdir(out) if p.startswith("checkpoint.")) == \
            ["checkpoint.old", "checkpoint.tmp"]
    resumed = subprocess.run([sys.executable, "train.py", "--resume", "--out_dir", str(out)], cwd=ROOT,
                             capture_output=True, text=True, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == straight
    assert sorted(os.listdir(out)) == ["checkpoint", "eval.json", "metrics.jsonl"]   # no leftovers


def caption_folder(path, n, bad=()):
    """n captioned 64x48 JPEGs; the indices in bad are corrupt files."""
    path.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 48), (i % 256, 80, 160)).save(path / f"{i}.jpg")
        if i in bad:
            (path / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (path / "captions.csv").write_text("image,caption\n" + "".join(f"{i}.jpg,colour {i % 7}\n" for i in range(n)))
    return path


FOLDER_RUN = [*SMALL, "--max_iters", 4, "--n_test", 4, "--n_val", 4, "--eval_interval", 1000]


def test_workers_deliver_the_same_batches_and_skip_a_bad_image(tmp_path, capfd):
    """30 steps of 4 touch all 90 training images, and val/test load all 5 each: the bad one is
    met wherever the split put it, warned about once, and counted (capfd: workers' stderr too)."""
    folder = caption_folder(tmp_path / "data", 100, bad={7})
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        run_cli(train.main, [str(a) for a in FOLDER_RUN + ["--data", folder, "--num_workers", workers, "--out_dir", out,
                                                         "--max_iters", 30, "--n_val", 5, "--n_test", 5]])
        weights.append((out / "checkpoint" / "model.safetensors").read_bytes())
        captured = capfd.readouterr()
        warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
        assert warnings and all("7.jpg is not a readable image" in w for w in warnings), captured.err
        assert "skipped 1 unreadable image(s) of 100" in captured.out
    assert weights[0] == weights[1]


def test_too_many_bad_images_stop_the_run(tmp_path, capsys):
    folder = caption_folder(tmp_path / "data", 100, bad=set(range(0, 100, 10)))
    expect_error(train.main, FOLDER_RUN + ["--data", folder, "--out_dir", tmp_path / "out"],
                 "images are unreadable (listed above): fix or remove them", capsys)


def test_a_worker_that_dies_ends_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from sources import data
    folder = caption_folder(tmp_path / "data", 200)
    real = data.load_image

    def dies_at_step_3(path, size=None):                   # a worker killed (out of memory, say)
        info = torch.utils.data.get_worker_info()
        if info is not None and os.path.exists(tmp_path / "armed"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, size)

    monkeypatch.setattr(data, "load_image", dies_at_step_3)
    save = train.save_checkpoint

    def save_then_arm(*args, **kwargs):
        save(*args, **kwargs)
        (tmp_path / "armed").touch()

    monkeypatch.setattr(train, "save_checkpoint", save_then_arm)
    out = tmp_path / "out"
    expect_error(train.main, FOLDER_RUN + ["--data", folder, "--num_workers", 1, "--checkpoint_interval", 2,
                                           "--max_iters", 8, "--out_dir", out],
                 "a data worker failed (", capsys)
    assert json.loads((out / "checkpoint" / "train_config.json").read_text())["max_iters"] == 8
    assert (out / "checkpoint" / "model.safetensors").exists()


def test_a_worker_that_hangs_ends_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    import time

    from sources import data
    folder = caption_folder(tmp_path / "data", 100)
    real = data.load_image

    def hangs(path, size=None):
        if torch.utils.data.get_worker_info() is not None:
            time.sleep(30)
        return real(path, size)

    monkeypatch.setattr(data, "load_image", hangs)
    monkeypatch.setattr(data, "WORKER_TIMEOUT", 2)
    started = time.time()
    expect_error(train.main, FOLDER_RUN + ["--data", folder, "--num_workers", 1, "--out_dir", tmp_path / "out"],
                 "a data worker failed (DataLoader timed out after 2 seconds)", capsys)
    assert time.time() - started < 25
