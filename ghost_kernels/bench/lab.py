"""``python -m ghost_kernels.bench.lab --out DIR``: the one-call GPU lab (``benchmarks/gpu_lab.sh``).

Phases, each writing its results under DIR as soon as it finishes (a timeout loses only the phase it
cut short); the whole run keeps to ``--budget-s`` seconds:

1. ``precompile``: every Triton variant the lab will launch (family x config x shape x dtype x
   layout) compiled in a process pool, so that timing never waits on the compiler
   (``precompile.json``: variants per family, compile seconds, failures).
2. ``references``: device-copy bandwidth at several sizes and at each shape's own bytes, an
   L2-resident copy, and empty-launch latency (``references.json``).
3. ``timing``: per shape (the 22 distinct GhostNet 1.0x shapes, batch 256; bf16 channels_last with
   every lab config of every family, then fp16 channels_last and a few NCHW shapes with the default
   configs), eager, eager_folded, torch_folded, the CUDA C++ kernel, ``auto`` (what convert() users
   get), every family, and torch.compile while its budget lasts; each checked against float64, then
   timed by CUDA-graph replay over inputs larger than L2 (``timing.json``, the schema of the bench's
   results with one ``impl`` per family and ``configs`` listing each config's time).
4. ``ncu``: Nsight Compute (``--clock-control none``) on a few shapes per family: time, DRAM and L2
   bytes, executed warp-instructions, issue activity, occupancy, registers, stall reasons, beside the
   offline model's prediction for the same launch (``ncu.json``).
5. ``model``: GhostNet 1.0x images/s at the lab's batch, timm + torch.compile against converted +
   torch.compile, and the copy kernels in a profile of the compiled converted model; then small
   batches (1, 8, 32), timm against converted, each eager, torch.compile and
   torch.compile(mode="reduce-overhead") (CUDA graphs), timed per call back to back and checked on a
   second input after the timed calls (``model.json``, written after every row; the rows a short
   budget skips say so, and ``--phases model`` runs them all in a call of their own).

6. ``train`` (not in the default list: ``--phases train``, a call of its own with the whole budget):
   per shape, one training step (forward + backward) of eager, torch.compile and the fused training
   ops with peak memory; GhostNet 1.0x training images/s under AMP, timm against converted, each
   eager and compiled (``train.json``; ``lab_train.py``).

``benchmarks/publish.py DIR`` files the results under benchmarks/results/ and writes the measured
choice table (``ghost_kernels/choice_table.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import Counter

PHASES = ("precompile", "references", "timing", "ncu", "model", "train")
DEFAULT_PHASES = PHASES[:5]   # train runs in a call of its own (--phases train): the others fill the budget
# The lab's plan, as fractions of --budget-s (each phase's limit is a point in time, so time a phase
# leaves unused goes to the next): precompile hands out no work after PRECOMPILE_END; timing starts no
# job once less than TIMING_RESERVE is left (ncu's share and the model phase's); ncu ends with
# MODEL_SHARE left, which the model phase has to itself (its rows in priority order, each compile only
# while the time left is expected to cover it: lab_model.Budget).
PRECOMPILE_END, TIMING_RESERVE, MODEL_SHARE = 0.25, 0.45, 0.33


def parse_args(argv=None):
    from .args import Parser, comma_list, positive_int, seconds
    from .lab_model import DEFAULT_MODELS
    from .models import MODELS

    p = Parser(prog="python -m ghost_kernels.bench.lab", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--budget-s", type=seconds, default=400.0, metavar="S",
                   help="seconds for the whole lab (phases shrink to fit)")
    p.add_argument("--phases", type=comma_list(PHASES), default=",".join(DEFAULT_PHASES), metavar="LIST",
                   help=f"comma list of {', '.join(PHASES)} (default: all but train, which runs in a call of its own)")
    p.add_argument("--batch", type=positive_int, default=256, metavar="N", help="batch of the timing and model phases")
    p.add_argument("--workers", type=positive_int, default=max(1, min(12, (os.cpu_count() or 2) - 2)), metavar="N",
                   help="precompile processes")
    p.add_argument("--quick", action="store_true", help="one shape per resolution, default configs only")
    p.add_argument("--compile-budget", type=seconds, default=90.0, metavar="S",
                   help="seconds of torch.compile in the timing phase (and in the train phase's per-shape rows)")
    p.add_argument("--cpu-check", action="store_true",
                   help="run every phase's plumbing on the CPU (Triton interpreter, small shapes; the model "
                        "phase on a 3-stage GhostNet, the eager model standing in for torch.compile): a test of "
                        "the lab itself, no numbers")
    p.add_argument("--models", type=comma_list(MODELS), default=",".join(DEFAULT_MODELS), metavar="LIST",
                   help=f"the model phase's models, in order (comma list of {', '.join(MODELS)}; a model whose "
                        "package is not installed is a row saying so)")
    p.add_argument("--ncu-child", default=None, help=argparse.SUPPRESS)   # FAMILY:SHAPE_INDEX:DTYPE (under ncu)
    return p.parse_args(argv)


def jobs(quick: bool, cpu_check: bool = False):
    """(shape, count, dtype, layout, all_configs) in priority order: what matters most runs first."""
    from .__main__ import select_shapes
    if cpu_check:   # two small shapes (one ghost1, one ghost2) for the interpreter, and one 3x3 stride 2
        import dataclasses
        small = [dataclasses.replace(s, h=6, w=5) for s, _ in select_shapes("blocks.0.0.ghost1,blocks.1.0.ghost2", False)]
        out = [(s, 1, "float32", lay, k == 0) for k, (s, lay) in
               enumerate((s, lay) for s in small for lay in ("channels_last", "nchw"))]
        return out + [(s, 1, "float32", "channels_last", False) for s, _ in select_shapes("8->8@6x5:k3s2:silu:dw5", False)]
    everything = select_shapes("quick" if quick else "all", quick)
    few = select_shapes("quick", True)
    out = [(s, c, "bfloat16", "channels_last", not quick) for s, c in everything]
    # yolov8n-ghost at 640 (bench/model_shapes.json where ultralytics is missing), default configs
    out += [(s, c, "bfloat16", "channels_last", False)
            for s, c in select_shapes("quick" if quick else "all", quick, model="yolov8n-ghost")]
    out += [(s, c, "float16", "channels_last", False) for s, c in everything]
    out += [(s, c, "bfloat16", "nchw", False) for s, c in few]
    return out


class Lab:
    def __init__(self, args):
        import torch
        self.args, self.t0 = args, time.perf_counter()
        gpu = not args.cpu_check
        self.device = torch.device("cuda" if gpu else "cpu")
        props = torch.cuda.get_device_properties(self.device) if gpu else None
        self.l2 = getattr(props, "L2_cache_size", 50 << 20) if gpu else 1 << 20
        # timing rotates inputs over 3 x L2 on a GPU; --cpu-check times two inputs (plumbing, no numbers)
        self.rotate_l2 = self.l2 if gpu else 0
        self.meta = {"device": torch.cuda.get_device_name(self.device) if gpu else "CPU (lab --cpu-check)",
                     "capability": list(torch.cuda.get_device_capability()) if gpu else None,
                     "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                     "triton": _triton_version(), "cuda": torch.version.cuda, "python": platform.python_version(),
                     "batch": args.batch, "quick": args.quick, "sms": props.multi_processor_count if gpu else None}
        os.makedirs(args.out, exist_ok=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def at(self, fraction: float) -> float:
        """The point in time (perf_counter) ``fraction`` of the way through the lab's budget."""
        return self.t0 + fraction * self.args.budget_s

    def write(self, name: str, data) -> None:
        with open(os.path.join(self.args.out, name), "w") as f:
            json.dump(data, f, indent=1, default=str)

    def say(self, msg: str) -> None:
        print(f"[lab +{time.perf_counter() - self.t0:5.0f}s] {msg}", flush=True)

    def jobs(self):
        return jobs(self.args.quick, self.args.cpu_check)

    # ---- phases ----------------------------------------------------------------------------------

    def precompile(self):
        if not self.args.cpu_check and "ncu" in self.args.phases:
            from .lab_ncu import start_offline_model
            self.offline = start_offline_model(self.args)   # CPU work, beside the GPU phases; joined by ncu
        from .lab_precompile import precompile
        res = precompile(self.jobs(), self.args.workers, self.device.type, deadline=self.at(PRECOMPILE_END))
        self.write("precompile.json", dict(self.meta, **res))
        self.say(f"precompile: {res['variants']} launches, {res['failures']} failures, {res['wall_s']:.0f} s")

    def references(self):
        from ..core.spec import distinct_ghostnet_100_specs
        from .harness import module_bytes
        from .lab_timing import references
        sizes = [module_bytes(s.spec, self.args.batch, s.h, s.w, 2) for s in distinct_ghostnet_100_specs()]
        self.refs = references(self.device, self.l2, sizes)
        self.write("references.json", dict(self.meta, **self.refs))
        self.say(f"references: copy peak {self.refs['copy_peak_GBps']:.0f} GB/s, "
                 f"empty launch {self.refs['empty_launch_graph_us']:.1f} us in a graph")

    def timing(self):
        from .lab_rows import time_shape
        rows, compile_left = [], self.args.compile_budget
        copy_peak = getattr(self, "refs", {}).get("copy_peak_GBps")
        for k, (shape, count, dt, lay, all_cfg) in enumerate(self.jobs()):
            if not self.args.cpu_check and self.left() < TIMING_RESERVE * self.args.budget_s:
                self.say(f"timing: stopped before job {k} ({shape.name} {dt} {lay}): lab budget")
                break
            t = time.perf_counter()
            new, compile_left = time_shape(shape, count, self.args.batch, dt, lay, all_cfg, self.device,
                                           self.rotate_l2, copy_peak, compile_left)
            rows += new
            self.write("timing.json", dict(self.meta, copy_GBps=copy_peak, rows=rows))
            best = min((r for r in new if r.get("median_ms")), key=lambda r: r["median_ms"], default=None)
            self.say(f"timing {k + 1}: {shape.name} {dt} {lay}: best {best and best['impl']} "
                     f"{best and best['median_ms']:.4f} ms ({time.perf_counter() - t:.0f} s)")
        self.rows = rows

    def ncu(self):
        if self.args.cpu_check:
            self.write("ncu.json", dict(self.meta, status="needs a GPU", kernels=[]))
            return
        from .lab_ncu import run_ncu
        res = run_ncu(self.args, self.meta, deadline=self.at(1 - MODEL_SHARE),
                      offline=getattr(self, "offline", None))
        self.write("ncu.json", dict(self.meta, **res))
        self.say(f"ncu: {len(res.get('kernels', []))} kernels profiled ({res.get('status')})")

    def model(self):
        from .lab_model import model_phase

        def progress(res):   # model.json after every row: a timeout loses only the row it cut short
            self.write("model.json", dict(self.meta, **res))
        res = model_phase(self.device, self.args.batch, deadline=self.at(1.0), cpu_check=self.args.cpu_check,
                          progress=progress, models=self.args.models)
        progress(res)
        self.say("model: " + "; ".join(("" if r.get("net", "ghostnet_100") == "ghostnet_100" else f"{r['net']} ")
                                       + f"{r['impl']}@{r['batch']} " + (f"{r['images_per_s']:.0f} img/s" if
                                       r.get("status") == "ok" else str(r.get("status"))) for r in res["rows"]))


    def train(self):
        from .lab_train import train_phase
        if not hasattr(self, "refs"):   # a call of its own: the copy bandwidth of this run, measured here
            self.references()
        copy_peak = self.refs.get("copy_peak_GBps")

        def progress(res):   # train.json after every row
            self.write("train.json", dict(self.meta, copy_GBps=copy_peak, **res))
        res = train_phase(self.device, self.args.batch, deadline=self.at(1.0), cpu_check=self.args.cpu_check,
                          quick=self.args.quick, copy_GBps=copy_peak if not self.args.cpu_check else None,
                          l2_bytes=self.l2, progress=progress, compile_s=self.args.compile_budget)
        progress(res)
        timed = [r for r in res["rows"] if r.get("section") == "model" and r.get("images_per_s")]
        self.say("train: " + (", ".join(f"{r['impl']} {r['images_per_s']:.0f} img/s" for r in timed) or "no model row timed")
                 + f"; {sum(r.get('section') == 'shape' and r.get('status') == 'ok' for r in res['rows'])} shape rows ok")


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def summary(out: str) -> str:
    """A short table from what the phases wrote (printed last: the reply carries the end)."""
    lines = []
    try:
        with open(os.path.join(out, "timing.json")) as f:
            data = json.load(f)
    except OSError:
        return "no timing.json"
    wins = Counter()
    for (name, dt, lay), group in _groups(data["rows"]).items():
        ok = {r["impl"]: r["median_ms"] for r in group if r.get("median_ms")}
        if not ok:
            continue
        best = min(ok, key=ok.get)
        wins[best] += 1
        base = ok.get("eager_folded")
        lines.append(f"{name:<20} {dt:<8} {lay:<13} best {best:<16} {ok[best]:.4f} ms"
                     + (f"  x{base / ok[best]:.2f} vs eager_folded" if base else ""))
    lines.append("wins: " + ", ".join(f"{k} {v}" for k, v in wins.most_common()))
    return "\n".join(lines)


def _groups(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["name"], r["dtype"], r["layout"]), []).append(r)
    return groups


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ncu_child:
        from .lab_ncu import ncu_child
        return ncu_child(args)
    import torch
    if not torch.cuda.is_available() and not args.cpu_check:
        print("the GPU lab needs a CUDA GPU (on the CPU: python -m ghost_kernels.bench --offline, or "
              "--cpu-check to test the lab's own plumbing)")
        return 2
    lab = Lab(args)
    status = {}
    for phase in args.phases:
        if lab.left() <= 0:
            status[phase] = "skipped: lab budget spent"
            continue
        try:
            getattr(lab, phase)()
            status[phase] = "ok"
        except Exception as exc:  # one failing phase must not cost the others
            import traceback
            traceback.print_exc()
            status[phase] = f"error: {type(exc).__name__}: {exc}"[:400]
        lab.write("phases.json", dict(lab.meta, phases=status, wall_s=round(time.perf_counter() - lab.t0, 1)))
    print(summary(args.out))
    print("phases: " + ", ".join(f"{k}={v}" for k, v in status.items()))
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
