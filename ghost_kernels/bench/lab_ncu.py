"""The lab's Nsight Compute phase, beside the offline model's three terms for the same calls.

``run_ncu`` starts ``ncu --clock-control none`` once per family on this module's child mode
(``--ncu-child FAMILY:I,J,...:DTYPE``), which for each call of the family's plan (:func:`ncu_plan`:
each shape with the default config, and the shapes of a variant -- ``offline/variants.py``, e.g.
``triton_band``'s old K-loop buffering at 240->80 and 672->112 @14 -- with the variant's config)
launches the family once untimed (loads the kernels) and once between ``cudaProfilerStart``/``Stop``:
only those calls' kernels are profiled (one process per family: Python and torch start once). The
child writes the plan it ran, with each call's kernel count, to ``ncu_plan_<family>.json``: the
kernels in ncu's CSV are assigned to calls in that order.

The metrics say which of the model's terms was right: time, DRAM bytes and throughput
(``dram__throughput.avg.pct_of_peak_sustained_elapsed``: the HBM term), executed warp-instructions and
issue activity (the issue term), and the shares of warp cycles stalled on a long scoreboard (waiting
for global memory) and at a barrier (the latency term), with occupancy and registers. The offline
model (``bench.offline``, with the variants) runs on the same shapes in the background; the phase
prints one line per call with the measured time and metrics next to the model's issue, HBM and
latency terms (``table`` in ``ncu.json``).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

STALL_METRICS = {   # ncu metric -> short name in the table
    "smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct": "long_sb_pct",
    "smsp__warp_issue_stalled_barrier_per_warp_active.pct": "barrier_pct",
    "smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct": "lg_throttle_pct",
    "smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct": "mio_throttle_pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
}
METRICS = [
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum",
    "smsp__inst_executed.sum", "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread",
    "launch__grid_size", "launch__block_size", "smsp__average_warp_latency_issue_stalled_long_scoreboard",
    "smsp__average_warp_latency_issue_stalled_barrier", "smsp__average_warp_latency_issue_stalled_mio_throttle",
    "smsp__average_warp_latency_issue_stalled_wait", "smsp__average_warp_latency_issue_stalled_math_pipe_throttle",
] + list(STALL_METRICS)
# Shapes profiled per family (distinct-shape indices): one per regime (112, 56, 28, 14, 7) and the ones
# the latency term flags: 40->240 @28 (two-pass's depthwise pass), 240->80 and 672->112 @14 (band's K loop).
NCU_SHAPES = (0, 2, 5, 8, 9, 10, 13, 18)
# Shapes a family's variants (offline/variants.py) are profiled at, beside the default
VARIANT_SHAPES = {("triton_band", "old_buffering"): (10, 18)}
VARIANTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offline", "variants.py")


def ncu_plan(family: str, indices: Sequence[int]) -> List[Tuple[int, Optional[str]]]:
    """The calls one family's ncu child makes, in order: ``(shape index, None)`` for the default config
    of every shape, then ``(shape index, variant)`` for the family's variants at their shapes."""
    plan: List[Tuple[int, Optional[str]]] = [(i, None) for i in indices]
    for (fam, variant), shapes in VARIANT_SHAPES.items():
        if fam == family:
            plan += [(i, variant) for i in shapes]
    return plan


def _variant_config(fam, variant: Optional[str], x, params, dtype):
    """The config of the call (None: the default), and whether the call is worth making (a variant
    equal to the default is skipped: the kernel engineer's config does not have it yet)."""
    if variant is None:
        return None, True
    from .offline.variants import variant_config
    cfg = variant_config(fam, variant, x, params, dtype)
    return cfg, cfg is not None


