"""The lab's model phase: GhostNet 1.0x (timm ``ghostnet_100``, random weights, bf16 under autocast,
channels_last), timm against the converted model (``convert(backend=...)``); then the other models
users run (``--models``: Ultralytics ``yolov8n-ghost`` at 640x640, timm ``ghostnetv2_100`` and the
re-parameterized ``ghostnetv3_100`` at 224x224), each its own package's model against the converted
one. Every row names its model (``net``); a model whose package is not installed is one row saying so.

Rows, in priority order (the phase keeps to its deadline: a row that needs a torch.compile starts only
while the time left is expected to cover it, :class:`Budget`; the rows it cannot fit are reported as
skipped, and ``--phases model`` runs them all in a call of its own):

1. the lab's batch (256): timm and converted eager, timm + torch.compile against converted +
   torch.compile, images/s by CUDA-graph replay of one call (kernel time); the copy kernels in a
   profile of the compiled converted model (a channels_last model must not pay copies around the
   fused ops);
2. small batches (:data:`SMALL_BATCHES`), where launches and Python, not memory, bound the time:
   timm and converted, each eager, torch.compile and torch.compile(mode="reduce-overhead") (CUDA
   graphs), per call timed back to back with the host clock (what a serving loop sees: launch gaps
   count). Each compiled model is made with ``dynamic=True``: batches 8 and 32 share one graph, batch
   1 gets its own (0/1 specialization). Every row is checked against float32 eager on its input, then
   again on a new input after the timed calls (a CUDA graph replaying stale inputs, or a kernel on the
   wrong stream, pytorch#157363, shows there);
3. converted with ``backend="triton"`` (every Ghost module on a fused family) + torch.compile;
4. each other model: section 2's rows at its own image size (batches 1, 8, 32: where detection runs),
   its package's model (``ultralytics_*``, ``timm_*``) against the converted one.

``--cpu-check`` runs the rows' plumbing on the CPU, where GhostNet is too slow for CI (Dynamo traces
it in about a minute, the Triton interpreter runs its 32 Ghost modules in minutes): a three-stage
GhostNet of timm's class (:data:`CPU_CHECK_CFGS`), a 32x32 input in float32 (the other models at
:data:`CPU_CHECK_IMAGE`), batches
:data:`CPU_CHECK_BATCHES`, the eager model standing in for torch.compile (the compiled converted
model is tested in tests/test_compile.py, dynamic shapes too), no ``convert_triton`` row, no
profile, no budget: no numbers.
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Callable, List, Optional, Sequence

import torch

from ..convert import convert
from .harness import randomize_
from .lab_timing import graph_time
from .models import MODELS, ModelUnavailable, build_model

COPY_KERNEL_HINTS = ("copy", "clone", "contiguous", "transpose", "permute")
SMALL_BATCHES = (1, 8, 32)
CPU_CHECK_BATCHES = (1, 2, 3)
CPU_CHECK_CFGS = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[5, 72, 40, 0.25, 2]]]   # timm GhostNet stages
CPU_CHECK_IMAGE = 64   # the other models under --cpu-check (YOLO: a multiple of 32)
DEFAULT_MODELS = ("ghostnet_100", "yolov8n-ghost", "ghostnetv2_100", "ghostnetv3_100")   # the lab's order
MODES = ("eager", "reduce-overhead", "compile")   # the small batches' order: CUDA graphs matter most there
# What one torch.compile of GhostNet costs before the phase has measured one (the 2026-11-28 H200 run:
# 19-23 s per compile of timm's or the converted model, first call included), and what timing a row
# costs besides.
FIRST_COMPILE_S, ROW_S = 25.0, 6.0
ERR_GATE = 0.1   # logits, bf16 autocast against float32


class Budget:
    """The phase's deadline and what a compile is expected to cost (the slowest seen so far)."""

    def __init__(self, deadline: Optional[float], compile_s: float = FIRST_COMPILE_S,
                 clock: Callable[[], float] = time.perf_counter):
        self.deadline, self.compile_s, self.clock = deadline, compile_s, clock

    def refuses(self, compiles: int) -> Optional[str]:
        """None if ``compiles`` compiles and a row's timing fit in the time left, else why not."""
        if self.deadline is None:
            return None
        need, left = compiles * self.compile_s + ROW_S, self.deadline - self.clock()
        if left >= need:
            return None
        return (f"skipped: lab budget ({left:.0f} s left, the row needs about {need:.0f} s; "
                f"--phases model runs every row)")

    def compiled(self, seconds: float) -> None:
        self.compile_s = max(self.compile_s, seconds)


