"""The GPU lab's plumbing (on the CPU: ``--cpu-check`` runs every phase on two small shapes in the
Triton interpreter), publishing its results into a choice table, and the per-shape choice itself."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ghost_kernels as gk
from ghost_kernels.core import choice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_lab_cpu_check(tmp_path, *args):
    """``python -m ghost_kernels.bench.lab --cpu-check`` at batch 2 into tmp_path/lab (asserting it
    succeeds); the folder."""
    out = tmp_path / "lab"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "ghost_kernels.bench.lab", "--out", str(out), "--cpu-check",
                          "--batch", "2", "--budget-s", "900", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real lab (benchmarks/gpu_lab.sh)")
def test_lab_cpu_check_runs_every_phase_and_publishes(tmp_path):
    out = run_lab_cpu_check(tmp_path, "--workers", "1")
    phases = json.loads((out / "phases.json").read_text())["phases"]
    assert phases == {p: "ok" for p in ("precompile", "references", "timing", "ncu", "model")}
    pre = json.loads((out / "precompile.json").read_text())
    assert pre["failures"] == 0 and set(pre["per_family"]) == {f.name for f in gk.dispatch.TRITON_FAMILIES}
    check_model_rows(json.loads((out / "model.json").read_text()))
    rows = json.loads((out / "timing.json").read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"eager", "eager_folded", "torch_folded", "auto"} <= impls
    assert {f.name for f in gk.dispatch.TRITON_FAMILIES} <= impls
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["rel_err"] < 1e-3
        for key in ("inp", "oup", "ratio", "dw_size", "stride", "act", "h", "w", "dtype", "layout", "batch", "bytes"):
            assert key in r
    for r in rows:
        if r["impl"].startswith("triton_") and r.get("configs"):
            assert r["median_ms"] == min(c["median_ms"] for c in r["configs"] if c["median_ms"])
    # publish: results files and a choice table the dispatcher reads
    table = tmp_path / "table.json"
    results = tmp_path / "results"
    pub = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "publish.py"), str(out), "--table",
                          str(table), "--results", str(results)], capture_output=True, text=True, cwd=ROOT)
    assert pub.returncode == 0, pub.stderr[-2000:]
    assert any(p.name.endswith("-lab-timing.json") for p in results.iterdir())
    data = json.loads(table.read_text())
    entry = data["gpus"]["CPU (lab --cpu-check)"]
    assert len(entry["rows"]) == 5 and all("torch_folded" in r["ms"] for r in entry["rows"])
    kxk = [r for r in entry["rows"] if r["act"] == "silu:k3"]   # the 3x3 stride-2 shape: triton_two_pass only
    assert len(kxk) == 1 and "triton_two_pass" in kxk[0]["ms"] and "triton_band" not in kxk[0]["ms"], kxk


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real lab (benchmarks/gpu_lab.sh)")
def test_lab_train_phase_cpu_check(tmp_path):
    """The train phase (issue 17.5; not in the default phases): per shape eager / compile / triton
    training steps checked against float64 (compile: skipped on the CPU, saying so), then GhostNet's
    four training rows, each first checked against timm eager's gradients from the same weights."""
    out = run_lab_cpu_check(tmp_path, "--phases", "train")
    data = json.loads((out / "train.json").read_text())
    assert data["copy_GBps"] > 0    # measured in the same call
    shapes = [r for r in data["rows"] if r["section"] == "shape"]
    assert {(r["name"], r["impl"]) for r in shapes} == {(n, i) for n in ("blocks.0.0.ghost1", "blocks.1.0.ghost2")
                                                        for i in ("eager", "compile", "triton")}
    for r in shapes:
        if r["impl"] == "compile":
            assert r["status"] == "skipped" and "CUDA only" in r["note"], r
        else:
            assert r["status"] == "ok" and r["rel_err"] < 1e-5 and r["median_ms"] > 0 and r["op"] == "train", r
    model = {r["impl"]: r for r in data["rows"] if r["section"] == "model"}
    assert set(model) == {"timm_eager", "convert_triton_eager", "timm_compile", "convert_triton_compile"}
    for r in model.values():
        assert r["status"] == "ok" and r["grad_rel_err"] < 1e-5 and r["images_per_s"] > 0, r
        assert r["loss"] == pytest.approx(r["loss_timm_eager"], rel=1e-5)
    results = tmp_path / "results"   # publish files a train-only call (no timing.json, no table)
    pub = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "publish.py"), str(out), "--results",
                          str(results), "--table", str(tmp_path / "table.json")], capture_output=True, text=True, cwd=ROOT)
    assert pub.returncode == 0, pub.stderr[-2000:]
    assert sorted(p.name.rsplit("-lab-", 1)[1] for p in results.iterdir()) == ["phases.json", "references.json", "train.json"]
    assert not (tmp_path / "table.json").exists()