def ncu_child(args) -> int:
    """Under ncu: for each call of the plan, one warm-up call, then the profiled call."""
    import torch

    from ..core.spec import distinct_ghostnet_100_specs
    from ..dispatch import BY_NAME
    from ..triton import common as tc
    from .lab_timing import ShapeBench
    family, indices, dtype = args.ncu_child.split(":")
    fam = BY_NAME[family]
    done = []
    for idx, variant in ncu_plan(family, [int(i) for i in indices.split(",")]):
        shape = distinct_ghostnet_100_specs()[idx]
        bench = ShapeBench(shape, args.batch, dtype, "channels_last", torch.device("cuda"), l2_bytes=0)
        x = bench.inputs[0]
        cfg, run = _variant_config(fam, variant, x, bench.params, bench.dtype)
        if run:
            with tc.capture_launches() as launches:
                fam.launcher(x, bench.params, bench.dtype, config=cfg)
            fam.launcher(x, bench.params, bench.dtype, config=cfg)
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            fam.launcher(x, bench.params, bench.dtype, config=cfg)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            done.append(dict(shape_index=idx, name=shape.name, variant=variant, kernels=len(launches)))
        print(f"NCU_SHAPE {family} {idx} {shape.name} {variant or 'default'}"
              + ("" if run else " (skipped: the variant is the default config)"), flush=True)
        del bench
    with open(os.path.join(args.out, f"ncu_plan_{family}.json"), "w") as f:
        json.dump(done, f)
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


def assign_kernels(family: str, rows: List[Dict[str, str]], plan: List[dict]) -> List[dict]:
    """ncu's kernel rows (launch order) as records of the calls of ``plan`` (``kernels`` per call);
    without a plan that accounts for every row, the rows are kept without a call."""
    out = []
    k = 0
    counted = sum(c["kernels"] for c in plan) == len(rows)
    for call in plan if counted else []:
        for _ in range(call["kernels"]):
            out.append(_kernel(family, rows[k], call))
            k += 1
    out += [_kernel(family, r, {}) for r in rows[k:]]
    return out


def _kernel(family: str, row: Dict[str, str], call: dict) -> dict:
    return dict(family=family, shape_index=call.get("shape_index"), variant=call.get("variant"),
                kernel=row.get("Kernel Name"), **{m: _number(row.get(m)) for m in METRICS if m in row})


def calls(kernels: List[dict]) -> List[dict]:
    """The profiled calls: per (family, shape, variant), the time summed over the call's kernels, the
    DRAM throughput and stall shares time-weighted over them, warp-instructions summed."""
    out: Dict[tuple, dict] = {}
    weighted: Dict[tuple, Dict[str, List[float]]] = {}
    for k in kernels:
        if k.get("shape_index") is None:
            continue
        key = (k["family"], k["shape_index"], k.get("variant"))
        c = out.setdefault(key, dict(family=k["family"], shape_index=k["shape_index"], variant=k.get("variant"),
                                     time_us=0.0, inst_executed=0.0))
        t = float(k.get("gpu__time_duration.sum") or 0) / 1e3      # ns -> us
        c["time_us"] += t
        c["inst_executed"] += float(k.get("smsp__inst_executed.sum") or 0)
        w = weighted.setdefault(key, {})
        for metric, short in STALL_METRICS.items():
            if isinstance(k.get(metric), float):
                sums = w.setdefault(short, [0.0, 0.0])
                sums[0] += t * k[metric]
                sums[1] += t
    for key, c in out.items():
        for short in STALL_METRICS.values():
            total, t = weighted[key].get(short, (0.0, 0.0))
            c[short] = total / t if t else None
    return list(out.values())


