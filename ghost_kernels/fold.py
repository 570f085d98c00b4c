"""Eval-mode BatchNorm folding for the fused kernels, and the cache that keeps it fresh.

The fused kernels never see BatchNorm. In eval mode both BNs are affine maps per channel, so:

* primary: ``BN1(conv(x, w1)) = conv(x, w1) * scale1 + shift1``. ``w1`` stays as the module stores it
  (cast to the compute dtype) and ``scale1`` is applied to the fp32 accumulator. This is the same
  function as folding ``scale1`` into ``w1``, without rounding ``w1 * scale1`` to half precision.
* cheap: ``BN2(dwconv(y1, wd)) = dwconv(y1, wd * scale2) + shift2``, with ``wd * scale2`` kept in fp32
  (the depthwise step runs on fp32 CUDA cores, so there is nothing to round).

Everything is folded in float32 (float64 for float64 parameters). :class:`FoldCache` refolds when any
parameter or buffer changes: it keys on each tensor's identity, storage, version counter (bumped by
in-place updates such as ``load_state_dict``'s ``copy_`` and optimizer steps), dtype and device.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .reference import BatchNormState, fold_batch_norm
from .spec import GhostSpec


class FoldedGhost(NamedTuple):
    """What the fused kernels take instead of conv weights and BatchNorms."""

    w1: Tensor      # [m, inp], compute dtype, contiguous: primary 1x1 conv weight
    scale1: Tensor  # [m], fp32: BN1 scale, applied to the fp32 accumulator
    shift1: Tensor  # [m], fp32: BN1 shift
    wd: Tensor      # [m * (ratio - 1), dw * dw], fp32: cheap depthwise weight with BN2's scale folded in
    shift2: Tensor  # [m * (ratio - 1)], fp32: BN2 shift


def fold_ghost(
    primary_weight: Tensor,
    primary_bn: BatchNormState,
    cheap_weight: Tensor,
    cheap_bn: BatchNormState,
    spec: GhostSpec,
    compute_dtype: torch.dtype,
) -> FoldedGhost:
    """Fold both eval-mode BatchNorms (see the module docstring). Runs under ``torch.no_grad``."""
    with torch.no_grad():
        acc = torch.float64 if primary_weight.dtype == torch.float64 else torch.float32
        scale1, shift1 = fold_batch_norm(primary_bn, acc)
        scale2, shift2 = fold_batch_norm(cheap_bn, acc)
        w1 = primary_weight.detach().reshape(spec.m, -1).to(compute_dtype).contiguous()
        wd = (cheap_weight.reshape(spec.new, -1).to(acc) * scale2[:, None]).contiguous()
        return FoldedGhost(w1, scale1.contiguous(), shift1.contiguous(), wd, shift2.contiguous())


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _tensor_key(t: Optional[Tensor]):
    if t is None:
        return None
    return (id(t), t.data_ptr(), t._version, t.dtype, t.device)


class FoldCache:
    """Caches :class:`FoldedGhost` per compute dtype; refolds when any source tensor changed."""

    def __init__(self):
        self._key = None
        self._value: Optional[FoldedGhost] = None

    def get(self, sources: Sequence[Optional[Tensor]], extra_key: Tuple, fold) -> FoldedGhost:
        """The cached fold if no tensor in ``sources`` and nothing in ``extra_key`` changed, else ``fold()``.

        Under torch.compile the fold is traced into the graph instead (a few tiny per-channel ops):
        storage pointers and version counters are not traceable, and the graph sees fresh parameters.
        """
        if is_compiling():
            return fold()
        key: Tuple = tuple(extra_key) + tuple(_tensor_key(t) for t in sources)
        if key != self._key or self._value is None:
            self._value = fold()
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None
