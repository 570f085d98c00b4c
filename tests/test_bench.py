"""The benchmark's CPU mode (what CI can run), its report plumbing, and the command lines of the bench,
the offline model and ``ghost_kernels.info``."""
import contextlib
import io
import json
import os

import pytest
import torch

import ghost_kernels as gk
from ghost_kernels import info
from ghost_kernels.bench import report
from ghost_kernels.bench.__main__ import main, parse_args, select_shapes
from ghost_kernels.bench.offline import cli as offline_cli
from ghost_kernels.bench.summary import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite runs the GPU mode; this is the CPU mode")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One run of the CPU mode shared by the tests below: default implementations, both ops, both
    layouts, one shape (672 -> 160 channels at 7x7), batch 2, float32."""
    if torch.cuda.is_available():
        pytest.skip("the GPU suite runs the GPU mode; this is the CPU mode")
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--quick", "--out", str(out), "--shapes", "blocks.7.0.ghost2", "--batch", "2", "--dtypes",
                   "float32", "--layouts", "nchw,channels_last", "--ops", "forward,train"])
    return dict(rc=rc, data=json.loads((out / "bench.json").read_text()), md=(out / "bench.md").read_text(),
                stdout=stdout.getvalue(), out=out)


@CPU_ONLY
def test_cpu_mode_end_to_end(cpu_run):
    assert cpu_run["rc"] == 0, cpu_run["stdout"][-3000:]
    data = cpu_run["data"]
    for key in ("device", "date", "torch", "triton", "cuda", "copy_GBps", "tests", "rows", "model", "network"):
        assert key in data
    assert data["interpreter_check"].startswith("ok")
    for r in data["rows"]:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["rel_err"] < (1e-3 if r["op"] == "train" else 5e-2)
        assert (r["dtype"], r["batch"]) == ("float32", 2)
    md = cpu_run["md"]
    assert md.startswith("# ghost_kernels benchmark")
    # issue 9: no raw dict of zeros for tests that did not run; no claim of "all 32" over one shape;
    # the model level is not dropped without a word on the CPU
    assert "Tests: not run in this job" in md and "'passed': 0" not in md
    assert "sum of all 32" not in md and "32 Ghost modules (22 distinct shapes)" in md
    assert "needs a CUDA GPU, not run on the CPU" in md and data["model_note"]
    if pytest.importorskip("matplotlib"):
        assert (cpu_run["out"] / "speedup.png").stat().st_size > 1000
    assert "network Ghost modules" in summary(data)


@CPU_ONLY
def test_cpu_mode_times_the_package_paths(cpu_run):
    """Issue 18.9: beside timm's eager module and BN folded ahead of time, the package's own paths: a
    GhostModule through backend="auto" (the PyTorch path for CPU tensors, and the row says so) and
    "torch_folded", in both layouts."""
    rows = [r for r in cpu_run["data"]["rows"] if r["op"] == "forward"]
    impls = {(r["impl"], r["layout"]) for r in rows}
    assert impls == {(i, lay) for i in ("eager", "eager_folded", "auto", "torch_folded") for lay in ("nchw", "channels_last")}
    for r in rows:
        if r["impl"] == "auto":
            assert r["note"] == "runs torch", r
    assert "runs torch" in cpu_run["stdout"]


@CPU_ONLY
def test_cpu_mode_shows_no_bandwidth(cpu_run):
    """Issue 18.9: no GB/s or % of copy on the CPU (they printed as 0 there): the rows and sums hold
    none, the table and bench.md have no such columns and say why."""
    data, stdout, md = cpu_run["data"], cpu_run["stdout"], cpu_run["md"]
    assert data["copy_GBps"] is None
    for r in data["rows"] + data["network"]:
        assert r["GBps"] is None and r["copy_fraction"] is None, r
    why = "GB/s and % of copy are shown for GPU runs only"
    assert why in stdout and why in md
    table = stdout[stdout.index("device: CPU"):]
    assert "GB/s" not in table.replace(why, "") and "%copy" not in table and "% copy" not in md


@CPU_ONLY
def test_cpu_mode_train_op(cpu_run):
    """The train op (forward + backward, train-mode BN): checked against float64, timed; folding and
    the inference-only backends get no rows (they can never run it) and are named once, with the reason."""
    data = cpu_run["data"]
    rows = {(r["impl"], r["layout"]): r for r in data["rows"] if r["op"] == "train"}
    assert set(rows) == {(i, lay) for i in ("eager", "auto") for lay in ("nchw", "channels_last")}
    not_timed = data["not_timed"]["train"]
    assert "eval-mode only" in not_timed["eager_folded"] and "inference-only" in not_timed["torch_folded"]
    assert "inference-only" in not_timed["cuda"]
    assert "Not timed for train, by design: eager_folded" in cpu_run["md"]
    assert "not timed for train, by design: eager_folded (BN folding is eval-mode only); torch_folded" in cpu_run["stdout"]
    # the floor of a training step: 3 x + 2 out (+ weights and their gradients), fp32
    assert rows[("eager", "nchw")]["bytes"] > 4 * 2 * (3 * 672 + 2 * 160) * 49


def test_shape_selection_and_network_sum():
    everything = select_shapes("all", quick=False)
    assert sum(count for _, count in everything) == 32  # all 32 Ghost modules of GhostNet 1.0x
    assert len(select_shapes("quick", quick=False)) == 5  # one per resolution: 112, 56, 28, 14, 7
    assert [m.name for m, _ in select_shapes("blocks.6.3.ghost1,0", quick=False)] == ["blocks.6.3.ghost1",
                                                                                       "blocks.0.0.ghost1"]
    with pytest.raises(ValueError, match="'blocks.99.0.ghost1' names no Ghost module of GhostNet 1.0x"):
        select_shapes("blocks.99.0.ghost1", quick=False)


def test_shapes_of_other_models_and_explicit_shapes():
    """Issue 16.4: --model's distinct Ghost module shapes with their counts (yolov8n-ghost at 640: 26
    GhostConv in 14 shapes, 6 with a 3x3 stride-2 primary conv), its module names and indices, and
    explicit shapes beside GhostNet's names."""
    pytest.importorskip("ultralytics")
    yolo = select_shapes("all", quick=False, model="yolov8n-ghost")
    assert len(yolo) == 14 and sum(c for _, c in yolo) == 26
    assert sum(c for m, c in yolo if m.spec.kernel_size == 3 and m.spec.stride == 2) == 6
    assert {m.spec.act for m, _ in yolo} == {"silu", "none"} and {m.spec.dw_size for m, _ in yolo} == {5}
    first = yolo[0][0]
    assert (first.name, first.h, first.w, first.spec.inp, first.spec.oup) == ("model.1", 320, 320, 16, 32)
    picked = select_shapes("model.8.m.0.conv.0,0,16->32@320x320:k3s2:silu:dw5", quick=False, model="yolov8n-ghost")
    assert [c for _, c in picked] == [2, 1, 1] and picked[1][0] == first
    assert picked[2][0].spec == first.spec and (picked[2][0].h, picked[2][0].w) == (320, 320)
    mixed = select_shapes("blocks.1.0.ghost1,40->80@9x7:hardswish:dw5:r3", quick=False)
    assert mixed[1][0].spec == gk.GhostSpec(40, 80, ratio=3, dw_size=5, act="hardswish") and mixed[1][0].h == 9


