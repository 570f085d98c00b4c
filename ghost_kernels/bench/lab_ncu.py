"""The lab's Nsight Compute phase, and the offline model's prediction for the same launches.

``run_ncu`` starts ``ncu --clock-control none`` on this module's child mode (``--ncu-child
FAMILY:SHAPE:DTYPE``), which launches one family once untimed (loads the kernels) and once between
``cudaProfilerStart``/``Stop``: only that call's kernels are profiled. The metrics are read from
ncu's CSV; the offline model (``bench.offline``) is run on the same shapes, so the JSON holds both
instruction counts side by side.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

METRICS = [
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum",
    "smsp__inst_executed.sum", "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
    "launch__grid_size", "launch__block_size", "smsp__average_warp_latency_issue_stalled_long_scoreboard",
    "smsp__average_warp_latency_issue_stalled_barrier", "smsp__average_warp_latency_issue_stalled_mio_throttle",
    "smsp__average_warp_latency_issue_stalled_wait", "smsp__average_warp_latency_issue_stalled_math_pipe_throttle",
]
# Shapes profiled per family (distinct-shape indices): one per regime (112, 56, 28, 14, 7).
NCU_SHAPES = (0, 2, 5, 8, 13)


def ncu_child(args) -> int:
    """Under ncu: one warm-up call of the family, then the profiled call."""
    import torch

    from ..dispatch import BY_NAME
    from ..spec import distinct_ghostnet_100_specs
    from .lab_timing import ShapeBench
    family, idx, dtype = args.ncu_child.split(":")
    shape = distinct_ghostnet_100_specs()[int(idx)]
    bench = ShapeBench(shape, args.batch, dtype, "channels_last", torch.device("cuda"), l2_bytes=0)
    fam = BY_NAME[family]
    fam.launcher(bench.inputs[0], bench.params, bench.dtype)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fam.launcher(bench.inputs[0], bench.params, bench.dtype)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def _parse(text: str) -> List[Dict[str, str]]:
    """Rows of ncu's ``--csv --page raw`` output (one per kernel; the units row is dropped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    return [r for r in rows if r.get("ID", "").strip().isdigit()]


def _number(v: str):
    try:
        return float(v.replace(",", ""))
    except (AttributeError, ValueError):
        return v


def run_ncu(args, meta: dict, deadline: float) -> dict:
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(ncu):
        return {"status": "ncu not found", "kernels": []}
    from ..dispatch import TRITON_FAMILIES
    kernels, failures = [], []
    for fam in TRITON_FAMILIES:
        for idx in NCU_SHAPES:
            if time.perf_counter() > deadline:
                failures.append(f"{fam.name}:{idx}: lab budget")
                continue
            cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "raw",
                   "--metrics", ",".join(METRICS), sys.executable, "-m", "ghost_kernels.bench.lab",
                   "--out", args.out, "--batch", str(args.batch), "--ncu-child", f"{fam.name}:{idx}:bfloat16"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                failures.append(f"{fam.name}:{idx}: timeout")
                continue
            rows = _parse(res.stdout)
            if res.returncode != 0 or not rows:
                failures.append(f"{fam.name}:{idx}: rc {res.returncode}: {res.stderr[-400:]}")
            for r in rows:
                kernels.append(dict(family=fam.name, shape_index=idx, kernel=r.get("Kernel Name"),
                                    **{m: _number(r.get(m)) for m in METRICS if m in r}))
    predicted = _offline_predictions(args.batch)
    for k in kernels:
        pred = predicted.get((k["family"], k["shape_index"]))
        if pred:
            k["offline_warp_instr_call"] = pred
    return {"status": "ok" if kernels else "no kernels profiled", "kernels": kernels, "failures": failures,
            "metrics": METRICS}


def _offline_predictions(batch: int) -> Dict[tuple, float]:
    """(family, shape index) -> the offline model's warp-instructions per call (all launches)."""
    try:
        from ..spec import distinct_ghostnet_100_specs
        from .offline import model_rows
        from ..dispatch import TRITON_FAMILIES
        shapes = [distinct_ghostnet_100_specs()[i] for i in NCU_SHAPES]
        rows = model_rows([f.name for f in TRITON_FAMILIES], shapes, ["bfloat16"], ["channels_last"], batch)
    except Exception as exc:  # the comparison is a bonus: never lose the ncu numbers to it
        return {("error", str(exc)[:200]): 0.0}
    names = [s.name for s in distinct_ghostnet_100_specs()]
    return {(r["family"], names.index(r["name"])): r["warp_instr"] for r in rows if r["name"] in names}
