"""``torch_folded``: eager PyTorch with both BatchNorms folded into the convs (cuDNN convs, no fused
kernel). It is what a deployment export runs, and where it is measured faster than every fused
family (benchmarks/results), ``auto`` picks it: converting a model never makes a measured shape
slower than this.

Equivalent PyTorch (eval mode; BN folded on every call, see ``fold.py``)::

    w1f, b1, wdf, b2 = folded_conv_weights(params, dtype)
    y1 = act(F.conv2d(x, w1f, b1, stride, padding=k // 2))
    y2 = act(F.conv2d(y1, wdf, b2, padding=d // 2, groups=m))
    out = torch.cat([y1, y2[:, :oup - m]], 1) * interpolate(gate, out's size)   # GhostNetV2's gate, if any
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import Backend, Request, Support
from .fold import folded_conv_weights
from .params import GhostParams
from .reference import activation, apply_gate


def folded_forward(x: Tensor, params: GhostParams, dtype: torch.dtype, gate: Optional[Tensor] = None) -> Tensor:
    """The folded eager forward, computing in ``dtype``; the output has eager's memory format."""
    spec = params.spec
    w1f, b1, wdf, b2 = folded_conv_weights(params, dtype)
    x = x.to(dtype)
    y1 = activation(F.conv2d(x, w1f, b1, spec.stride, spec.kernel_size // 2), spec.act)
    y2 = activation(F.conv2d(y1, wdf, b2, 1, spec.dw_size // 2, 1, spec.m), spec.act)
    out = torch.cat([y1, y2[:, :spec.oup - spec.m]], 1)   # dense, in the convs' memory format
    return apply_gate(out, None if gate is None else gate.to(dtype))


class TorchFoldedBackend(Backend):
    def environment_reason(self, device: Optional[torch.device] = None) -> Optional[str]:
        return None

    def forward(self, x: Tensor, req: Request) -> Tensor:
        return folded_forward(x, req.params, req.compute_dtype, req.gate)


BACKEND = TorchFoldedBackend(
    "torch_folded", "eager PyTorch (cuDNN) with both BatchNorms folded into the convs; inference only",
    support=Support(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
                    kernel_sizes=None, strides=None, ratios=None, dw_sizes=None,
                    acts=("relu", "silu", "hardswish", "none"), conv_bias=True, without_bn=True, gate=True),
    fused=False)
