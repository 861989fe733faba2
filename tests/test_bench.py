"""bench.py at a miniature size: the table's structure and the FLOP accounting."""

import pytest

from benchmarks import bench

ROWS = ["llava", "concat", "deepstack", "llava+shortcuts", "fusion-only", "sparsecut", "llava+composite", "sparsecut+composite",
        "llava+composite-noffn", "sparsecut+composite-noffn"]


@pytest.fixture(scope="module")
def report():
    return bench.run("mini", "cpu", repeats=1, decode_tokens=3, reference=False)


def test_rows_and_json_keys(report):
    assert [r["mode"] for r in report["rows"]] == ROWS
    assert report["peak_flops"] > 0
    for row in report["rows"]:
        for key in ("params", "llm_seq_len", "flops", "train_step_s", "prefill_s",
                    "decode_tokens_per_s", "peak_mem_bytes", "mfu"):
            assert key in row, key
        assert set(row["flops"]) == {"vision", "fusion", "llm"}
        assert row["train_step_s"] > 0 and row["peak_mem_bytes"] > 0 and 0 < row["mfu"] < 1
    lines = bench.table(report).splitlines()
    assert len(lines) == 2 + len(ROWS) and all(line.count("|") == lines[0].count("|") for line in lines)


def test_counted_flops_match_the_closed_form(report):
    for row in report["rows"]:
        for part in ("vision", "fusion", "llm"):
            counted, closed = row["flops"][part], row["flops_closed_form"][part]
            assert abs(counted - closed) <= 0.01 * closed, (row["mode"], part, counted, closed)


def test_flop_ratios_between_modes(report):
    rows = {r["mode"]: r for r in report["rows"]}
    vit, llm, text, _, _ = bench.SHAPES["mini"]
    n_image = vit.grid ** 2
    # the LLM sequence: sparsecut = llava; concat has 5x the visual tokens
    assert rows["sparsecut"]["llm_seq_len"] == rows["llava"]["llm_seq_len"] == n_image + text
    assert rows["concat"]["llm_seq_len"] == 5 * n_image + text
    # sparsecut's LLM FLOPs equal llava's (shortcuts are additions); concat's exceed them by the
    # closed form's factor
    assert rows["sparsecut"]["flops"]["llm"] == rows["llava"]["flops"]["llm"]
    config = bench.mode_config("mini", "concat")
    predicted = bench.closed_form_flops(config, text)["llm"] / \
        bench.closed_form_flops(bench.mode_config("mini", "llava"), text)["llm"]
    assert rows["concat"]["flops"]["llm"] / rows["llava"]["flops"]["llm"] == pytest.approx(predicted, rel=0.01)
    assert predicted > 2.5
    # composite attention saves LLM FLOPs, more without the visual FFN; vision is 5 views vs 1
    assert rows["llava+composite-noffn"]["flops"]["llm"] < rows["llava+composite"]["flops"]["llm"] \
        < rows["llava"]["flops"]["llm"]
    assert rows["sparsecut"]["flops"]["vision"] > 4 * rows["llava"]["flops"]["vision"]


def test_composite_prefill_flops_at_the_paper_shape():
    """EE-MLLM's saving at the paper's proportions (576 visual + 64 text tokens, Vicuna-7B)."""
    def prefill(mode):
        return bench.closed_form_flops(bench.mode_config("paper", mode, full_depth=True), 64, head_rows=1)["llm"]
    assert prefill("llava+composite-noffn") <= 0.35 * prefill("llava")
    assert prefill("llava+composite") < prefill("llava")


def test_loader_bench_delivers_images(tmp_path):
    from benchmarks import bench_loader
    bench_loader.write_photos(tmp_path / "photos", 12, size=(50, 40))
    assert len(list((tmp_path / "photos").glob("*.jpg"))) == 12
    for workers in (0, 1):
        assert bench_loader.loader_images_per_s(str(tmp_path / "photos"), "tiny", workers, steps=2, batch_size=4) > 0
