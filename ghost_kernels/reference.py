"""The pure-PyTorch Ghost module: CPU path, fallback of every backend, and the numerical oracle.

Everything here is plain ``torch.nn.functional``; every fused kernel in this package is tested for
equality with these functions (in float64 for the oracle). The math, for ``m = ceil(oup / ratio)``::

    y1  = act(BN1(conv2d(x, w1, stride=s, padding=k // 2)))          # N x m       x H' x W'
    y2  = act(BN2(conv2d(y1, wd, padding=d // 2, groups=m)))         # N x m(r-1)  x H' x W'
    out = cat([y1, y2], dim=1)[:, :oup]

BatchNorm follows ``nn.BatchNorm2d`` exactly, train mode included (see :func:`batch_norm`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import GhostSpec

Activation = Union[str, Callable[[Tensor], Tensor]]


class BatchNormState(NamedTuple):
    """The tensors and options of an ``nn.BatchNorm2d``, for the functional API.

    Tensors are shared with the module they came from, so running statistics updated in train mode
    land in that module, as they would in eager PyTorch.
    """

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    track_running_stats: bool = True

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d) -> "BatchNormState":
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                   bn.momentum, bn.eps, bn.track_running_stats)


def batch_norm(x: Tensor, bn: BatchNormState, training: bool) -> Tensor:
    """``nn.BatchNorm2d.forward`` as a function of its state (same statistics, same buffer updates).

    Train mode normalizes with the biased batch variance and puts the unbiased one into
    ``running_var``; ``momentum=None`` is a cumulative average over ``num_batches_tracked``;
    ``track_running_stats=False`` always uses batch statistics.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = training or (bn.running_mean is None and bn.running_var is None)
    track = not training or bn.track_running_stats
    return F.batch_norm(
        x,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.weight, bn.bias, use_batch_stats, factor, bn.eps,
    )


def fold_batch_norm(bn: BatchNormState, dtype: torch.dtype = torch.float32):
    """Eval-mode BN as ``y * scale + shift`` per channel, computed in ``dtype`` (float32 or wider).

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batch_norm: BatchNorm without running statistics "
                         "(track_running_stats=False) normalizes with batch statistics and cannot be folded")
    var = bn.running_var.to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def activation(y: Tensor, act: Activation) -> Tensor:
    """Apply ``act``: ``"relu"``, ``"none"`` or any callable (an ``nn.Module`` such as ``nn.Hardswish``)."""
    if act == "relu":
        return F.relu(y)
    if act == "none":
        return y
    if callable(act):
        return act(y)
    raise ValueError(f"activation: expected 'relu', 'none' or a callable, got {act!r}")


def ghost_reference(
    x: Tensor,
    primary_weight: Tensor,
    primary_bn: BatchNormState,
    cheap_weight: Tensor,
    cheap_bn: BatchNormState,
    spec: GhostSpec,
    *,
    training: bool = False,
    act: Union[None, Activation, Tuple[Activation, Activation]] = None,
) -> Tensor:
    """The Ghost module's forward, exactly as the official and timm modules compute it.

    ``act`` defaults to ``spec.act``; pass a callable (or a pair: primary, cheap) for activations
    other than ReLU/identity. Works for every dtype and device PyTorch's conv2d supports, with autograd.
    """
    act = spec.act if act is None else act
    act1, act2 = act if isinstance(act, tuple) else (act, act)
    if spec.kernel_size == 1 and spec.stride > 1:
        # A 1x1 conv with stride s reads every s-th row and column: sample first, convolve with stride
        # 1. Same function; it also keeps the reference clear of PyTorch 2.14.1's oneDNN bug, which
        # returns a wrong weight gradient for some 1x1 stride-2 channels_last CPU inputs.
        y1 = F.conv2d(x[:, :, ::spec.stride, ::spec.stride], primary_weight)
    else:
        y1 = F.conv2d(x, primary_weight, None, spec.stride, spec.kernel_size // 2)
    y1 = activation(batch_norm(y1, primary_bn, training), act1)
    y2 = F.conv2d(y1, cheap_weight, None, 1, spec.dw_size // 2, 1, spec.m)
    y2 = activation(batch_norm(y2, cheap_bn, training), act2)
    return torch.cat([y1, y2], dim=1)[:, : spec.oup]
