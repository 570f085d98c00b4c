"""The benchmark's CPU mode (what CI can run) and its report plumbing."""
import json
import os

import pytest
import torch

from ghost_kernels.bench import report
from ghost_kernels.bench.__main__ import main, select_shapes
from ghost_kernels.bench.summary import summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite runs the GPU mode; this is the CPU mode")
def test_cpu_mode_end_to_end(tmp_path):
    rc = main(["--quick", "--out", str(tmp_path), "--impls", "eager,eager_folded,triton", "--shapes", "0",
               "--batch", "1", "--dtype", "bfloat16", "--layout", "nchw,channels_last", "--ops", "forward"])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("device", "date", "torch", "triton", "cuda", "copy_GBps", "tests", "rows", "model", "network"):
        assert key in data
    assert data["copy_GBps"] > 0 and data["interpreter_check"].startswith("ok")
    rows = data["rows"]
    assert {r["impl"] for r in rows} == {"eager", "eager_folded", "triton"} and len(rows) == 6
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["GBps"] > 0
        assert r["rel_err"] < 5e-2
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("# ghost_kernels benchmark")
    # issue 9: no raw dict of zeros for tests that did not run; no claim of "all 32" over one shape;
    # the model level is not dropped without a word on the CPU
    assert "Tests: not run in this job" in md and "'passed': 0" not in md
    assert "sum of all 32" not in md and "32 Ghost modules (22 distinct shapes)" in md
    assert "needs a CUDA GPU, not run on the CPU" in md and data["model_note"]
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "speedup.png").stat().st_size > 1000
    assert "network Ghost modules" in summary(data)


def test_shape_selection_and_network_sum():
    everything = select_shapes("all", quick=False)
    assert sum(count for _, count in everything) == 32  # all 32 Ghost modules of GhostNet 1.0x
    assert len(select_shapes("quick", quick=False)) == 5  # one per resolution: 112, 56, 28, 14, 7
    assert [m.name for m, _ in select_shapes("blocks.6.3.ghost1,0", quick=False)] == ["blocks.6.3.ghost1",
                                                                                       "blocks.0.0.ghost1"]
    with pytest.raises(SystemExit, match="unknown module"):
        select_shapes("blocks.99.0.ghost1", quick=False)


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="1" errors="1" skipped="2"/></testsuites>')
    assert report.parse_junit(str(xml)) == {"passed": 6, "failed": 2, "skipped": 2}
    assert report.parse_junit(os.path.join(str(tmp_path), "missing.xml")) is None
    assert report.parse_junit(None) is None
    assert report.tests_line(None).startswith("not run") and report.tests_line({"passed": 3}) == "3 passed"


def test_busy_machine_is_flagged():
    """A calibration workload much slower than at the start marks the rows measured meanwhile."""
    from ghost_kernels.bench.harness import Calibration, Row

    cal = Calibration(torch.device("cpu"))
    cal.base_ms /= 1000.0   # as if the machine had been 1000x faster at the start
    rows = [Row("forward", "eager", "m", 1, 1, 1, 1, 1, 1, "float32", "nchw", 1)]
    cal.mark(rows)
    assert "machine busy" in rows[0].note and "busy" in cal.summary()
    quiet = Calibration(torch.device("cpu"), factor=1e9)
    quiet.mark(rows[:0])
    assert quiet.summary() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite runs the GPU mode; this is the CPU mode")
def test_cpu_mode_train_op(tmp_path):
    """The train op (forward + backward, train-mode BN): checked against float64, timed; folding and the
    inference-only CUDA backend get no rows (they can never run it) and are named once, with the reason."""
    rc = main(["--quick", "--out", str(tmp_path), "--impls", "eager,eager_folded,triton,cuda", "--shapes",
               "blocks.7.0.ghost2", "--batch", "2", "--dtype", "float32", "--layout", "channels_last", "--ops", "train"])
    assert rc == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    for impl in ("eager", "triton"):
        assert rows[impl]["status"] == "ok" and rows[impl]["op"] == "train", rows[impl]
        assert rows[impl]["rel_err"] < 1e-3 and rows[impl]["median_ms"] > 0
    assert set(rows) == {"eager", "triton"}
    not_timed = json.loads((tmp_path / "bench.json").read_text())["not_timed"]["train"]
    assert "eval-mode only" in not_timed["eager_folded"] and "inference-only" in not_timed["cuda"]
    assert "Not timed for train, by design: eager_folded" in (tmp_path / "bench.md").read_text()
    # the floor of a training step: 3 x + 2 out (+ weights and their gradients), fp32
    assert rows["eager"]["bytes"] > 4 * 2 * (3 * 672 + 2 * 160) * 49


@pytest.mark.parametrize("argv,match", [
    (["--dtype", "float64"], "--dtype: expected some of"),
    (["--layout", "nhwc"], "--layout: expected some of"),
    (["--ops", "backward"], "--ops: expected some of"),
])
def test_bad_arguments_are_named(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        main(argv + ["--out", str(tmp_path)])
