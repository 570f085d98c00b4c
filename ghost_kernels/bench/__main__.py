"""``python -m ghost_kernels.bench``: Ghost-module microbenchmarks and the GhostNet model benchmark.

On a CUDA GPU: every Ghost module shape of GhostNet 1.0x at 224² (batch 256 by default), each
implementation checked against the float64 reference and then timed; the device-copy bandwidth is
measured in the same run; a table on stdout, plus JSON, markdown and PNG plots in ``--out``.
Without a GPU it times the PyTorch reference path on the CPU, checks the Triton kernel under the
interpreter on one small shape, and says that GPU numbers need a GPU (well under a minute).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ghost_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 256 on a GPU, 2 on the CPU)")
    p.add_argument("--shapes", default="all",
                   help="'all' (every distinct module shape), 'quick' (one per resolution), or a comma list "
                        "of module names (blocks.1.0.ghost1) or indices into the distinct shapes")
    p.add_argument("--dtype", default="bfloat16", help="comma list of bfloat16,float16,float32")
    p.add_argument("--layout", default="channels_last", help="comma list of channels_last,nchw")
    p.add_argument("--impls", default=None, help="comma list (default: all that apply)")
    p.add_argument("--secondary-shapes", default="all",
                   help="shapes for the dtype/layout pairs after the first one ('quick' keeps a full "
                        "dtype x layout matrix affordable); torch.compile rows run for the first pair only")
    p.add_argument("--ops", default="forward,train",
                   help="comma list of ops: forward (eval, no grad), train (forward + backward, train-mode BN)")
    p.add_argument("--quick", action="store_true", help="quick shapes, shorter timing, no max-autotune")
    p.add_argument("--compile-budget", type=float, default=240.0,
                   help="seconds of torch.compile time for the compile rows (the rest are skipped)")
    p.add_argument("--max-autotune-budget", type=float, default=60.0,
                   help="seconds of torch.compile(mode='max-autotune') time (0 disables)")
    p.add_argument("--model-compile-budget", type=float, default=150.0,
                   help="seconds of torch.compile time for the model-level compile rows")
    p.add_argument("--no-model", action="store_true", help="skip the model-level benchmark")
    p.add_argument("--model-batch", type=int, default=None, help="model-level batch (default: --batch)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--junit", default=None, help="pytest junit XML whose counts go into the JSON")
    p.add_argument("--out", default="bench-out", help="output folder")
    p.add_argument("--offline", action="store_true",
                   help="no timing: the offline sm_90 performance model of every Triton kernel family (registers, "
                        "spills, vector widths, modelled warp-instructions per HBM byte; no GPU needed) -> "
                        "offline.json, offline.md")
    from .offline import add_arguments
    add_arguments(p)
    return p.parse_args(argv)


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def select_shapes(which: str, quick: bool):
    from collections import Counter

    from ..core.spec import distinct_ghostnet_100_specs, ghostnet_100_modules

    modules = ghostnet_100_modules()
    counts = Counter((m.spec, m.h, m.w) for m in modules)
    distinct = distinct_ghostnet_100_specs()
    if which == "quick" or (quick and which == "all"):
        per_res, picked = set(), []
        for m in distinct:
            if m.h not in per_res:
                per_res.add(m.h)
                picked.append(m)
        distinct = picked
    elif which != "all":
        picked = []
        for tok in which.split(","):
            tok = tok.strip()
            if tok.isdigit():
                picked.append(distinct[int(tok)])
            else:
                match = [m for m in modules if m.name == tok]
                if not match:
                    raise SystemExit(f"--shapes: unknown module {tok!r} (names look like blocks.1.0.ghost1)")
                picked.append(match[0])
        distinct = picked
    return [(m, counts[(m.spec, m.h, m.w)]) for m in distinct]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.offline:
        from .offline import run
        return run(args)
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # The interpreter must be chosen before the kernels are defined, i.e. before import.
        os.environ["TRITON_INTERPRET"] = "1"
        return subprocess.call([sys.executable, "-m", "ghost_kernels.bench"] + (sys.argv[1:] if argv is None else argv))

    from .. import available_backends
    from ..triton.common import triton
    from . import report
    from .harness import BACKEND_IMPLS, DTYPES, IMPLS, LAYOUTS, OPS, Calibration, bench_shape, copy_bandwidth

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    batch = args.batch or (256 if gpu else 2)
    os.makedirs(args.out, exist_ok=True)
    dtypes = [d.strip() for d in args.dtype.split(",")]
    layouts = [lay.strip() for lay in args.layout.split(",")]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: expected some of {list(DTYPES)}, got {d!r}")
    for lay in layouts:
        if lay not in LAYOUTS:
            raise SystemExit(f"--layout: expected some of {list(LAYOUTS)}, got {lay!r}")
    ops = [o.strip() for o in args.ops.split(",")]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"--ops: expected some of {list(OPS)}, got {o!r}")
    runnable = [b for b, why in available_backends().items() if b != "torch" and why is None]
    if gpu:
        impls = [i.strip() for i in args.impls.split(",")] if args.impls else \
            [i for i in IMPLS if i not in BACKEND_IMPLS or i == "auto" or i in runnable]
        for i in impls:
            if i not in IMPLS:
                raise SystemExit(f"--impls: expected some of {list(IMPLS)}, got {i!r}")
    else:
        print("No CUDA GPU here: timing the PyTorch reference path on the CPU and checking the Triton kernel "
              "under the interpreter. GPU numbers need a CUDA GPU (see benchmarks/gpu_suite.sh).", flush=True)
        impls = [i.strip() for i in args.impls.split(",")] if args.impls else ["eager", "eager_folded"]
    if args.quick or not gpu:
        args.max_autotune_budget = 0.0
    budget = {"compile": args.compile_budget, "compile_max_autotune": args.max_autotune_budget,
              "model_compile": args.model_compile_budget}
    shapes = select_shapes("quick" if not gpu and args.shapes == "all" else args.shapes, args.quick)

    t_start = time.perf_counter()
    calibration = Calibration(device)
    copy_GBps = copy_bandwidth(device)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) if gpu else 32 << 20
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"{dev_name}: device copy {copy_GBps:.0f} GB/s; {len(shapes)} shapes x {len(dtypes)} dtypes x "
          f"{len(layouts)} layouts x {len(impls)} impls, batch {batch}", flush=True)

    rows = []
    secondary = {(m.name) for m, _ in select_shapes(args.secondary_shapes, args.quick)}
    jobs = []
    for op in ops:
        for d in dtypes:
            for lay in layouts:
                primary = (d, lay) == (dtypes[0], layouts[0])
                for shape, count in shapes:
                    if primary or shape.name in secondary:
                        jobs.append((op, shape, count, d, lay, impls if primary else
                                     [i for i in impls if not i.startswith("compile")]))
    for k, (op, shape, count, d, lay, job_impls) in enumerate(jobs, 1):
        print(f"\r[{k}/{len(jobs)}] {op} {shape.name} {shape.spec.inp}->{shape.spec.oup} @{shape.h} {d} {lay}"
              + " " * 10, end="", file=sys.stderr, flush=True)
        new = bench_shape(shape, count, batch, d, lay, job_impls, device, copy_GBps, l2, budget,
                          rep_ms=50 if args.quick or not gpu else 100, op=OPS[op])
        calibration.mark(new)
        rows += new
    print(file=sys.stderr)

    model_rows, model_note = [], None
    if args.no_model:
        model_note = "model level: not run (--no-model)"
    elif not gpu:
        model_note = "model level (GhostNet 1.0x images/s): needs a CUDA GPU, not run on the CPU"
    else:
        from .model import bench_model

        progress = lambda s: print(f"\r{s}" + " " * 20, end="", file=sys.stderr, flush=True)  # noqa: E731
        model_backends = [b for b in ("auto", "triton") if b == "auto" or b in runnable]
        for op in ops:  # inference, then training images/s
            model_rows += bench_model(device, args.model_batch or batch, DTYPES[dtypes[0]], LAYOUTS[layouts[0]],
                                      model_backends, budget, progress=progress, train=op == "train")
        print(file=sys.stderr)

    interp_check = None
    if not gpu:
        interp_check = interpreter_check()

    sums = report.network_sum(rows, copy_GBps)
    text = report.table(rows, sums, copy_GBps, dev_name)
    meta = {
        "device": dev_name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None), "cuda": torch.version.cuda,
        "driver": _driver() if gpu else None, "python": platform.python_version(),
        "copy_GBps": copy_GBps, "batch": batch, "quick": args.quick,
        "tests": report.parse_junit(args.junit), "interpreter_check": interp_check,
        "wall_s": None, "model_note": model_note, "busy": calibration.summary(),
        "not_timed": {op: OPS[op].unsupported for op in ops if OPS[op].unsupported},
    }
    data = report.to_json(meta, rows, sums, model_rows)
    data["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.write_json(os.path.join(args.out, "bench.json"), data)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(report.markdown(data))
    written = [] if args.no_plots else report.plots(data, args.out)
    print(text)
    for op, why in meta["not_timed"].items():
        print(f"not timed for {op}, by design: " + "; ".join(f"{i} ({w})" for i, w in why.items() if i in impls))
    if model_rows:
        print(report.model_table(model_rows))
    if model_note:
        print(model_note)
    if meta["busy"]:
        print(f"WARNING: {meta['busy']}")
    if interp_check:
        print(f"Triton kernel under the interpreter: {interp_check}")
        print("GPU numbers need a CUDA GPU: run benchmarks/gpu_suite.sh OUTDIR on one.")
    print(f"wrote {args.out}/bench.json, bench.md" + ("".join(", " + os.path.basename(w) for w in written)))
    bad = [r for r in rows if r.status in ("wrong", "error")] + \
        [m for m in model_rows if m.get("status") in ("wrong", "error")]
    if interp_check and not interp_check.startswith("ok"):
        bad.append(interp_check)
    return 1 if bad else 0


def interpreter_check() -> str:
    """Run every Triton kernel family once under the interpreter against the float64 reference."""
    import torch

    from ..core.params import BatchNormState, GhostParams
    from ..core.reference import ghost_reference
    from ..core.spec import GhostSpec
    from ..dispatch import TRITON_FAMILIES
    from ..testing import rel_err

    spec = GhostSpec(16, 24, dw_size=3)
    g = torch.Generator().manual_seed(0)
    w1, wd = torch.randn(spec.m, 16, 1, 1, generator=g) / 4, torch.randn(spec.new, 1, 3, 3, generator=g) / 3

    def bn(c):
        return BatchNormState(torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), torch.randn(c, generator=g),
                              torch.rand(c, generator=g) + 0.5, None, 0.1, 1e-5, True)

    params = GhostParams(w1, bn(spec.m), wd, bn(spec.new), spec)
    x = torch.randn(2, 16, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
    d = lambda s: s._replace(**{k: getattr(s, k).double() for k in ("weight", "bias", "running_mean", "running_var")})  # noqa: E731,E501
    ref = ghost_reference(x.double(), GhostParams(w1.double(), d(params.bn1), wd.double(), d(params.bn2), spec))
    results, worst = [], 0.0
    t0 = time.perf_counter()
    for fam in TRITON_FAMILIES:
        err = rel_err(fam.launcher(x, params, torch.float32), ref)
        worst = max(worst, err)
        results.append(f"{fam.name} {err:.1e}")
    status = "ok" if worst < 1e-5 else "WRONG"
    return (f"{status}: 2x16x12x12 -> 24 channels, rel err vs float64: {', '.join(results)} "
            f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
