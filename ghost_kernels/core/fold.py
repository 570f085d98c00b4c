"""Eval-mode BatchNorm folding: the one place BN becomes a per-channel affine map in PyTorch.

In eval mode both BNs are affine maps per channel, ``BN(z) = z * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale`` (a conv bias
``b`` moves into the shift, ``beta + (b - running_mean) * scale``; without a BatchNorm, a deployed
module, ``scale = 1`` and ``shift = b``), so:

* primary: ``BN1(conv(x, w1)) = conv(x, w1) * scale1 + shift1``. ``w1`` stays as the module stores it
  (cast to the compute dtype) and ``scale1`` is applied to the fp32 accumulator: the same function as
  folding ``scale1`` into ``w1``, without rounding ``w1 * scale1`` to half precision.
* cheap: ``BN2(dwconv(y1, wd)) = dwconv(y1, wd * scale2) + shift2``, with ``wd * scale2`` kept in fp32.

Folding is done in float32 (float64 for float64 parameters), on every call: no folded copy is kept,
so a forward never uses weights other than the module's current ones, whatever edited them
(``p.data.copy_``, an optimizer, ``load_state_dict``). The Triton kernel families fold inside the
kernel instead (``triton/common.folded_bn``); this module serves the other paths: the v1 halo kernel,
the CUDA C++ kernel and ``torch_folded``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .params import BatchNormState, GhostParams


class FoldedGhost(NamedTuple):
    """What the folded kernels take instead of conv weights and BatchNorms."""

    w1: Tensor      # [m, inp], compute dtype, contiguous: primary 1x1 conv weight
    scale1: Tensor  # [m], fp32: BN1 scale, applied to the fp32 accumulator
    shift1: Tensor  # [m], fp32: BN1 shift
    wd: Tensor      # [m * (ratio - 1), dw * dw], fp32: cheap depthwise weight with BN2's scale folded in
    shift2: Tensor  # [m * (ratio - 1)], fp32: BN2 shift


def fold_batch_norm(bn: Optional[BatchNormState], dtype: torch.dtype = torch.float32,
                    conv_bias: Optional[Tensor] = None, channels: int = 0, device=None):
    """Eval-mode BN after a conv with ``conv_bias`` as ``y * scale + shift`` per channel (``y`` the conv
    without its bias), computed in ``dtype`` (float32 or wider): ``BN(y + b) = y * scale + (b - mean)
    * scale + beta``. No BatchNorm (``bn`` None, a deployed module): ``scale = 1``, ``shift = b``
    (``channels`` and ``device`` give their size and place)."""
    if bn is None:
        ones = torch.ones(channels, dtype=dtype, device=device)
        return ones, (conv_bias.to(dtype) if conv_bias is not None else torch.zeros_like(ones))
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batch_norm: BatchNorm without running statistics "
                         "(track_running_stats=False) normalizes with batch statistics and cannot be folded")
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    mean = bn.running_mean.to(dtype)
    if conv_bias is not None:
        mean = mean - conv_bias.to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def fold_ghost(params: GhostParams, compute_dtype: torch.dtype) -> FoldedGhost:
    """Fold both eval-mode BatchNorms (see the module docstring). Runs under ``torch.no_grad``."""
    w1, bn1, wd, bn2, spec, b1, b2 = params
    with torch.no_grad():
        acc = torch.float64 if w1.dtype == torch.float64 else torch.float32
        scale1, shift1 = fold_batch_norm(bn1, acc, b1, spec.m, w1.device)
        scale2, shift2 = fold_batch_norm(bn2, acc, b2, spec.new, w1.device)
        w1f = w1.detach().reshape(spec.m, -1).to(compute_dtype).contiguous()
        wdf = (wd.detach().reshape(spec.new, -1).to(acc) * scale2[:, None]).contiguous()
        return FoldedGhost(w1f, scale1.contiguous(), shift1.contiguous(), wdf, shift2.contiguous())


def folded_conv_weights(params: GhostParams, dtype: torch.dtype):
    """``(w1 * scale1, shift1, wd * scale2, shift2)`` as conv weights and biases in ``dtype``: BN
    folded into the convs themselves, as a deployment export would (``torch_folded``)."""
    w1, bn1, wd, bn2, spec, b1, b2 = params
    with torch.no_grad():
        acc = torch.float64 if w1.dtype == torch.float64 else torch.float32
        scale1, shift1 = fold_batch_norm(bn1, acc, b1, spec.m, w1.device)
        scale2, shift2 = fold_batch_norm(bn2, acc, b2, spec.new, w1.device)
        return ((w1.to(acc) * scale1[:, None, None, None]).to(dtype), shift1.to(dtype),
                (wd.to(acc) * scale2[:, None, None, None]).to(dtype), shift2.to(dtype))
