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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real lab (benchmarks/gpu_lab.sh)")
def test_lab_cpu_check_runs_every_phase_and_publishes(tmp_path):
    out = tmp_path / "lab"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "ghost_kernels.bench.lab", "--out", str(out), "--cpu-check",
                          "--workers", "1", "--batch", "2", "--budget-s", "900"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    phases = json.loads((out / "phases.json").read_text())["phases"]
    assert phases == {p: "ok" for p in ("precompile", "references", "timing", "ncu", "model")}
    pre = json.loads((out / "precompile.json").read_text())
    assert pre["failures"] == 0 and set(pre["per_family"]) == {f.name for f in gk.dispatch.TRITON_FAMILIES}
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
    assert len(entry["rows"]) == 4 and all("torch_folded" in r["ms"] for r in entry["rows"])


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
