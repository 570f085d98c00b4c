"""The pure-PyTorch Ghost module: CPU path, fallback of every backend, and the numerical oracle.

Everything here is plain ``torch.nn.functional``; every fused kernel in this package is tested for
equality with these functions (in float64 for the oracle). The math, for ``m = ceil(oup / ratio)``::

    y1  = act(BN1(conv2d(x, w1, stride=s, padding=k // 2)))          # N x m       x H' x W'
    y2  = act(BN2(conv2d(y1, wd, padding=d // 2, groups=m)))         # N x m(r-1)  x H' x W'
    out = cat([y1, y2], dim=1)[:, :oup]

BatchNorm follows ``nn.BatchNorm2d`` exactly, train mode included (see :func:`batch_norm`).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import Backend, Request
from .batch_stats import count_batch, momentum_factor
from .params import BatchNormState, GhostParams

Activation = Union[str, Callable[[Tensor], Tensor]]


def batch_norm(x: Tensor, bn: BatchNormState, training: bool) -> Tensor:
    """``nn.BatchNorm2d.forward`` as a function of its state (same statistics, same buffer updates).

    Train mode normalizes with the biased batch variance and puts the unbiased one into
    ``running_var``; ``momentum=None`` is a cumulative average over ``num_batches_tracked``;
    ``track_running_stats=False`` always uses batch statistics.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        count_batch(bn)
        factor = momentum_factor(bn)
    use_batch_stats = training or (bn.running_mean is None and bn.running_var is None)
    track = not training or bn.track_running_stats
    return F.batch_norm(
        x,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.weight, bn.bias, use_batch_stats, factor, bn.eps,
    )


_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "hardswish": F.hardswish, "none": lambda y: y}


def activation(y: Tensor, act: Activation) -> Tensor:
    """Apply ``act``: ``"relu"``, ``"silu"``, ``"hardswish"``, ``"none"`` or any callable (an
    ``nn.Module`` such as ``nn.GELU``)."""
    fn = _ACTIVATIONS.get(act) if isinstance(act, str) else act
    if fn is None or not callable(fn):
        raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)} or a callable, got {act!r}")
    return fn(y)


def apply_gate(out: Tensor, gate: Optional[Tensor]) -> Tensor:
    """GhostNetV2's attention: ``out * interpolate(gate, size=out's H x W, mode="nearest")``, the gate
    (already through its sigmoid) at a lower resolution."""
    if gate is None:
        return out
    return out * F.interpolate(gate, size=out.shape[-2:], mode="nearest")


def ghost_reference(
    x: Tensor,
    params: GhostParams,
    *legacy,
    training: bool = False,
    act: Union[None, Activation, Tuple[Activation, Activation]] = None,
    gate: Optional[Tensor] = None,
) -> Tensor:
    """The Ghost module's forward, exactly as the official and timm modules compute it.

    ``act`` defaults to ``params.spec.act``; pass a callable (or a pair: primary, cheap) for
    activations the spec does not name. Conv biases (``params.b1``/``b2``) and absent BatchNorms
    (``params.bn1``/``bn2`` None: a deployed module) are honoured; ``gate`` is GhostNetV2's attention
    (:func:`apply_gate`). Works for every dtype and device PyTorch's conv2d supports, with autograd.
    (The 0.1 form ``ghost_reference(x, w1, bn1, wd, bn2, spec)`` still
    works, with a DeprecationWarning.)
    """
    params = legacy_params(params, legacy, "ghost_reference")
    w1, bn1, wd, bn2, spec, b1, b2 = params
    act = spec.act if act is None else act
    act1, act2 = act if isinstance(act, tuple) else (act, act)
    if spec.kernel_size == 1 and spec.stride > 1:
        # A 1x1 conv with stride s reads every s-th row and column: sample first, convolve with stride
        # 1. Same function; it also keeps the reference clear of PyTorch 2.14.1's oneDNN bug, which
        # returns a wrong weight gradient for some 1x1 stride-2 channels_last CPU inputs.
        y1 = F.conv2d(x[:, :, ::spec.stride, ::spec.stride], w1, b1)
    else:
        y1 = F.conv2d(x, w1, b1, spec.stride, spec.kernel_size // 2)
    y1 = activation(y1 if bn1 is None else batch_norm(y1, bn1, training), act1)
    y2 = F.conv2d(y1, wd, b2, 1, spec.dw_size // 2, 1, spec.m)
    y2 = activation(y2 if bn2 is None else batch_norm(y2, bn2, training), act2)
    return apply_gate(torch.cat([y1, y2], dim=1)[:, : spec.oup], gate)


def legacy_params(first, rest: tuple, fname: str) -> GhostParams:
    """``GhostParams`` from the 0.1 calling convention ``(w1, bn1, wd, bn2, spec)``, with a warning."""
    if not rest:
        if not isinstance(first, GhostParams):
            raise TypeError(f"{fname}: params must be a ghost_kernels.GhostParams, got {type(first).__name__}")
        return first
    if len(rest) != 4:
        raise TypeError(f"{fname}: expected (x, params) or the deprecated (x, w1, bn1, wd, bn2, spec)")
    import warnings
    warnings.warn(f"{fname}(x, w1, bn1, wd, bn2, spec) is deprecated: pass "
                  f"GhostParams(w1, bn1, wd, bn2, spec)", DeprecationWarning, stacklevel=3)
    return GhostParams(first, *rest)


class TorchBackend(Backend):
    """Plain PyTorch: the reference itself (a GhostModule runs its own submodules instead, so that
    SyncBatchNorm, hooks and custom activations behave as in the original)."""

    def forward(self, x: Tensor, req: Request) -> Tensor:
        return ghost_reference(x, req.params, training=req.training, gate=req.gate)

    def not_supported_reasons(self, req: Request) -> List[str]:
        return []


BACKEND = TorchBackend("torch", "plain PyTorch (the reference): everything the official module runs",
                       trains=True, fused=False)
