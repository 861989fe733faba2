"""train.py, sample.py and eval.py as a user runs them: outputs, resume, and bad input."""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough that a few steps take a second or two.
SMALL = ("--vit.image_size 16 --vit.patch_size 8 --vit.width 16 --vit.n_layer 2 --vit.n_head 2 "
         "--vit.mlp_dim 32 --llm.width 32 --llm.n_layer 2 --llm.n_head 2 --llm.n_kv_head 1 "
         "--llm.mlp_dim 64 --batch_size 4 --n_val 8 --n_test 8 --warmup_iters 2").split()


# Two training processes compared bit for bit run on one CPU thread each. On two threads (this
# torch's MKL on an AVX-512 Xeon) a process's first step's gradients came out different in the last
# bits about one process in 20, and more often under load, with the same weights and batch; a
# second forward/backward in the same process repeated the usual ones; on one thread, 30 of 30
# resumed runs were identical. Thread timing in the math library, not the run's state.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


WORKDIR = tempfile.mkdtemp(prefix="sparsecut-tests-")   # the scripts' folder: conftest.in_an_empty_folder
atexit.register(shutil.rmtree, WORKDIR, True)


def run(script, *args, check=True, env=None):
    """A root script by its file name (train.py), or a study or benchmark by its module name
    (studies.ablation), run as a user runs it, from another folder."""
    if script.endswith(".py"):
        command = [sys.executable, os.path.join(ROOT, script)]
    else:                                                          # python -m, the root importable
        command = [sys.executable, "-m", script]
        env = {**(env or os.environ), "PYTHONPATH": ROOT}
    result = subprocess.run([*command, *map(str, args)],
                            capture_output=True, text=True, cwd=WORKDIR, timeout=300, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def bad(script, *args, match):
    """Bad input: a non-zero exit, one line on stderr that says what is wrong, no traceback."""
    result = run(script, *args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and match in lines[-1], result.stderr
    assert len(lines) <= 2, result.stderr                      # argparse adds a usage line
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    run("train.py", "--config", "tiny", *SMALL, "--max_iters", 6, "--log_interval", 2,
        "--eval_interval", 3, "--checkpoint_interval", 3, "--out_dir", out)
    return out


def test_train_writes_checkpoint_metrics_and_eval(trained):
    assert sorted(os.listdir(trained / "checkpoint")) == [".complete", "config.json", "model.safetensors",
                                                          "tokenizer.json", "train_config.json",
                                                          "train_state.pt"]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert all("loss" in r for r in records if r["step"] % 2 == 0)
    assert "val_loss" in records[-1]
    metrics = json.loads((trained / "eval.json").read_text())
    for key in ("exact_match", "object_f1", "shape_acc", "color_acc", "size_acc", "texture_acc",
                "position_acc", "count_acc", "val_loss"):
        assert 0 <= metrics[key] or key == "val_loss"


def test_sample_and_eval(trained, tmp_path):
    Image.new("RGB", (50, 40), (255, 255, 255)).save(tmp_path / "a.png")
    Image.new("L", (300, 300), 128).save(tmp_path / "b.jpg")
    one = run("sample.py", "--image", tmp_path / "a.png", "--checkpoint", trained)
    assert one.stdout.strip()
    two = run("sample.py", "--image", tmp_path / "a.png", tmp_path / "b.jpg", "--checkpoint", trained,
              "--temperature", 0.8, "--top_k", 5, "--top_p", 0.9, "--prompt", "a small")
    lines = two.stdout.strip().splitlines()
    assert len(lines) == 2 and all(": a small" in line for line in lines)
    result = run("eval.py", "--checkpoint", trained, "--split", "val", "--n", 8)
    assert "object_f1" in result.stdout
    assert "object_f1" in json.loads((trained / "eval_val.json").read_text())


def test_shapes_writes_test_scenes_with_their_captions(tmp_path):
    from sources.shapes import shapes_split
    result = run("sources.shapes", tmp_path / "shape0.png", tmp_path / "shape1.png")
    images, captions = shapes_split("test", 2)
    assert result.stdout.splitlines() == [f"{tmp_path / f'shape{i}.png'}: {captions[i]}" for i in range(2)]
    with Image.open(tmp_path / "shape1.png") as written:
        assert (np.asarray(written) == images[1]).all()


def test_sample_says_when_an_image_is_not_a_shapes_scene(trained, tmp_path):
    from sources.shapes import shapes_split
    images, _ = shapes_split("test", 1)
    Image.fromarray(images[0]).save(tmp_path / "scene.png")
    Image.new("RGB", (96, 96), (120, 160, 90)).save(tmp_path / "green.png")       # the size, not the look
    Image.new("RGB", (500, 375), (20, 20, 20)).save(tmp_path / "photo.jpg")       # the look, not the size
    scene = run("sample.py", "--image", tmp_path / "scene.png", "--checkpoint", trained)
    assert scene.stdout.strip() and not scene.stderr.strip()
    others = run("sample.py", "--image", tmp_path / "green.png", tmp_path / "scene.png", tmp_path / "photo.jpg",
                 "--checkpoint", trained)
    notes = [line for line in others.stderr.splitlines() if "is not a Shapes scene" in line]
    assert len(notes) == 2 and "green.png" in notes[0] and "photo.jpg" in notes[1]
    assert all("knows only the Shapes set" in note and "Real weights" in note for note in notes)
    assert len(others.stdout.strip().splitlines()) == 3                          # each still captioned
    penalised = run("sample.py", "--image", tmp_path / "scene.png", "--checkpoint", trained,
                    "--repetition_penalty", 1.5)
    assert penalised.stdout.strip()


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    common = ["--config", "tiny", *SMALL, "--max_iters", 24, "--checkpoint_interval", 4,
              "--eval_interval", 1000, "--n_test", 1]
    run("train.py", *common, "--out_dir", tmp_path / "straight", env=ONE_THREAD)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "train.py", *map(str, common), "--out_dir",
                                str(interrupted)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ONE_THREAD)
    state = interrupted / "checkpoint" / "train_state.pt"
    while not state.exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    run("train.py", *common, "--out_dir", interrupted, "--resume", env=ONE_THREAD)
    straight = (tmp_path / "straight" / "checkpoint" / "model.safetensors").read_bytes()
    assert (interrupted / "checkpoint" / "model.safetensors").read_bytes() == straight
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def test_bad_command_lines(trained, tmp_path):
    bad("train.py", "--config", "huge", match="unknown --config 'huge'")
    bad("train.py", "--max_itres", 5, match="unknown option --max_itres (did you mean --max_iters")
    bad("train.py", "--max_iters", "ten", match="--max_iters takes an integer")
    bad("train.py", "--max_iters", 0, match="--max_iters must be positive")
    bad("train.py", "--max_iters", -3, match="--max_iters must be positive")
    bad("train.py", "--fusion", "late", match="fusion must be one of")
    bad("train.py", "--resume", "--out_dir", tmp_path / "none", match="no training checkpoint")
    bad("train.py", "--data", tmp_path / "nothing", match="does not exist")
    (tmp_path / "empty").mkdir()
    bad("train.py", "--data", tmp_path / "empty", match="has no caption file")
    bad("train.py", "--config", "tiny", *SMALL, "--llm.width", 48, "--resume", "--out_dir", trained,
        match="--model.llm.width 48 would change the model of the run")


def test_bad_images_and_checkpoints(trained, tmp_path):
    bad("sample.py", "--image", tmp_path / "missing.png", "--checkpoint", trained, match="does not exist")
    bad("sample.py", "--image", tmp_path, "--checkpoint", trained, match="is a directory")
    (tmp_path / "empty.png").write_bytes(b"")
    bad("sample.py", "--image", tmp_path / "empty.png", "--checkpoint", trained, match="empty file")
    (tmp_path / "notes.png").write_text("hello")
    bad("sample.py", "--image", tmp_path / "notes.png", "--checkpoint", trained, match="not a readable image")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    bad("sample.py", "--image", tmp_path / "cut.png", "--checkpoint", trained, match="not a readable image")
    bad("sample.py", "--image", tmp_path / "full.png", "--checkpoint", tmp_path / "nowhere",
        match="does not exist")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((trained / "checkpoint" / "config.json").read_text())
    bad("sample.py", "--image", tmp_path / "full.png", "--checkpoint", tmp_path / "half",
        match="no model.safetensors")
    bad("sample.py", "--image", tmp_path / "full.png", "--checkpoint", trained, "--top_p", 2,
        match="--top_p in (0, 1]")
    bad("eval.py", "--checkpoint", tmp_path / "nowhere", match="does not exist")


def test_sample_without_a_checkpoint_says_what_to_run(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--image",
                             str(tmp_path / "x.png")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "python train.py --config tiny" in result.stderr


def test_real_configs_say_what_to_download(tmp_path):
    bad("train.py", "--config", "smol", "--device", "cpu", "--data", "shapes", match=
        "--vit_path checkpoints/siglip-base-patch16-224 does not exist: download google/siglip-base-patch16-224")
    bad("train.py", "--config", "tiny", "--llm_path", tmp_path, match="--llm_path needs --vit_path")
    bad("train.py", "--config", "tiny", "--clip.iters", "5", match="--clip.iters pretrains an encoder into --vit_path")


def test_eval_reproduces_the_runs_eval_json(trained):
    run("eval.py", "--checkpoint", trained)
    assert json.loads((trained / "eval_test.json").read_text()) == json.loads((trained / "eval.json").read_text())


def test_resume_reads_the_saved_config_and_refuses_a_model_change(tmp_path):
    """Resumed without the model options it was started with, a run continues as it was (a
    constant learning rate after warmup makes the schedule independent of max_iters)."""
    common = [*SMALL, "--min_lr_ratio", 1, "--eval_interval", 1000, "--n_test", 2]
    model = ["--shortcuts", "reverse", "--attention", "composite"]
    run("train.py", *common, *model, "--max_iters", 6, "--out_dir", tmp_path / "straight", env=ONE_THREAD)
    run("train.py", *common, *model, "--max_iters", 3, "--out_dir", tmp_path / "resumed", env=ONE_THREAD)
    run("train.py", "--resume", "--max_iters", 6, "--out_dir", tmp_path / "resumed", env=ONE_THREAD)
    saved = json.loads((tmp_path / "resumed" / "checkpoint" / "config.json").read_text())
    assert saved["shortcuts"] == "reverse" and saved["attention"] == "composite"
    run_config = json.loads((tmp_path / "resumed" / "checkpoint" / "train_config.json").read_text())
    assert run_config["max_iters"] == 6 and run_config["batch_size"] == 4
    straight = (tmp_path / "straight" / "checkpoint" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "checkpoint" / "model.safetensors").read_bytes() == straight
    bad("train.py", "--resume", "--out_dir", tmp_path / "resumed", "--shortcuts", "uniform",
        match="--model.shortcuts uniform would change the model of the run")
    bad("train.py", "--resume", "--out_dir", tmp_path / "resumed", "--config", "smol",
        match="was started with --config tiny, not smol")


def test_eval_reads_the_runs_data_split_and_seed(tmp_path):
    """A caption folder trained with --seed 7: eval's test split is the run's, not seed 1337's."""
    folder = tmp_path / "captions"
    folder.mkdir()
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    records = []
    for i in range(40):
        name = list(colors)[i % 3]
        Image.new("RGB", (24, 24), colors[name]).save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "caption": f"a {name} square number {i}"})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    run("train.py", *SMALL, "--data", folder, "--seed", 7, "--max_iters", 2, "--n_test", 2,
        "--n_val", 2, "--max_caption_tokens", 12, "--out_dir", out)
    run("eval.py", "--checkpoint", out / "checkpoint")
    metrics = json.loads((out / "eval.json").read_text())
    assert set(metrics) == {"bleu4", "cider", "val_loss"}
    assert json.loads((out / "eval_test.json").read_text()) == metrics


@pytest.mark.parametrize("mode", [["--fusion", "deepstack"], ["--fusion", "llava", "--shortcuts", "uniform"]])
def test_new_modes_train_from_the_command_line(mode, tmp_path):
    run("train.py", *SMALL, *mode, "--max_iters", 2, "--n_test", 2, "--out_dir", tmp_path)
    saved = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert saved["fusion"] == mode[1] and saved["shortcuts"] == (mode[3] if len(mode) > 2 else "default")
