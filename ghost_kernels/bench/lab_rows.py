"""One shape of the GPU lab's timing phase: every implementation checked, timed and turned into rows
with the bench's result schema (``impl`` per family: its fastest config; ``configs``: all of them)."""
from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch

from ..core.spec import ModuleShape
from .lab_timing import ShapeBench, config_dict, time_impl


def _row(bench: ShapeBench, shape: ModuleShape, count: int, impl: str) -> dict:
    spec = shape.spec
    return dict(op="forward", impl=impl, name=shape.name, inp=spec.inp, oup=spec.oup, kernel_size=spec.kernel_size,
                ratio=spec.ratio, dw_size=spec.dw_size, stride=spec.stride, act=spec.act, h=shape.h, w=shape.w, batch=bench.batch,
                dtype=bench.dtype_name, layout=bench.layout_name, count=count, bytes=bench.bytes,
                median_ms=None, p20_ms=None, p80_ms=None, GBps=None, copy_fraction=None, rel_err=None,
                status="ok", note="")


def _finish(row: dict, copy_GBps: Optional[float]) -> dict:
    if row.get("median_ms"):
        row["GBps"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
        row["copy_fraction"] = row["GBps"] / copy_GBps if copy_GBps else None
    return row


def time_shape(shape: ModuleShape, count: int, batch: int, dtype_name: str, layout_name: str, all_configs: bool,
               device, l2_bytes: int, copy_GBps: Optional[float], compile_left: float) -> Tuple[List[dict], float]:
    """Rows for one (shape, dtype, layout); returns them and the compile budget left."""
    bench = ShapeBench(shape, batch, dtype_name, layout_name, device, l2_bytes)
    reps = (10 if shape.h >= 56 else 20) if device.type == "cuda" else 2   # the CPU: --cpu-check's plumbing
    rows = []
    for impl, make in bench.impls(compile_ok=compile_left > 0 and layout_name == "channels_last"
                                  and dtype_name == "bfloat16").items():
        row = _row(bench, shape, count, impl)
        t0 = time.perf_counter()
        try:
            row.update(time_impl(bench, make(), reps))
        except Exception as exc:   # reported, not fatal: one broken implementation must not end the lab
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        if impl == "compile":
            compile_left -= time.perf_counter() - t0
        rows.append(_finish(row, copy_GBps))
    by_family = {}
    for family, cfg in bench.family_configs(all_configs):
        try:
            res = time_impl(bench, bench.family_callable(family, cfg), reps)
        except Exception as exc:
            res = dict(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        by_family.setdefault(family, []).append(dict(res, config=config_dict(cfg)))
    for family, results in by_family.items():
        timed = [r for r in results if r.get("median_ms")]
        best = min(timed, key=lambda r: r["median_ms"]) if timed else results[0]
        row = _row(bench, shape, count, family)
        row.update({k: v for k, v in best.items() if k != "config"})
        row["config"] = best.get("config")
        row["configs"] = [{"config": r.get("config"), "median_ms": r.get("median_ms"), "status": r.get("status"),
                           "note": r.get("note", "")} for r in results]
        rows.append(_finish(row, copy_GBps))
    del bench
    torch.cuda.empty_cache()
    return rows, compile_left
