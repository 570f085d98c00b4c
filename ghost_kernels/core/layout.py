"""Output layout of the fused forwards: the shape and memory format eager PyTorch would give."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The memory format eager conv2d gives its output for input ``x`` (PyTorch's own rule)."""
    try:
        from torch._prims_common import suggest_memory_format
    except ImportError:  # pragma: no cover - the rule for dense tensors, should the helper move
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return torch.channels_last if cl else torch.contiguous_format
    return suggest_memory_format(x)


def fused_output_shape(x: Tensor, oup: int, stride: int):
    """N x oup x H' x W' for the primary conv's kernel_size 1 (no padding) and ``stride``."""
    n, _, h, w = x.shape
    return (n, oup, (h - 1) // stride + 1, (w - 1) // stride + 1)


def empty_output(x: Tensor, oup: int, stride: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialized output with eager's memory format (also the fake implementation of the ops);
    ``dtype`` defaults to x's."""
    return torch.empty(fused_output_shape(x, oup, stride), dtype=dtype or x.dtype, device=x.device,
                       memory_format=output_memory_format(x))