def _profile_copies(fn, x) -> dict:
    """Kernels of one call whose names say they copy or relayout memory, counted by name."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    copies = {n: c for n, c in names.items() if any(h in n.lower() for h in COPY_KERNEL_HINTS)}
    return dict(kernels=sum(names.values()), copy_kernels=sum(copies.values()), copies=copies)


def loop_time(run: Callable, x, device, target_s: float = 0.05, repeats: int = 5, min_calls: int = 3):
    """(median, p20, p80) ms per call of ``run(x)``, calls back to back, timed with the host clock
    around ``n`` calls and one synchronization (launch gaps and Python count, as in a serving loop)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    run(x)
    sync()
    n = max(min_calls, min(1000, int(target_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            run(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / n)
    times.sort()
    return times[len(times) // 2], times[int(0.2 * len(times))], times[min(len(times) - 1, int(0.8 * len(times)))]


def _logits(out):
    """A model's main output: a detection model returns (predictions, feature maps) in eval mode."""
    return out[0] if isinstance(out, (tuple, list)) else out


class ModelBench:
    """The model, its inputs and references, and how rows are made, on one device. ``net``: a name of
    :data:`bench.models.MODELS` (raises ModelUnavailable when its package is not installed)."""

    def __init__(self, device, cpu_check: bool, net: str = "ghostnet_100"):
        self.device, self.cpu_check, self.net = device, cpu_check, net
        self.base_impl, image = MODELS[net]    # the package whose model the converted one is timed against
        self.dtype = "float32" if cpu_check else "bfloat16"
        self.small_batches = CPU_CHECK_BATCHES if cpu_check else SMALL_BATCHES
        self.timing = dict(repeats=1, min_calls=1, target_s=0.0) if cpu_check else {}
        if net == "ghostnet_100":
            import timm
            from timm.models.ghostnet import GhostNet
            self.image = 32 if cpu_check else image
            base = GhostNet(CPU_CHECK_CFGS, num_classes=10) if cpu_check else timm.create_model(net)
            self.name = "a 3-stage GhostNet (cpu-check)" if cpu_check else net
        else:
            self.image = CPU_CHECK_IMAGE if cpu_check else image
            base = build_model(net)
            self.name = net
        self.base = randomize_(base).eval().to(device, memory_format=torch.channels_last)

    def inputs(self, batch: int, seed: int):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(batch, 3, self.image, self.image, generator=g).to(self.device).contiguous(
            memory_format=torch.channels_last)

    def reference(self, x):
        with torch.no_grad():
            return _logits(self.base(x[:8])).double()

    def model(self, impl: str, mode: str, dynamic: Optional[bool]):
        """A fresh copy of the package's model or of the converted one (``impl``: timm / ultralytics,
        convert_auto, convert_triton), compiled for ``mode`` (eager: not compiled) with ``dynamic``."""
        model = copy.deepcopy(self.base)
        if impl.startswith("convert"):
            convert(model, backend=impl.split("_")[1])
        if mode == "eager":
            return model
        if self.cpu_check:      # the plumbing only (module docstring)
            return model
        torch._dynamo.reset()   # fresh caches: no recompile limit, no stale guards across models
        return torch.compile(model, mode=None if mode == "compile" else mode, dynamic=dynamic)

    def runner(self, model, mode: str):
        graphs = mode == "reduce-overhead" and not self.cpu_check

        def run(inp):
            if graphs:   # one step per call: the previous call's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            # no autocast cast cache: CUDA graph capture (graph_time, reduce-overhead) wants it off, and
            # each weight is cast once per forward anyway
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=not self.cpu_check,
                                                 cache_enabled=False):
                return model(inp)
        return run

    def row(self, impl: str, mode: str, batch: int, section: str) -> dict:
        """A row; its ``impl``: timm_eager, timm_compile, timm_reduce_overhead (ultralytics_... for YOLO),
        convert_auto (eager), convert_auto_compile, ..., convert_triton_compile."""
        name = f"{impl}_{mode.replace('-', '_')}" if mode != "eager" else (f"{impl}_eager" if impl == self.base_impl
                                                                            else impl)
        row = dict(impl=name, net=self.net, model=impl, mode=mode, section=section, batch=batch, dtype=self.dtype,
                   precision="float32" if self.cpu_check else "amp", layout="channels_last", image_size=self.image)
        if self.cpu_check and mode != "eager":
            row["note"] = "cpu-check: the eager model stands in for torch.compile"
        return row


def _check(run, x, ref) -> float:
    out = _logits(run(x))
    return ((out[:8].double() - ref).norm() / ref.norm()).item()


def large_batch_rows(bench: ModelBench, batch: int, budget: Budget, rows: List[dict], emit) -> None:
    """Section 1 (and 3): the lab's batch, timed by CUDA-graph replay of one call."""
    x = bench.inputs(batch, 0)
    ref = bench.reference(x)
    for impl, mode in (("timm", "eager"), ("convert_auto", "eager"), ("timm", "compile"), ("convert_auto", "compile")):
        _one_large(bench, impl, mode, x, ref, budget, rows, emit)


def _one_large(bench, impl, mode, x, ref, budget, rows, emit) -> None:
    row = bench.row(impl, mode, x.shape[0], "batch")
    rows.append(row)
    why = budget.refuses(mode != "eager")
    if why:
        row["status"] = why
        return emit()
    try:
        t0 = time.perf_counter()
        run = bench.runner(bench.model(impl, mode, dynamic=None), mode)
        row["rel_err"] = err = _check(run, x, ref)
        row["setup_s"] = round(time.perf_counter() - t0, 1)
        if mode != "eager":
            budget.compiled(row["setup_s"])
        if not err < ERR_GATE:
            row.update(status="wrong", note=f"logits rel err {err:.2e}")
            return emit()
        med, p20, p80 = graph_time(run, [x], reps=10)
        row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, images_per_s=x.shape[0] / (med * 1e-3),
                   timing="CUDA-graph replay" if x.is_cuda else "host loop (CPU)")
        if impl.startswith("convert") and mode == "compile" and x.is_cuda:
            row.update(_profile_copies(run, x))
    except Exception as exc:
        row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
    emit()


def small_batch_rows(bench: ModelBench, budget: Budget, rows: List[dict], emit) -> None:
    """Section 2: per mode, timm and converted in pairs (a pair starts only if both fit), batches
    8 and 32 from one compile, then batch 1 from another."""
    for mode in MODES:
        for batches in ((1, 2), (0,)):   # indices into bench.small_batches: (8, 32) share a graph, then 1
            batches = tuple(bench.small_batches[k] for k in batches)
            pair_why = budget.refuses(2 * (mode != "eager"))
            for impl in ("convert_auto", bench.base_impl):
                _small_group(bench, impl, mode, batches, budget, pair_why, rows, emit)


def _small_group(bench, impl, mode, batches, budget, why, rows, emit) -> None:
    group = [bench.row(impl, mode, b, "small_batch") for b in batches]
    rows += group
    if why:
        for row in group:
            row["status"] = why
        return emit()
    try:
        t0 = time.perf_counter()
        run = bench.runner(bench.model(impl, mode, dynamic=True), mode)
    except Exception as exc:
        for row in group:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        return emit()
    for k, row in enumerate(group):
        b = row["batch"]
        x, x2 = bench.inputs(b, 1), bench.inputs(b, 2)
        try:
            t1 = time.perf_counter()
            row["rel_err"] = err = _check(run, x, bench.reference(x))
            row["setup_s"] = round(time.perf_counter() - (t0 if k == 0 else t1), 1)   # the first call compiles
            if mode != "eager" and k == 0:
                budget.compiled(row["setup_s"])
            if not err < ERR_GATE:
                row.update(status="wrong", note=f"logits rel err {err:.2e}")
                continue
            med, p20, p80 = loop_time(run, x, bench.device, **bench.timing)
            # a new input after the timed calls: stale graph inputs or a race would show here
            row["rel_err_new_input"] = err2 = _check(run, x2, bench.reference(x2))
            if not err2 < ERR_GATE:
                row.update(status="wrong", note=f"a new input after the timed calls: logits rel err {err2:.2e}")
                continue
            row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, images_per_s=b / (med * 1e-3),
                       timing="per call, back to back, host clock")
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        emit()


def model_phase(device, batch: int, deadline: Optional[float], cpu_check: bool = False,
                progress: Optional[Callable[[dict], None]] = None,
                models: Sequence[str] = DEFAULT_MODELS) -> dict:
    """Every row (module docstring), model by model in ``models``' order; ``progress(result)`` after
    each. ``deadline``: a perf_counter time (None, or --cpu-check: no limit)."""
    rows: List[dict] = []
    meta = {"small_batches": list(CPU_CHECK_BATCHES if cpu_check else SMALL_BATCHES), "models": list(models)}

    def result() -> dict:
        ok = {(r["net"], r["section"], r["model"], r["mode"], r["batch"]): r["images_per_s"] for r in rows
              if r.get("images_per_s")}
        base = {r["net"]: MODELS[r["net"]][0] for r in rows if r.get("net")}
        ratio = {}
        for (net, section, model, mode, b), v in ok.items():
            ref = ok.get((net, section, base[net], mode, b))
            if model == "convert_auto" and ref:
                ratio[f"{section} {mode}@{b}" if net == "ghostnet_100" else f"{net} {section} {mode}@{b}"] = v / ref
        return dict(meta, rows=rows, x_timm=ratio, note="x_timm: convert_auto's images/s over the package's model's "
                                                         "(timm; ultralytics for YOLO), same model, section, mode and batch")

    def emit() -> None:
        if progress:
            progress(result())
    budget = Budget(None if cpu_check else deadline)
    for net in models:
        try:
            bench = ModelBench(device, cpu_check, net)
        except (ModelUnavailable, ImportError) as exc:
            rows.append(dict(impl=MODELS[net][0], net=net, batch=batch, status=f"skipped: {exc}"))
            emit()
            continue
        if net != "ghostnet_100":
            small_batch_rows(bench, budget, rows, emit)
            continue
        meta["model"] = bench.name
        large_batch_rows(bench, batch, budget, rows, emit)
        small_batch_rows(bench, budget, rows, emit)
        if cpu_check:
            rows.append(dict(bench.row("convert_triton", "compile", batch, "batch"),
                             status="skipped: cpu-check (the Triton interpreter takes minutes per forward)"))
        else:
            x = bench.inputs(batch, 0)
            _one_large(bench, "convert_triton", "compile", x, bench.reference(x), budget, rows, emit)
    return result()