def table(call_rows: List[dict], predicted: Dict[tuple, dict]) -> List[str]:
    """One line per profiled call: measured time, DRAM throughput, stall shares, and the model's
    issue, HBM and latency terms and its prediction (bound in parentheses)."""
    from ..core.spec import distinct_ghostnet_100_specs
    shapes = distinct_ghostnet_100_specs()
    head = ("| family | shape | variant | ncu us | DRAM % | long-scoreboard % | barrier % | lg/mio throttle % | "
            "model issue us | hbm us | latency us | pred us |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in call_rows:
        s = shapes[c["shape_index"]]
        p = predicted.get((c["family"], c["shape_index"], c.get("variant")), {})
        lines.append(
            f"| {c['family']} | {s.spec.inp}->{s.spec.oup} @{s.h} | {c.get('variant') or 'default'} | "
            f"{c['time_us']:.1f} | {_pct(c['dram_pct'])} | {_pct(c['long_sb_pct'])} | {_pct(c['barrier_pct'])} | "
            f"{_pct(c['lg_throttle_pct'])}/{_pct(c['mio_throttle_pct'])} | {_us(p.get('issue_us'))} | "
            f"{_us(p.get('hbm_us'))} | {_us(p.get('latency_us'))} | {_us(p.get('predicted_us'))}"
            + (f" ({p['bound'][0]})" if p.get("bound") else "") + " |")
    return lines


def _pct(v) -> str:
    return f"{v:.0f}" if isinstance(v, float) else "-"


def _us(v) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "-"


def offline_families(families: Sequence[str]) -> List[str]:
    """The families the background offline run models: the lab's, and their variants."""
    from .offline.variants import VARIANTS, variant_name
    return list(families) + [variant_name(f, v) for f, v in VARIANTS if f in families]


def start_offline_model(args):
    """The offline model for the shapes ncu profiles (the families and their variants), started in
    the background (a CPU process compiling with this machine's Triton: the prediction to set beside
    ncu's measurements)."""
    from ..dispatch import TRITON_FAMILIES
    out = os.path.join(args.out, "offline")
    cmd = [sys.executable, "-m", "ghost_kernels.bench.offline", "--out", out, "--quiet",
           "--families", ",".join(offline_families([f.name for f in TRITON_FAMILIES])),
           "--shapes", ",".join(map(str, NCU_SHAPES)), "--dtypes", "bfloat16", "--layouts", "channels_last",
           "--batch", str(args.batch), "--import", VARIANTS_FILE]
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
        kernels += assign_kernels(fam.name, rows, _read_plan(args.out, fam.name))
    predicted = _offline_predictions(args, offline, deadline)
    call_rows = calls(kernels)
    for k in kernels:
        pred = predicted.get((k["family"], k.get("shape_index"), k.get("variant")))
        if pred:   # per call (all of the call's kernels): compare with the call's summed inst_executed
            k["offline_warp_instr_call"] = pred["warp_instr"]
    for c in call_rows:
        c["model"] = predicted.get((c["family"], c["shape_index"], c.get("variant")))
    lines = table(call_rows, predicted)
    print("\n".join(lines), flush=True)
    return {"status": "ok" if kernels else "no kernels profiled", "kernels": kernels, "calls": call_rows,
            "table": lines, "failures": failures, "metrics": METRICS, "raw_csv_tail": raw}


def _read_plan(out: str, family: str) -> List[dict]:
    try:
        with open(os.path.join(out, f"ncu_plan_{family}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def offline_terms(rows: List[dict]) -> Dict[tuple, dict]:
    """(family, shape index, variant or None) -> the model's terms for that call, from offline rows
    (a variant is modelled as the family ``family:variant``)."""
    from ..core.spec import distinct_ghostnet_100_specs
    from .offline.report import bound
    names = [s.name for s in distinct_ghostnet_100_specs()]
    out = {}
    for r in rows:
        if r.get("name") not in names or not r.get("warp_instr"):
            continue
        family, _, variant = r["family"].partition(":")
        out[(family, names.index(r["name"]), variant or None)] = dict(
            warp_instr=r["warp_instr"], issue_us=r.get("issue_us"), hbm_us=r.get("hbm_us"),
            latency_us=r.get("latency_us"), predicted_us=r.get("predicted_us"), bound=bound(r))
    return out


def _offline_predictions(args, offline, deadline: float) -> Dict[tuple, dict]:
    """The offline terms from the background run started by :func:`start_offline_model` (waited for
    until ``deadline``)."""
    if offline is None:
        return {}
    try:
        offline.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        offline.kill()
        return {}
    try:
        with open(os.path.join(args.out, "offline", "offline.json")) as f:
            rows = json.load(f)["rows"]
    except (OSError, KeyError, ValueError):
        return {}
    return offline_terms(rows)
