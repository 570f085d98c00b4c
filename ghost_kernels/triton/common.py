"""What every Triton kernel family here shares: the import guard, the interpreter switch, the launch
point (which the offline performance model can intercept), and the in-kernel BatchNorm fold.

Kernel families fold eval-mode BatchNorm *inside* the kernel, from the module's own tensors
(``gamma / sqrt(var + eps)`` per channel, once per program): there is no folded copy of the weights
that could go stale when a user edits a parameter in place (``p.data.copy_``, EMA updates), and no
extra launch per call to refold.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..core.params import BatchNormState
from ..core.spec import GhostSpec

try:  # triton is optional: without it the Triton backends report why they cannot run.
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton, tl = None, None
    TRITON_IMPORT_ERROR = exc

# Triton decides interpreter or compiler when @triton.jit runs, i.e. when a kernel module is
# imported: read the variable then, not on every launch.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when this package's Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


def triton_version() -> tuple:
    """(major, minor) of the installed Triton, (0, 0) without one."""
    if triton is None:
        return (0, 0)
    parts = (triton.__version__.split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# The launch point. Every kernel launch of the package goes through launch(), so that the offline
# performance model (ghost_kernels/bench/offline/) can record the exact launches a call makes --
# kernel, grid, arguments, specialization -- and compile them for sm_90 without a GPU.

class Launch(NamedTuple):
    """One recorded kernel launch."""

    kernel: Any                 # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict                # constexprs and launch options (num_warps, num_stages)
    loops: Optional[Sequence[float]]  # trip counts of the kernel's runtime loops, in source order


_CAPTURE: Optional[List[Launch]] = None
_RECORD: Optional[List[Launch]] = None


def launch(kernel, grid, *args, loops: Optional[Sequence[float]] = None, **kwargs):
    """``kernel[grid](*args, **kwargs)``; under :func:`capture_launches` the launch is recorded instead.

    ``loops``: for the offline model, the average trip count of each runtime (non-unrolled) loop of
    the kernel, in source order, per entry into the loop."""
    if _RECORD is not None:
        _RECORD.append(Launch(kernel, tuple(grid), args, dict(kwargs), None if loops is None else tuple(loops)))
    if _CAPTURE is not None:
        _CAPTURE.append(Launch(kernel, tuple(grid), args, dict(kwargs), None if loops is None else tuple(loops)))
        return None
    return kernel[tuple(grid)](*args, **kwargs)


def _launch_recorded(kernel, grid: tuple, args: list, kwargs: dict, loops) -> None:
    """:func:`launch` for a replayed launch, whose grid, arguments and keywords are already made."""
    if _RECORD is not None or _CAPTURE is not None:
        record = Launch(kernel, grid, tuple(args), kwargs, loops)   # the plan's own kwargs: never mutated
        if _RECORD is not None:
            _RECORD.append(record)
        if _CAPTURE is not None:
            _CAPTURE.append(record)
            return
    kernel[grid](*args, **kwargs)


class LaunchPlan:
    """The launches a family's launcher made for one kind of call, replayable for another call of the
    same kind (same sizes, strides, dtypes, alignment, parameters): ``x``, ``out`` and the gate are
    slots, rebound per call (with any view or TMA descriptor of them); every other argument (the
    module's own tensors, whose current data a launch reads, and the scalars and constexprs the
    launcher computed) is replayed as it was. What a repeat call then skips is the launcher's
    Python: configs, grids, strides, BatchNorm arguments (issue 15: host overhead)."""

    SLOTS = ("x", "out", "gate")

    def __init__(self, launches: Sequence[Launch], bound: Dict[str, Tensor], constants: Sequence[Tensor]):
        """``bound``: this call's tensors by slot name (:attr:`SLOTS`); ``constants``: the tensors a
        replay may pass as they are, and views of them (the module's own; w1 seen as m x Cin by a TMA
        box). Raises :class:`NotReplayable` for any other tensor argument (a copy of x, say):
        replaying it would compute from stale data."""
        keep = {t.untyped_storage().data_ptr() for t in constants if t is not None and t.numel() > 0}
        bound = [(i, bound.get(name)) for i, name in enumerate(self.SLOTS)]
        self.launches = []
        for lc in launches:
            dynamic = []
            for i, arg in enumerate(lc.args):
                slot = _slot(arg, bound, keep)
                if slot is not None:
                    dynamic.append((i, *slot))
            self.launches.append((lc.kernel, lc.grid, list(lc.args), tuple(dynamic), lc.kwargs, lc.loops))

    def run(self, x: Tensor, out: Tensor, gate: Optional[Tensor] = None) -> None:
        """The recorded launches with this call's ``x``, ``out`` and ``gate`` (of the recorded call's
        sizes, strides, dtypes and alignment: the caller's key)."""
        if x.is_cuda and x.device.index != torch.cuda.current_device():   # the launcher's device context
            with torch.cuda.device(x.device):
                return self.run(x, out, gate)
        bound = (x, out, gate)
        for kernel, grid, args, dynamic, kwargs, loops in self.launches:
            if dynamic:
                args = args.copy()
                for i, which, perm, desc in dynamic:
                    t = bound[which] if perm is None else bound[which].permute(perm)
                    args[i] = t if desc is None else _rebased(desc, t)
            _launch_recorded(kernel, grid, args, kwargs, loops)


