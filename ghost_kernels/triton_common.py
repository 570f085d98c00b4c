"""What every Triton kernel family here shares: the import guard, the interpreter switch, the launch
point (which the offline performance model can intercept), and the in-kernel BatchNorm fold.

Kernel families fold eval-mode BatchNorm *inside* the kernel, from the module's own tensors
(``gamma / sqrt(var + eps)`` per channel, once per program): there is no folded copy of the weights
that could go stale when a user edits a parameter in place (``p.data.copy_``, EMA updates), and no
extra launch per call to refold.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, List, NamedTuple, Optional, Sequence

from .params import BatchNormState

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


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# The launch point. Every kernel launch of the package goes through launch(), so that the offline
# performance model (ghost_kernels/bench/offline.py) can record the exact launches a call makes --
# kernel, grid, arguments, specialization -- and compile them for sm_90 without a GPU.

class Launch(NamedTuple):
    """One recorded kernel launch."""

    kernel: Any                 # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict                # constexprs and launch options (num_warps, num_stages)
    loops: Optional[Sequence[float]]  # trip counts of the kernel's runtime loops, in source order


_CAPTURE: Optional[List[Launch]] = None


def launch(kernel, grid, *args, loops: Optional[Sequence[float]] = None, **kwargs):
    """``kernel[grid](*args, **kwargs)``; under :func:`capture_launches` the launch is recorded instead.

    ``loops``: for the offline model, the average trip count of each runtime (non-unrolled) loop of
    the kernel, in source order, per entry into the loop."""
    if _CAPTURE is not None:
        _CAPTURE.append(Launch(kernel, tuple(grid), args, dict(kwargs), None if loops is None else tuple(loops)))
        return None
    return kernel[tuple(grid)](*args, **kwargs)


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
# BatchNorm arguments of a kernel: (weight, bias, mean, var) pointers, eps and two flags. An absent
# affine parameter (affine=False) is replaced by another pointer that the kernel never reads.

def bn_args(bn: BatchNormState):
    """``(weight, bias, running_mean, running_var, eps)`` for a kernel, and the constexprs
    ``(HAS_WEIGHT, HAS_BIAS)``; running statistics must be present (eval-mode BN)."""
    mean, var = bn.running_mean, bn.running_var
    weight = bn.weight if bn.weight is not None else var
    bias = bn.bias if bn.bias is not None else var
    return (weight, bias, mean, var, float(bn.eps)), (bn.weight is not None, bn.bias is not None)


if triton is not None:

    @triton.jit
    def folded_bn(c, c_ok, w_ptr, b_ptr, mean_ptr, var_ptr, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        """Eval-mode BN of channels ``c`` as ``(scale, shift)`` in fp32: ``y = z * scale + shift`` with
        ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` (masked channels: 0)."""
        var = tl.load(var_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
        scale = 1.0 / tl.sqrt_rn(var + eps)
        if HAS_W:
            scale = scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        scale = tl.where(c_ok, scale, 0.0)
        shift = -tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32) * scale
        if HAS_B:
            shift = shift + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        return scale, shift