def test_model_shapes_snapshot_is_what_the_packages_build(monkeypatch):
    """bench/models.py's snapshot (for the GPU machine, which has no ultralytics) equals the shapes read
    off the built model; without the package, --model uses it at the model's image size, and says so
    at another size."""
    pytest.importorskip("ultralytics")
    from ghost_kernels.bench import models
    for name in models.SNAPSHOT_MODELS:
        built = models.built_model_shapes(name)
        monkeypatch.setattr(models, "build_model", lambda n: (_ for _ in ()).throw(models.ModelUnavailable(n)))
        assert models.model_shapes(name) == built, "remake bench/model_shapes.json (bench/models.py's docstring)"
        with pytest.raises(models.ModelUnavailable):
            models.model_shapes(name, image_size=320)
        monkeypatch.undo()
    assert all(models.parse_shape(models.format_shape(m.spec, m.h, m.w)).spec == m.spec for m, _ in built)


def test_offline_model_reports_what_a_family_does_not_run(tmp_path):
    """An explicit shape a family does not take (3x3 stride-2 primary conv: triton_band) is a row saying
    so, not a launch with options the kernel would ignore; the family that runs it is modelled, and
    publishing the run adds its prediction to the table's offline section under the 3x3 key, beside the
    rows already there (another network's run)."""
    import importlib.util

    from ghost_kernels.bench.models import parse_shape
    from ghost_kernels.bench.offline import report as offline_report
    from ghost_kernels.bench.offline.runner import model as offline_model
    from ghost_kernels.core import choice
    rows, meta = offline_model(["triton_band", "triton_two_pass"], [parse_shape("16->32@20x20:k3s2:silu:dw5")],
                               batch=2)
    band, two_pass = rows
    assert "does not run this module: kernel_size=3" in band["error"], band
    assert not two_pass.get("error") and two_pass["predicted_us"] > 0 and two_pass["spills"] == 0, two_pass

    spec = importlib.util.spec_from_file_location("publish", os.path.join(ROOT, "benchmarks", "publish.py"))
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    assert publish.DEFAULT_TABLE == choice.TABLE_PATH     # what the dispatcher reads
    out = tmp_path / "run"
    offline_report.write(str(out), rows, dict(meta, network="yolov8n-ghost", date="2026-12-03"))
    table = tmp_path / "table.json"
    other = dict(inp=16, oup=16, ratio=2, dw_size=3, stride=1, act="relu", h=112, w=112, dtype="bfloat16",
                 layout="channels_last", predicted_us={"triton_band": 50.0}, instr_per_byte={"triton_band": 0.2})
    table.write_text(json.dumps({"gpus": {}, "offline": {"source": "earlier.json", "rows": [other]}}))
    stem = publish.publish_offline(str(out), str(table), str(tmp_path / "results"))
    assert stem == "2026-12-03-offline-sm90-yolov8n-ghost"
    section = json.loads(table.read_text())["offline"]
    by_key = {choice.row_key(r): r for r in section["rows"]}
    k3 = choice.shape_key(gk.GhostSpec(16, 32, kernel_size=3, stride=2, dw_size=5, act="silu"), 20, 20,
                          torch.bfloat16, True)
    assert set(by_key) == {choice.row_key(other), k3}
    assert by_key[k3]["predicted_us"] == {"triton_two_pass": two_pass["predicted_us"]}
    assert section["source"] == "earlier.json; benchmarks/results/2026-12-03-offline-sm90-yolov8n-ghost.json"


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