class NotReplayable(Exception):
    """A launch argument derived from x / out / the gate in a way a plan cannot rebind."""


def _slot(arg, bound, keep: set):
    """None where the argument is replayed as it was, else how to rebuild it from this call's
    tensors: (slot index, the permutation of the slot's tensor or None, the TMA descriptor to rebase
    on it or None)."""
    if isinstance(arg, Tensor):
        for which, t in bound:
            if t is None:
                continue
            if arg is t:
                return which, None, None
            if arg.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() and t.numel() > 0:
                perm = _permutation(t, arg)
                return which, None if perm == tuple(range(t.dim())) else perm, None
        if arg.numel() > 0 and arg.untyped_storage().data_ptr() not in keep:   # views of the module's own pass
            raise NotReplayable(f"a launch argument is a tensor the launcher made ({tuple(arg.shape)})")
        return None
    if dataclasses.is_dataclass(arg) and isinstance(getattr(arg, "base", None), Tensor):   # a TMA descriptor
        base = _slot(arg.base, bound, keep)
        if base is not None:
            if base[2] is not None:
                raise NotReplayable("a TMA descriptor over a TMA descriptor")
            return base[0], base[1], arg
    return None


def _rebased(desc, base: Tensor):
    """``desc`` over ``base``, a tensor of the same shape and strides as its own (validated when
    ``desc`` was made: a copy of its fields, not a new instance with its checks)."""
    new = object.__new__(type(desc))
    new.__dict__.update(desc.__dict__)
    new.base = base
    return new


def _permutation(t: Tensor, view: Tensor) -> tuple:
    if view.data_ptr() == t.data_ptr() and view.dim() == t.dim():
        for perm in itertools.permutations(range(t.dim())):
            if tuple(view.shape) == tuple(t.shape[p] for p in perm) and \
                    tuple(view.stride()) == tuple(t.stride(p) for p in perm):
                return perm
    raise NotReplayable(f"a launch argument views x/out differently than by a permutation ({tuple(view.shape)})")


@contextlib.contextmanager
def record_launches():
    """Record, and run, every launch made through :func:`launch` (yields the list): what a
    :class:`LaunchPlan` is made from."""
    global _RECORD
    previous, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = previous


@contextlib.contextmanager
def capture_launches():
    """Record, instead of running, every launch made through :func:`launch` (yields the list)."""
    global _CAPTURE
    previous, _CAPTURE = _CAPTURE, []
    try:
        yield _CAPTURE
    finally:
        _CAPTURE = previous


def capturing() -> bool:
    return _CAPTURE is not None


# --------------------------------------------------------------------------------------------------
# The affine step after a conv, folded in a kernel: (weight, bias, mean, var) pointers of its BatchNorm,
# eps, the conv's bias, and one constexpr of flags saying which of them exist. An absent tensor is
# replaced by a pointer the kernel never reads (a tensor of the module, so that a replayed launch
# passes only the module's own). The activation: one constexpr code.

ACT_CODES = {"none": 0, "relu": 1, "silu": 2, "hardswish": 3}
BN_WEIGHT, BN_BIAS, BN_NORM, CONV_BIAS = 1, 2, 4, 8      # bits of the flags constexpr
AFFINE = 16     # instead: (scale, shift) given per channel in the weight and bias slots (the training forward)


def act_code(act: str) -> int:
    """The ``ACT`` constexpr of a kernel for ``GhostSpec.act``."""
    return ACT_CODES[act]