def check_model_rows(model):
    """The model phase's rows under --cpu-check (lab_model's docstring): GhostNet at the lab's batch, then
    for every model every small batch x {its package's model, converted} x {eager, compile,
    reduce-overhead}, each checked twice and timed."""
    from ghost_kernels.bench.lab_model import CPU_CHECK_BATCHES, DEFAULT_MODELS
    from ghost_kernels.bench.models import MODELS
    rows = model["rows"]
    assert model["small_batches"] == list(CPU_CHECK_BATCHES) and model["models"] == list(DEFAULT_MODELS)
    assert {r["net"] for r in rows} == set(DEFAULT_MODELS)
    for net in DEFAULT_MODELS:
        base = MODELS[net][0]
        small = {(r["model"], r["mode"], r["batch"]): r for r in rows if r["section"] == "small_batch" and r["net"] == net}
        assert set(small) == {(m, mode, b) for m in (base, "convert_auto") for mode in ("eager", "compile", "reduce-overhead")
                              for b in CPU_CHECK_BATCHES}, net
        for r in small.values():
            assert r["status"] == "ok", r
            assert r["rel_err"] < 1e-3 and r["rel_err_new_input"] < 1e-3 and r["median_ms"] > 0 and r["images_per_s"] > 0
            assert r["timing"] == "per call, back to back, host clock"
        assert small[("convert_auto", "reduce-overhead", 1)]["impl"] == "convert_auto_reduce_overhead"
        assert small[(base, "eager", 1)]["impl"] == f"{base}_eager"
    assert "yolov8n-ghost small_batch eager@1" in model["x_timm"]
    large = {r["impl"]: r for r in rows if r["section"] == "batch"}
    assert set(large) == {"timm_eager", "convert_auto", "timm_compile", "convert_auto_compile", "convert_triton_compile"}
    assert all(r["status"] == "ok" and r["batch"] == 2 for i, r in large.items() if i != "convert_triton_compile")
    assert large["convert_triton_compile"]["status"].startswith("skipped: cpu-check")
    assert "small_batch reduce-overhead@1" in model["x_timm"] and "batch compile@2" in model["x_timm"]


def test_model_phase_budget_skips_what_it_cannot_fit():
    """A compile starts only while the time left covers it (the slowest compile seen so far); the rows
    it refuses say why and how to run them."""
    from ghost_kernels.bench.lab_model import ROW_S, Budget
    now = [0.0]
    budget = Budget(deadline=100.0, compile_s=25.0, clock=lambda: now[0])
    assert budget.refuses(0) is None and budget.refuses(2) is None
    now[0] = 100.0 - 2 * 25.0 - ROW_S + 1
    assert budget.refuses(1) is None and "lab budget" in budget.refuses(2) and "--phases model" in budget.refuses(2)
    budget.compiled(60.0)   # slower than expected: the estimate follows
    assert budget.refuses(1) is not None and budget.refuses(0) is None
    budget.compiled(10.0)
    assert budget.compile_s == 60.0
    assert Budget(deadline=None).refuses(99) is None


def test_model_phase_says_which_model_it_could_not_build(monkeypatch):
    """The GPU machine has timm but no ultralytics (and no network): YOLO's rows are one row saying
    so, not an error of the phase."""
    from ghost_kernels.bench import lab_model

    def unavailable(name):
        raise lab_model.ModelUnavailable(f"{name} needs the ultralytics package, which is not importable here")
    monkeypatch.setattr(lab_model, "build_model", unavailable)
    res = lab_model.model_phase(torch.device("cpu"), 2, None, cpu_check=True, models=("yolov8n-ghost",))
    assert res["rows"] == [dict(impl="ultralytics", net="yolov8n-ghost", batch=2,
                                status="skipped: yolov8n-ghost needs the ultralytics package, which is not "
                                       "importable here")]


