"""Microbenchmark harness: implementations, correctness gate, timing, bandwidth.

Every implementation runs on the same inputs and weights, is checked against the float64 reference
before it is timed, and is timed with CUDA events (``triton.testing.do_bench``, which also flushes
L2 between calls) on a rotating set of inputs. On a CPU the same code times with ``perf_counter``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.fold import folded_conv_weights
from ..core.params import GhostParams
from ..core.reference import activation
from ..core.spec import GhostSpec, ModuleShape
from ..dispatch import BACKEND_CHOICES, BY_NAME
from ..module import GhostModule
from ..testing import rel_err

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
# Relative-error gate per dtype (output vs float64 reference); the tests hold the kernels to a
# tighter, eager-relative bound. This only keeps a broken implementation out of the tables.
ERR_GATE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # fp32: eager convs use TF32
# eager PyTorch baselines, then every ghost_kernels backend by name ("auto": what convert() users get)
BASELINES = ("eager", "eager_folded", "compile", "compile_max_autotune")
BACKEND_IMPLS = ("auto",) + tuple(n for n in BACKEND_CHOICES if n not in ("auto", "torch"))
IMPLS = BASELINES + BACKEND_IMPLS
# On the CPU: timm's eager paths beside the package's own (a GhostModule through "auto", which is the
# PyTorch path for CPU tensors, and "torch_folded").
CPU_IMPLS = ("eager", "eager_folded", "auto", "torch_folded")


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass
class Row:
    op: str
    impl: str
    name: str
    inp: int
    oup: int
    h: int
    w: int
    stride: int
    batch: int
    dtype: str
    layout: str
    count: int  # how many of the network's modules have this shape
    bytes: int = 0
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    GBps: Optional[float] = None
    copy_fraction: Optional[float] = None
    rel_err: Optional[float] = None
    status: str = "ok"
    note: str = ""
    extra: Dict[str, float] = field(default_factory=dict)


def randomize_(module: nn.Module) -> nn.Module:
    """Random weights and BN statistics (a fresh BN is the identity, which would hide folding bugs)."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5))
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.2)
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return module


def eager_module(spec: GhostSpec) -> nn.Module:
    """The module users have: timm's GhostModule if timm is installed, else ours on the torch path
    (the same ops: conv, BN, act, depthwise conv, BN, act, cat, slice)."""
    act = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "none": nn.Identity}[spec.act]
    try:
        from timm.models.ghostnet import GhostModule as TimmGhost

        return TimmGhost(spec.inp, spec.oup, spec.kernel_size, spec.ratio, spec.dw_size, spec.stride, act_layer=act)
    except ImportError:
        return GhostModule(spec.inp, spec.oup, spec.kernel_size, spec.ratio, spec.dw_size, spec.stride,
                           act_layer=act, backend="torch")


