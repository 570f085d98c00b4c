"""The lab's Nsight Compute phase, and the offline model's prediction for the same launches.

``run_ncu`` starts ``ncu --clock-control none`` once per family on this module's child mode
(``--ncu-child FAMILY:I,J,...:DTYPE``), which for each shape launches the family once untimed (loads
the kernels) and once between ``cudaProfilerStart``/``Stop``: only those calls' kernels are profiled
(one process per family: Python and torch start once). The metrics are read from
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

    from ..core.spec import distinct_ghostnet_100_specs
    from ..dispatch import BY_NAME
    from .lab_timing import ShapeBench
    family, indices, dtype = args.ncu_child.split(":")
    fam = BY_NAME[family]
    for idx in indices.split(","):
        shape = distinct_ghostnet_100_specs()[int(idx)]
        bench = ShapeBench(shape, args.batch, dtype, "channels_last", torch.device("cuda"), l2_bytes=0)
        fam.launcher(bench.inputs[0], bench.params, bench.dtype)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fam.launcher(bench.inputs[0], bench.params, bench.dtype)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"NCU_SHAPE {family} {idx} {shape.name}", flush=True)
        del bench
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


def start_offline_model(args):
    """The offline model for the shapes ncu profiles, started in the background (a CPU process
    compiling with this machine's Triton: the prediction to set beside ncu's counts)."""
    from ..dispatch import TRITON_FAMILIES
    out = os.path.join(args.out, "offline")
    cmd = [sys.executable, "-m", "ghost_kernels.bench.offline", "--out", out, "--quiet",
           "--families", ",".join(f.name for f in TRITON_FAMILIES), "--shapes", ",".join(map(str, NCU_SHAPES)),
           "--dtypes", "bfloat16", "--layouts", "channels_last", "--batch", str(args.batch)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = open(os.path.join(args.out, "offline.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_ncu(args, meta: dict, deadline: float, offline=None) -> dict:
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(ncu):
        return {"status": "ncu not found", "kernels": []}
    from ..dispatch import TRITON_FAMILIES
    kernels, failures, raw = [], [], {}
    for fam in TRITON_FAMILIES:
        left = deadline - time.perf_counter()
        if left < 20:
            failures.append(f"{fam.name}: lab budget")
            continue
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "raw",
               "--metrics", ",".join(METRICS), sys.executable, "-m", "ghost_kernels.bench.lab",
               "--out", args.out, "--batch", str(args.batch),
               "--ncu-child", f"{fam.name}:{','.join(map(str, NCU_SHAPES))}:bfloat16"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            failures.append(f"{fam.name}: timeout")
            continue
        raw[fam.name] = res.stdout[-20000:]
        rows = _parse(res.stdout)
        if res.returncode != 0 or not rows:
            failures.append(f"{fam.name}: rc {res.returncode}: {res.stderr[-400:]}")
        # the kernels come in launch order: the family's launches per call, shape after shape
        per_call = max(1, len(rows) // len(NCU_SHAPES)) if len(rows) % len(NCU_SHAPES) == 0 else None
        for i, r in enumerate(rows):
            idx = NCU_SHAPES[i // per_call] if per_call else None
            kernels.append(dict(family=fam.name, shape_index=idx, kernel=r.get("Kernel Name"),
                                **{m: _number(r.get(m)) for m in METRICS if m in r}))
    predicted = _offline_predictions(args, offline, deadline)
    for k in kernels:
        pred = predicted.get((k["family"], k["shape_index"]))
        if pred:   # per call (all of the call's kernels): compare with the call's summed inst_executed
            k["offline_warp_instr_call"] = pred
    return {"status": "ok" if kernels else "no kernels profiled", "kernels": kernels, "failures": failures,
            "metrics": METRICS, "raw_csv_tail": raw}


def _offline_predictions(args, offline, deadline: float) -> Dict[tuple, float]:
    """(family, shape index) -> the offline model's warp-instructions per call (all launches), from
    the background run started by :func:`start_offline_model` (waited for until ``deadline``)."""
    if offline is None:
        return {}
    try:
        offline.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        offline.kill()
        return {}
    try:
        import json
        with open(os.path.join(args.out, "offline", "offline.json")) as f:
            rows = json.load(f)["rows"]
    except (OSError, KeyError, ValueError):
        return {}
    from ..core.spec import distinct_ghostnet_100_specs
    names = [s.name for s in distinct_ghostnet_100_specs()]
    return {(r["family"], names.index(r["name"])): r["warp_instr"] for r in rows
            if r.get("name") in names and r.get("warp_instr")}