def test_gpu_table_keeps_the_bandwidth_columns():
    """With a copy bandwidth (a GPU run) the table shows GB/s and % of copy, 3 significant digits of
    neither dropped to 0 by rounding."""
    from ghost_kernels.bench.harness import Row

    r = Row("forward", "auto", "m", 16, 16, 112, 112, 1, 256, "bfloat16", "channels_last", 1, bytes=10 ** 9,
            median_ms=1.0, GBps=1000.0, copy_fraction=0.25)
    text = report.table([r], report.network_sum([r], 4000.0), 4000.0, "GPU X")
    assert "copy bandwidth (read+write): 4000 GB/s" in text and "%copy" in text and " 1000 " in text and " 25 " in text
    assert "shown for GPU runs only" not in text


# ---- command lines ------------------------------------------------------------------------------

def _exit(fn, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


BAD_BENCH_ARGS = [   # (argv, option, bad value, one of the accepted values named in the message)
    (["--offline", "--families", "triton_bnd"], "--families", "triton_bnd", "triton_band"),
    (["--dtypes", "fp64"], "--dtypes", "fp64", "bfloat16, float16, float32"),
    (["--offline", "--dtypes", "fp64"], "--dtypes", "fp64", "bfloat16, float16, float32"),
    (["--shapes", "blocks.9.9"], "--shapes", "blocks.9.9", "blocks.0.0.ghost1"),
    (["--offline", "--shapes", "blocks.9.9"], "--shapes", "blocks.9.9", "blocks.0.0.ghost1"),
    (["--shapes", "0,99"], "--shapes", "99", "0-21"),
    (["--secondary-shapes", "nope"], "--secondary-shapes", "nope", "quick"),
    (["--shapes", "16->32@320x320:k3s2:gelu"], "--shapes", "16->32@320x320:k3s2:gelu", "unknown option 'gelu'"),
    (["--offline", "--shapes", "16->32@320"], "--shapes", "16->32@320", "CIN->OUP@HxW"),
    (["--model", "yolov9"], "--model", "yolov9", "yolov8n-ghost"),
    (["--layouts", "nhwc"], "--layouts", "nhwc", "channels_last, nchw"),
    (["--ops", "forward,backward"], "--ops", "backward", "forward, train"),
    (["--impls", "eager,trition"], "--impls", "trition", "triton_band"),
    (["--batch", "0"], "--batch", "0", "positive integer"),
    (["--compile-budget", "soon"], "--compile-budget", "soon", "seconds"),
]


@pytest.mark.parametrize("argv,option,value,accepted", BAD_BENCH_ARGS)
def test_bench_bad_arguments_are_one_line_errors(argv, option, value, accepted, capsys):
    """Issue 18.7: exit code 2 and one line naming the option, the bad value and what is accepted,
    while parsing (no traceback, nothing run first)."""
    code, out, err = _exit(parse_args, argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"argument {option}: '{value}'" in err and accepted in err, err


@pytest.mark.parametrize("argv,option", [
    (["--families", "triton_band"], "--families: only --offline reads it"),
    (["--offline", "--ops", "forward"], "--ops: --offline does not read it"),
    (["--dtype", "float32"], "unrecognized arguments: --dtype float32"),     # one spelling: --dtypes
    (["--layout", "nchw"], "unrecognized arguments: --layout nchw"),
    (["--dtyp", "float32"], "unrecognized arguments: --dtyp float32"),        # no abbreviations either
])
def test_bench_options_have_one_spelling_and_one_mode(argv, option, capsys):
    code, _, err = _exit(parse_args, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and option in err, err


def test_bench_help_is_grouped_with_defaults(capsys):
    code, out, _ = _exit(parse_args, ["--help"], capsys)
    assert code == 0
    groups = ["what runs (timing and --offline):", "timing options:", "offline model options:", "output:"]
    assert [out.index(g) for g in groups] == sorted(out.index(g) for g in groups)
    timing = out[out.index("timing options:"):out.index("offline model options:")]
    offline = out[out.index("offline model options:"):out.index("output:")]
    assert "--ops" in timing and "--families" not in timing and "--families" in offline and "--ops" not in offline
    for default in ("(default: bfloat16)", "(default: channels_last)", "(default: forward,train)", "(default: all)",
                    "(default: bench-out)", "(default: 240.0)"):
        assert default in " ".join(out.split()), default
    assert "--dtypes" in out and "--dtype " not in out and "--layout " not in out


@pytest.mark.parametrize("argv,option,value", [
    (["--families", "triton_bnd"], "--families", "triton_bnd"),
    (["--dtypes", "fp64"], "--dtypes", "fp64"),
    (["--layouts", "nhwc"], "--layouts", "nhwc"),
    (["--shapes", "blocks.9.9"], "--shapes", "blocks.9.9"),
    (["--dtype", "float32"], "unrecognized arguments", "--dtype"),
])
def test_offline_bad_arguments_are_one_line_errors(argv, option, value, capsys):
    """``python -m ghost_kernels.bench.offline``: the same options, the same checks while parsing."""
    code, _, err = _exit(offline_cli.main, argv + ["--out", "unused"], capsys)
    assert code == 2 and err.count("\n") == 1 and option in err and value in err, err


def test_offline_help_is_grouped_with_defaults(capsys):
    code, out, _ = _exit(offline_cli.main, ["--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0
    assert "offline model options:" in out and "output:" in out and "(default: offline-out)" in flat
    assert "(default: bfloat16)" in flat and "--dtypes" in out and "--dtype " not in out


def test_info_help(capsys):
    """``python -m ghost_kernels.info --help`` prints usage and exits 0 (it used to ignore the flag
    and print the report); an unknown option is an error."""
    code, out, _ = _exit(info.main, ["--help"], capsys)
    assert code == 0 and out.startswith("usage: python -m ghost_kernels.info") and "backend" in out
    code, _, err = _exit(info.main, ["--json"], capsys)
    assert code == 2 and "unrecognized arguments: --json" in err


def test_overhead_mode_measures_the_module_call_beside_a_conv():
    """``--overhead`` (issue 15, host path): per backend, the module call with its launches stubbed
    (the recorded launches are what the kernels would get) beside an nn.Conv2d call. Plumbing only:
    a benchmark measures, tests do not judge times."""
    from ghost_kernels.bench import overhead
    rows = overhead.measure(("triton", "triton_two_pass"), calls=20, repeats=1)
    assert [r["backend"] for r in rows] == ["triton", "triton_two_pass"]
    assert all(r["us"] > 0 and r["conv_us"] > 0 and r["ratio"] == r["us"] / r["conv_us"] for r in rows)
    assert rows[1]["launches"] == 2            # the two passes, recorded once per call
    assert "| triton_two_pass | 2 |" in overhead.table(rows)