class FoldedEager(nn.Module):
    """Eager PyTorch with BN folded into the convs once, ahead of time (conv+bias, act, dw conv+bias,
    act, cat): what a user who folds BN for deployment runs. (``torch_folded`` is the same math with
    the fold on every call.)"""

    def __init__(self, module: nn.Module, spec: GhostSpec):
        super().__init__()
        self.spec = spec
        self.w1, self.b1, self.wd, self.bd = folded_conv_weights(GhostParams.from_module(module, spec),
                                                                 module.primary_conv[0].weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        y1 = activation(F.conv2d(x, self.w1, self.b1, s.stride, s.kernel_size // 2), s.act)
        y2 = activation(F.conv2d(y1, self.wd, self.bd, 1, s.dw_size // 2, 1, s.m), s.act)
        return torch.cat([y1, y2], 1)[:, : s.oup]


def build_impl(impl: str, base: nn.Module, spec: GhostSpec, device: torch.device,
               compile_budget: Dict[str, float]) -> Callable[[Tensor], Tensor]:
    """A callable for ``impl`` sharing ``base``'s weights, or raise :class:`Skip`."""
    if impl == "eager":
        return base
    if impl == "eager_folded":
        return FoldedEager(base, spec)
    if impl in BACKEND_IMPLS:
        return GhostModule.from_module(base, backend=impl)
    if impl in ("compile", "compile_max_autotune"):
        if device.type != "cuda":
            raise Skip("torch.compile is timed on CUDA only")
        if compile_budget.get(impl, 0.0) <= 0:
            raise Skip(f"{impl}: time cap reached (--compile-budget)")
        import torch._dynamo

        torch._dynamo.reset()  # fresh caches: no recompile limit, no stale guards across shapes
        mode = "max-autotune" if impl == "compile_max_autotune" else None
        fn = torch.compile(base, mode=mode)
        return fn
    raise ValueError(f"unknown impl {impl!r}")


class Calibration:
    """Notices a busy machine: a fixed small workload timed at the start and again after every shape;
    when it runs more than ``factor`` x slower than at the start, the rows measured meanwhile are
    flagged (the numbers say more about the other load than about the kernels)."""

    def __init__(self, device: torch.device, factor: float = 3.0):
        self.device, self.factor = device, factor
        n = 512 if device.type == "cuda" else 128
        self._a = torch.randn(n, n, device=device)
        self.base_ms = self._time()
        self.worst = 1.0

    def _time(self) -> float:
        return time_fn(lambda: self._a @ self._a, self.device, warmup_ms=5, rep_ms=20)[0]

    def mark(self, rows: List["Row"]) -> None:
        slow = self._time() / max(self.base_ms, 1e-9)
        self.worst = max(self.worst, slow)
        if slow > self.factor:
            for r in rows:
                r.note = (r.note + "; " if r.note else "") + f"machine busy ({slow:.0f}x slower calibration)"

    def summary(self) -> Optional[str]:
        if self.worst <= self.factor:
            return None
        return (f"the machine was busy during this run: a fixed calibration workload ran up to {self.worst:.0f}x "
                f"slower than at the start; rows so marked are not representative")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy in GB/s, counting bytes read plus bytes written (the practical ceiling)."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    median, _, _ = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (median * 1e-3) / 1e9


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100):
    """(median, p20, p80) in ms. CUDA: events via do_bench (L2 flushed between calls); CPU: perf_counter."""
    if device.type == "cuda":
        import triton.testing

        res = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in res)
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def rotating_inputs(shape, dtype, layout, device, min_bytes: int) -> List[Tensor]:
    """Enough distinct inputs that cycling through them never hits L2 (``min_bytes`` in all)."""
    one = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    n = max(2, min(64, math.ceil(min_bytes / max(one, 1))))
    return [torch.randn(shape, device=device, dtype=torch.float32).to(dtype).contiguous(memory_format=layout)
            for _ in range(n)]


def module_bytes(spec: GhostSpec, n: int, h: int, w: int, elem: int) -> int:
    """Bytes of x + output + weights: what one single-pass forward must move at least (x counted
    whole: exact for stride 1, which is every Ghost module of GhostNet)."""
    ho, wo = spec.out_hw(h, w)
    weights = (spec.m * spec.inp + spec.new * spec.dw_size ** 2) * elem + 4 * 2 * (spec.m + spec.new)
    return (n * spec.inp * h * w + n * spec.oup * ho * wo) * elem + weights


def train_bytes(spec: GhostSpec, n: int, h: int, w: int, elem: int) -> int:
    """The floor of one training step (forward + backward): forward reads x and writes out, backward
    reads dL/dout and x and writes dL/dx: 3 x + 2 out (+ weights and their gradients)."""
    ho, wo = spec.out_hw(h, w)
    weights = 2 * ((spec.m * spec.inp + spec.new * spec.dw_size ** 2) * elem + 4 * 2 * (spec.m + spec.new))
    return (3 * n * spec.inp * h * w + 2 * n * spec.oup * ho * wo) * elem + weights


@dataclass(frozen=True)
class Op:
    """One benchmarked operation: the mode it puts the modules in, one (checked, then timed) call,
    its floor in bytes, and the implementations that cannot run it (with the reason)."""

    name: str
    train: bool
    call: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]
    floor_bytes: Callable[[GhostSpec, int, int, int, int], int]
    unsupported: Dict[str, str] = field(default_factory=dict)


def _forward(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with torch.no_grad():
        return fn(x)


_UPSTREAM: Dict[tuple, Tensor] = {}


def upstream_grad(out: Tensor) -> Tensor:
    """A fixed random dL/dout per shape, dtype and device (made once, outside the timed calls).
    Random, not out itself: with train-mode BN, ½‖out‖² barely depends on x and dL/dx cancels."""
    key = (tuple(out.shape), out.dtype, out.device, out.stride())
    if key not in _UPSTREAM:
        g = torch.Generator(device="cpu").manual_seed(0)
        # in out's memory format, as the gradient of the next layer would arrive
        _UPSTREAM[key] = torch.empty_like(out).copy_(torch.randn(out.shape, generator=g))
    return _UPSTREAM[key]


def _train(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Train-mode forward and backward with a fixed random dL/dout; returns dL/dx."""
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(upstream_grad(out))
    return x.grad


OPS: Dict[str, Op] = {
    "forward": Op("forward", train=False, call=_forward, floor_bytes=module_bytes),
    "train": Op("train", train=True, call=_train, floor_bytes=train_bytes,
                unsupported=dict({"eager_folded": "BN folding is eval-mode only",
                                  "compile_max_autotune": "not timed for train (compile time)"},
                                 **{n: "an inference-only backend" for n in BACKEND_IMPLS
                                    if n in BY_NAME and not BY_NAME[n].trains})),
}


def ran_backend(module: GhostModule, x: Tensor, train: bool) -> str:
    """The backend a GhostModule runs for ``x`` (for ``auto``: what it chose); a row's note, so a
    failure to say is a note too, not the row's error."""
    from ..core.backend import Request
    from ..dispatch import choose

    try:
        with torch.set_grad_enabled(train):
            return choose(module.backend, Request.make(x, module.params(), module.training)).backend.name
    except Exception as exc:
        return f"(unknown: {type(exc).__name__}: {exc})"


def bench_shape(shape: ModuleShape, count: int, batch: int, dtype_name: str, layout_name: str,
                impls: List[str], device: torch.device, copy_GBps: Optional[float], l2_bytes: int,
                compile_budget: Dict[str, float], rep_ms: int = 100, op: Op = OPS["forward"]) -> List[Row]:
    """Check, then time, every implementation of ``op`` on one module shape (those that cannot run
    ``op`` by design, ``op.unsupported``, get no row: the report lists them once)."""
    impls = [i for i in impls if i not in op.unsupported]
    dtype, layout = DTYPES[dtype_name], LAYOUTS[layout_name]
    spec = shape.spec
    base = randomize_(eager_module(spec)).to(device=device).train(op.train)
    ref_mod = GhostModule.from_module(copy.deepcopy(base).double(), backend="torch")
    base = base.to(dtype)
    xs = rotating_inputs((batch, spec.inp, shape.h, shape.w), dtype, layout, device, 3 * l2_bytes)
    ref = op.call(ref_mod, xs[0].double())
    nbytes = op.floor_bytes(spec, batch, shape.h, shape.w, xs[0].element_size())
    rows = []
    for impl in impls:
        row = Row(op.name, impl, shape.name, spec.inp, spec.oup, shape.h, shape.w, spec.stride, batch,
                  dtype_name, layout_name, count, nbytes)
        rows.append(row)
        try:
            t0 = time.perf_counter()
            fn = build_impl(impl, base, spec, device, compile_budget)
            out = op.call(fn, xs[0])  # also compiles
            if impl.startswith("compile"):
                compile_budget[impl] -= time.perf_counter() - t0
            row.rel_err = rel_err(out, ref)
            gate = ERR_GATE[dtype] * (4 if op.train else 1)  # dL/dx through train-mode BN: eager bf16 ~5e-2
            if not row.rel_err <= gate:
                row.status, row.note = "wrong", f"rel err {row.rel_err:.2e} > {gate:.0e}: not timed"
                continue
            state = {"i": 0}

            def step():
                state["i"] = (state["i"] + 1) % len(xs)
                return op.call(fn, xs[state["i"]])

            row.median_ms, row.p20_ms, row.p80_ms = time_fn(step, device, rep_ms=rep_ms)
            if device.type == "cuda":  # peak memory of one call above what is allocated before it
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                step()
                torch.cuda.synchronize(device)
                row.extra["peak_MiB"] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
            if copy_GBps:   # a GPU run: the bandwidth means something (report.NO_BANDWIDTH says why not on a CPU)
                row.GBps = nbytes / (row.median_ms * 1e-3) / 1e9
                row.copy_fraction = row.GBps / copy_GBps
            if impl == "auto":
                row.note = f"runs {ran_backend(fn, xs[0], op.train)}"
        except Skip as exc:
            row.status, row.note = "skipped", str(exc)
        except Exception as exc:  # a failing implementation is reported, not fatal to the run
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:300]
    return rows