def bn_args(bn: Optional[BatchNormState], conv_bias: Optional[Tensor], placeholder: Tensor):
    """``(weight, bias, running_mean, running_var, eps, conv_bias)`` for a kernel and its flags constexpr
    (BN_WEIGHT | BN_BIAS | BN_NORM | CONV_BIAS: which exist). ``bn`` None: a deployed conv, no BatchNorm;
    its running statistics must be present otherwise (eval-mode BN)."""
    if bn is None:
        p = placeholder
        return (p, p, p, p, 0.0, conv_bias if conv_bias is not None else p), CONV_BIAS * (conv_bias is not None)
    mean, var = bn.running_mean, bn.running_var
    flags = BN_NORM | BN_WEIGHT * (bn.weight is not None) | BN_BIAS * (bn.bias is not None) \
        | CONV_BIAS * (conv_bias is not None)
    return (bn.weight if bn.weight is not None else var, bn.bias if bn.bias is not None else var, mean, var,
            float(bn.eps), conv_bias if conv_bias is not None else var), flags


if triton is not None:

    @triton.jit
    def folded_bn(c, c_ok, w_ptr, b_ptr, mean_ptr, var_ptr, eps, cb_ptr, FLAGS: tl.constexpr):
        """The conv's bias and eval-mode BN of channels ``c`` as ``(scale, shift)`` in fp32, ``y = z * scale
        + shift`` for the conv's output z without its bias: ``scale = gamma / sqrt(var + eps)``, ``shift =
        beta + (bias - mean) * scale``; without a BatchNorm ``scale = 1``, ``shift = bias`` (or 0).
        Masked channels: scale 0. FLAGS 16 (``AFFINE``): ``scale`` and ``shift`` themselves are given (fp32,
        in the weight and bias slots; the training forward computes them from the batch statistics)."""
        if FLAGS & 16:
            scale = tl.load(w_ptr + c, mask=c_ok, other=0.0)
            shift = tl.load(b_ptr + c, mask=c_ok, other=0.0)
        elif FLAGS & 4:
            var = tl.load(var_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
            scale = 1.0 / tl.sqrt_rn(var + eps)
            if FLAGS & 1:
                scale = scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            scale = tl.where(c_ok, scale, 0.0)
            centre = -tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            if FLAGS & 8:
                centre = centre + tl.load(cb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            shift = centre * scale
            if FLAGS & 2:
                shift = shift + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        else:
            scale = tl.where(c_ok, 1.0, 0.0)
            if FLAGS & 8:
                shift = tl.load(cb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            else:
                shift = tl.zeros_like(scale)
        return scale, shift

    @triton.jit
    def act(y, ACT: tl.constexpr):
        """The activation in fp32 as eager computes it: 1 ReLU (max.NaN: NaN stays NaN, one FMNMX.NAN or
        fused into the bf16/fp16 conversion as F2FP.RELU; tl.where(y < 0, 0, y) costs FSETP + FSEL, +6%
        instructions, measured), 2 SiLU ``y / (1 + exp(-y))``, 3 Hardswish ``y * clamp(y + 3, 0, 6) / 6``,
        0 the identity."""
        if ACT == 1:
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
        elif ACT == 2:
            y = y / (1.0 + tl.exp(-y))
        elif ACT == 3:
            y = y * tl.minimum(tl.maximum(y + 3.0, 0.0), 6.0) / 6.0
        return y


# --------------------------------------------------------------------------------------------------
# Halo tiling (the v1 single-pass kernel and the training kernels) and persistent grids.

class TileConfig(NamedTuple):
    HALO_H: int
    HALO_W: int
    BLOCK_M: int
    BLOCK_K: int
    num_warps: int


def pick_config(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype = torch.bfloat16,
                max_lanes: int = 256, pad: Optional[int] = None) -> TileConfig:
    """Tile shape for an ``ho`` x ``wo`` output: the halo tile covers the image when it is small,
    else 16 x 16 (``max_lanes`` = 256 pixels per program). A square halo tile wastes the fewest lanes
    on the halo (14 x 14 useful of 16 x 16 for a 3x3 cheap op, 77 %, against 70 % for 32 x 8), and
    GhostNet's resolutions (112, 56, 28, 14) are multiples of 14. ``pad``: halo width (default d // 2;
    the backward kernel needs 2 * (d // 2))."""
    pad = spec.dw_size // 2 if pad is None else pad
    halo_w = min(max(next_pow2(wo + 2 * pad), next_pow2(2 * pad + 1)), 16)
    halo_h = min(next_pow2(ho + 2 * pad), max(max_lanes // halo_w, 1))
    halo_h = max(halo_h, next_pow2(2 * pad + 1), 16 // halo_w if halo_w < 16 else 1)  # tl.dot: N >= 16
    # 16 channels x 256 lanes x 4 warps: ~100-130 registers (ptxas, sm_90), so 4-5 programs per SM
    # stay resident; 32 channels or 512 lanes need ~250 and halve the warps in flight.
    block_m = 16
    block_k = 16 if spec.inp <= 16 or dtype == torch.float32 else 32  # fp32 (FMA dot): 16 avoids ~180 regs
    return TileConfig(halo_h, halo_w, block_m, block_k, 4)


def tile_grid(spec: GhostSpec, n: int, ho: int, wo: int, cfg: TileConfig, pad: int):
    """(tiles along H, tiles along W, channel blocks, total tiles) for halo tiles with ``pad`` rows/cols
    of halo on each side."""
    th, tw = cfg.HALO_H - 2 * pad, cfg.HALO_W - 2 * pad
    n_th, n_tw = triton.cdiv(ho, th), triton.cdiv(wo, tw)
    n_mb = triton.cdiv(spec.m, cfg.BLOCK_M)
    return n_th, n_tw, n_mb, n * n_th * n_tw * n_mb


def persistent_programs(variant: tuple, x: Tensor, total: int) -> int:
    """Programs of a persistent grid: what fits on the GPU at once (learned from the first launch)."""
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(total, _RESIDENT.get(variant, 1) * sms))
    return max(1, min(total, INTERPRETER_PROGRAMS))


def remember_occupancy(variant: tuple, compiled, x: Tensor, num_warps: int) -> None:
    if x.is_cuda and variant not in _RESIDENT:
        _RESIDENT[variant] = _resident_programs(compiled, x.device.index, num_warps)



INTERPRETER_PROGRAMS = 3  # few programs, so the interpreter also runs several tiles per program
# Resident programs per SM for each compiled variant, learned from its first launch (which runs
# one program per SM). A persistent grid larger than what fits would serialize whole programs.
_RESIDENT: Dict[tuple, int] = {}


def _resident_programs(compiled, device_index: int, num_warps: int) -> int:
    """How many programs of ``compiled`` fit on one SM at once (registers, shared memory, warps)."""
    try:
        compiled._init_handles()
        regs, smem = compiled.n_regs, compiled.metadata.shared
    except Exception:  # a Triton without these internals: a safe middle
        return 2
    props = torch.cuda.get_device_properties(device_index)
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    warps_sm = getattr(props, "max_threads_per_multi_processor", 2048) // 32
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated in units of 256 registers per warp
    fit = min(regs_sm // max(regs_per_warp * num_warps, 1), warps_sm // num_warps,
              smem_sm // (smem + 1024) if smem else 32)
    return max(1, min(fit, 8))




def device_ctx(x: Tensor):
    """The launch's CUDA device context for ``x`` (nothing for CPU tensors in the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


if triton is not None:

    @triton.jit
    def act_grad(g, u, y, ACT: tl.constexpr):
        """dL/du from g = dL/dy for y = act(u) (codes: ``common.act``), in fp32 as eager's backward
        computes it. 1 ReLU: threshold_backward on y, zero where y <= 0, so NaN passes (``y`` must be the
        value the forward's decision was taken on, bit for bit); 2 SiLU: silu_backward,
        ``g s (1 + u (1 - s))`` with ``s = 1 / (1 + exp(-u))`` (NaN at u = NaN or +-Inf, as eager);
        3 Hardswish: hardswish_backward, 0 for u <= -3, ``g (u / 3 + 1/2)`` for u < 3, else g (so u = NaN
        passes g, as eager's CUDA kernel and CPU scalar loop do; its CPU vectorized loop gives NaN there);
        0 the identity."""
        if ACT == 1:
            g = tl.where(y <= 0.0, 0.0, g)
        elif ACT == 2:
            s = 1.0 / (1.0 + tl.exp(-u))
            g = g * s * (1.0 + u * (1.0 - s))
        elif ACT == 3:
            g = tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, g * (u / 3.0 + 0.5), g))
        return g

    @triton.jit
    def dot_acc(a, b, acc, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
        """``acc + a @ b`` on tensor cores; exact fp32 (``IEEE``: fp32 FMAs); ``DOT_F32``: the operands in
        fp32, for the interpreter only, whose bf16 tl.dot multiplies raw bits (triton#11584)."""
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)
