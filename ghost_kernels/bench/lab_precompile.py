"""The lab's precompile phase: every Triton variant the timing phase will launch, compiled in a process
pool before anything is timed.

Each worker process runs every (family, config) launcher once per job on a 2-image batch of the
job's shape, dtype and layout: the launch compiles exactly the variant the batch-256 launch will use
(the per-image strides, the sizes and the configs are the same; the batch is a runtime argument) and
leaves it in Triton's on-disk cache, which the timing process then loads.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from typing import List, Tuple


def _jobs_for_worker(jobs, device: str) -> List[Tuple]:
    """Picklable job descriptions: (shape, dtype, layout, all_configs, device)."""
    return [(shape, dt, lay, all_cfg, device) for shape, _, dt, lay, all_cfg in jobs]


def _compile_job(job) -> List[dict]:
    import torch

    from ..dispatch import BY_NAME
    from .lab_timing import ShapeBench
    shape, dt, lay, all_cfg, device = job
    bench = ShapeBench(shape, 2, dt, lay, torch.device(device), l2_bytes=0)
    out = []
    for family, cfg in bench.family_configs(all_cfg):
        t0 = time.perf_counter()
        try:
            BY_NAME[family].launcher(bench.inputs[0], bench.params, bench.dtype, config=cfg)
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(dict(family=family, shape=shape.name, dtype=dt, layout=lay, s=time.perf_counter() - t0))
        except Exception as exc:
            out.append(dict(family=family, shape=shape.name, dtype=dt, layout=lay, s=time.perf_counter() - t0,
                            error=f"{type(exc).__name__}: {exc}"[:300]))
    return out


def precompile(jobs, workers: int, device: str, deadline: float) -> dict:
    """Compile every variant of ``jobs`` with ``workers`` processes; stop handing out work at ``deadline``."""
    t0 = time.perf_counter()
    todo = _jobs_for_worker(jobs, device)
    results: List[dict] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pending = [pool.apply_async(_compile_job, (j,)) for j in todo]
        for p in pending:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                results += p.get(timeout=left)
            except mp.TimeoutError:
                break
        pool.terminate()
    per_family = Counter(r["family"] for r in results)
    failures = [r for r in results if "error" in r]
    return dict(variants=len(results), failures=len(failures), failed=failures[:50], per_family=dict(per_family),
                jobs=len(todo), jobs_done=len({(r["shape"], r["dtype"], r["layout"]) for r in results}),
                compile_s=round(sum(r["s"] for r in results), 1), wall_s=time.perf_counter() - t0)