@pytest.mark.parametrize("argv,message", [
    (["--out", "x", "--phases", "timing,modle"], "argument --phases: 'modle' is not one of precompile, references"),
    (["--out", "x", "--budget-s", "-5"], "argument --budget-s: '-5' is not a number of seconds"),
    (["--phases", "model"], "the following arguments are required: --out"),
    (["--out", "x", "--models", "ghostnet_100,yolov9"], "argument --models: 'yolov9' is not one of ghostnet_100"),
])
def test_lab_bad_arguments_are_one_line_errors(argv, message, capsys):
    from ghost_kernels.bench.lab import parse_args
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err


def _table(ms_family, ms_folded):
    key = choice.shape_key(gk.GhostSpec(16, 16), 112, 112, torch.bfloat16, True)
    row = dict(zip(("inp", "oup", "ratio", "dw_size", "stride", "act", "h", "w", "dtype", "layout"), key))
    row["ms"] = {"triton_two_pass": ms_family, "eager_folded": ms_folded, "triton_halo": 1.0}
    entry = choice.entry_from_rows([], "X", (9, 0), "test", "today")
    entry["rows"] = {key: row["ms"]}
    entry["configs"] = {key: {}}
    return key, {"GPU A": entry}


@pytest.mark.parametrize("family_ms,folded_ms,first", [(0.1, 0.2, "triton_two_pass"), (0.3, 0.2, "torch_folded")])
def test_measured_choice_is_never_slower_than_eager_folded(family_ms, folded_ms, first):
    """auto ranks by measurement; eager_folded's time stands in for torch_folded when it was not timed
    itself, so a fused family is chosen only where it was measured faster."""
    key, table = _table(family_ms, folded_ms)
    ms, source = choice.measurements(key, "GPU A", (9, 0), table)
    assert ms["torch_folded"] == folded_ms and "GPU A" in source
    cands = ["torch_folded", "triton_two_pass", "triton_halo", "cuda", "triton_band"]
    original = choice.load_table
    choice.load_table = lambda path=None: table
    try:
        order, why = choice.rank(cands, key, "GPU A", (9, 0), ["torch_folded"])
        assert order[0] == first and "measured on GPU A" in why
        # same compute capability: a measured H200 informs an H100
        order_b, why_b = choice.rank(cands, key, "GPU B", (9, 0), ["torch_folded"])
        assert order_b == order and "GPU A" in why_b
        # another architecture, nothing measured: the heuristic (torch_folded for auto)
        order_c, why_c = choice.rank(cands, key, "GPU C", (8, 0), ["torch_folded"])
        assert order_c[0] == "torch_folded" and "no measurement" in why_c
    finally:
        choice.load_table = original


def test_committed_table_is_read():
    """The table committed with the package holds the first H200 run; its shapes pick torch_folded."""
    table = choice.load_table()
    assert "NVIDIA H200" in table
    key = choice.shape_key(gk.GhostSpec(16, 16), 112, 112, torch.bfloat16, True)
    order, why = choice.rank(["torch_folded", "triton_halo", "cuda"], key, "NVIDIA H200", (9, 0), ["torch_folded"])
    assert order == ["torch_folded", "triton_halo", "cuda"] and "measured on NVIDIA H200" in why


def test_a_k_by_k_module_never_borrows_a_1x1_measurement():
    """The table's rows are 1x1 modules: a 3x3 primary conv of the same sizes has no measurement of its
    own (the heuristic order), never the 1x1 module's."""
    table = choice.load_table()
    one, three = (choice.shape_key(gk.GhostSpec(16, 16, kernel_size=k), 112, 112, torch.bfloat16, True) for k in (1, 3))
    assert choice.measurements(one, "NVIDIA H200", (9, 0), table)[0] is not None
    assert choice.measurements(three, "NVIDIA H200", (9, 0), table) == (None, None)
    # a lab row of the 3x3 module is filed under the 3x3 key, never the 1x1 one
    row = dict(op="forward", impl="triton_two_pass", status="ok", median_ms=0.1, inp=16, oup=16, kernel_size=3,
               ratio=2, dw_size=3, stride=1, act="relu", h=112, w=112, dtype="bfloat16", layout="channels_last")
    entry = choice.entry_from_rows([row], "GPU K", (9, 0), "test", "today")
    assert [choice.row_key(r) for r in entry["rows"]] == [three]
