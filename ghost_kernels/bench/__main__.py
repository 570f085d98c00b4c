"""``python -m ghost_kernels.bench``: Ghost-module microbenchmarks and the GhostNet model benchmark.

On a CUDA GPU: every Ghost module shape of GhostNet 1.0x at 224² (batch 256 by default), each
implementation checked against the float64 reference and then timed; the device-copy bandwidth is
measured in the same run; a table on stdout, plus JSON, markdown and PNG plots in ``--out``.
Without a GPU it times the PyTorch paths on the CPU (timm's eager module, BN folded ahead of time,
and the package's GhostModule through backend="auto" and "torch_folded"; no bandwidth columns: they
describe a GPU kernel), checks every Triton kernel family under the interpreter on one small shape,
and says that GPU numbers need a GPU (well under a minute). ``--offline``: the offline sm_90 model.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from typing import Optional

# Options that only one of the two modes reads: given to the other, they are an error, not ignored.
TIMING_ONLY = ("--ops", "--impls", "--secondary-shapes", "--quick", "--overhead", "--compile-budget",
               "--max-autotune-budget", "--model-compile-budget", "--no-model", "--model-batch", "--no-plots", "--junit")
OFFLINE_ONLY = ("--families", "--workers", "--import", "--strict", "--quiet", "--train")


def build_parser():
    from .args import Parser, add_cases, comma_list, positive_int, seconds, shapes
    from .harness import IMPLS, OPS
    from .offline.cli import add_arguments

    p = Parser(prog="python -m ghost_kernels.bench",
               description="Ghost-module microbenchmarks and the GhostNet model benchmark (a GPU's numbers; on the "
                           "CPU, the PyTorch paths and every Triton kernel family under the interpreter), or with "
                           "--offline the offline sm_90 performance model of the Triton kernel families.")
    cases = p.add_argument_group("what runs (timing and --offline)")
    add_cases(cases, None, "batch size (default: 256 on a GPU, 2 on the CPU; --offline: 256)")
    timing = p.add_argument_group("timing options")
    timing.add_argument("--ops", type=comma_list(tuple(OPS)), default="forward,train", metavar="LIST",
                        help="comma list of ops: forward (eval, no grad), train (forward + backward, train-mode BN)")
    timing.add_argument("--impls", type=comma_list(IMPLS), default=None, metavar="LIST",
                        help=f"comma list of {', '.join(IMPLS)} (default: on a GPU every one that can run here; "
                             "on the CPU eager, eager_folded, auto, torch_folded)")
    timing.add_argument("--secondary-shapes", type=shapes, default="all", metavar="all|quick|LIST",
                        help="shapes for the dtype/layout pairs after the first one ('quick' keeps a full "
                             "dtype x layout matrix affordable); torch.compile rows run for the first pair only")
    timing.add_argument("--quick", action="store_true", help="quick shapes, shorter timing, no max-autotune")
    timing.add_argument("--overhead", action="store_true",
                        help="no kernel runs: the package's Python per eager Ghost-module call, kernel launches "
                             "stubbed, beside one nn.Conv2d call in the same loop (CPU; bench/overhead.py)")
    timing.add_argument("--compile-budget", type=seconds, metavar="S", default=240.0,
                        help="seconds of torch.compile time for the compile rows (the rest are skipped)")
    timing.add_argument("--max-autotune-budget", type=seconds, metavar="S", default=60.0,
                        help="seconds of torch.compile(mode='max-autotune') time (0 disables)")
    timing.add_argument("--model-compile-budget", type=seconds, metavar="S", default=150.0,
                        help="seconds of torch.compile time for the model-level compile rows")
    timing.add_argument("--no-model", action="store_true", help="skip the model-level benchmark")
    timing.add_argument("--model-batch", type=positive_int, metavar="N", default=None,
                        help="model-level batch (default: --batch)")
    offline = p.add_argument_group("offline model options")
    offline.add_argument("--offline", action="store_true",
                         help="no timing: the offline sm_90 performance model of every Triton kernel family "
                              "(registers, spills, vector widths, modelled warp-instructions per HBM byte; no GPU "
                              "needed) -> offline.json, offline.md")
    output = p.add_argument_group("output")
    output.add_argument("--out", default="bench-out", metavar="DIR",
                        help="output folder (--offline: offline.json, offline.md)")
    output.add_argument("--no-plots", action="store_true", help="no PNG plots")
    output.add_argument("--junit", default=None, metavar="XML", help="pytest junit XML whose counts go into the JSON")
    add_arguments(p, {"cases": cases, "offline": offline, "output": output})
    return p


def parse_args(argv=None):
    """Parsed and checked arguments; a bad one exits with code 2 and a one-line message."""
    from .args import check_shapes, given
    from .offline.cli import check_families

    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    args = p.parse_args(argv)
    opts = given(argv)
    wrong = [o for o in (TIMING_ONLY if args.offline else OFFLINE_ONLY) if o in opts]
    if wrong:
        p.error(f"argument {wrong[0]}: --offline does not read it (it times nothing)" if args.offline else
                f"argument {wrong[0]}: only --offline reads it")
    check_shapes(p, args)
    if args.offline:
        check_families(p, args)
    return args


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def select_shapes(which: str, quick: bool, model: Optional[str] = None):
    """[(module, count)]: the distinct shapes ``which`` names (``models.shape_cases``: ``all``, ``quick``,
    or a comma list of module names, indices and explicit shapes; ValueError), of GhostNet 1.0x or
    ``model``, each with how many of the network's modules have it."""
    from .models import shape_cases
    return shape_cases(which, model, quick)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.offline:
        from .offline.cli import run_reporting
        return run_reporting(args, "python -m ghost_kernels.bench --offline")
    if args.overhead:
        from .overhead import main as overhead_main
        return overhead_main([])
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # The interpreter must be chosen before the kernels are defined, i.e. before import.
        os.environ["TRITON_INTERPRET"] = "1"
        return subprocess.call([sys.executable, "-m", "ghost_kernels.bench"] + (sys.argv[1:] if argv is None else argv))

    from .. import available_backends
    from ..triton.common import triton
    from . import report
    from .harness import (
        BACKEND_IMPLS,
        CPU_IMPLS,
        DTYPES,
        IMPLS,
        LAYOUTS,
        OPS,
        Calibration,
        bench_shape,
        copy_bandwidth,
    )

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    batch = args.batch or (256 if gpu else 2)
    os.makedirs(args.out, exist_ok=True)
    dtypes, layouts, ops = args.dtypes, args.layouts, args.ops
    runnable = [b for b, why in available_backends().items() if b != "torch" and why is None]
    if gpu:
        impls = args.impls or [i for i in IMPLS if i not in BACKEND_IMPLS or i == "auto" or i in runnable]
    else:
        print("No CUDA GPU here: timing the PyTorch paths on the CPU (timm's eager module, BN folded ahead of "
              "time, and the package's GhostModule through backend='auto' and 'torch_folded') and checking every "
              "Triton kernel family under the interpreter. GPU numbers need a CUDA GPU (see "
              "benchmarks/gpu_suite.sh).", flush=True)
        impls = args.impls or list(CPU_IMPLS)
    if args.quick or not gpu:
        args.max_autotune_budget = 0.0
    budget = {"compile": args.compile_budget, "compile_max_autotune": args.max_autotune_budget,
              "model_compile": args.model_compile_budget}
    shapes = select_shapes("quick" if not gpu and args.shapes == "all" else args.shapes, args.quick, args.model)

    t_start = time.perf_counter()
    calibration = Calibration(device)
    copy_GBps = copy_bandwidth(device) if gpu else None   # bandwidth is a GPU kernel's measure (report.NO_BANDWIDTH)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) if gpu else 32 << 20
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"{dev_name}: " + (f"device copy {copy_GBps:.0f} GB/s; " if gpu else "") +
          f"{len(shapes)} shapes x {len(dtypes)} dtypes x {len(layouts)} layouts x {len(impls)} impls, batch {batch}",
          flush=True)

    rows = []
    secondary = {(m.name) for m, _ in select_shapes(args.secondary_shapes, args.quick, args.model)}
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
