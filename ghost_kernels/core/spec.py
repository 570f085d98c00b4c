"""Static description of a Ghost module and the GhostNet 1.0x shape table.

A :class:`GhostSpec` holds everything about a Ghost module that is not a tensor: the channel counts,
kernel sizes, stride and activation. Backends decide from it (plus the input tensor) whether they can
run, and the tests and benchmarks enumerate GhostNet's modules with :func:`ghostnet_100_modules`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

# The activations the fused kernels know (nn.ReLU, nn.SiLU, nn.Hardswish, identity); "other" marks
# any other activation module: only the PyTorch path runs it.
ACTIVATIONS = ("relu", "silu", "hardswish", "none")


@dataclass(frozen=True)
class GhostSpec:
    """Shape and options of one Ghost module (GhostNet, arXiv 1911.11907).

    ``m = ceil(oup / ratio)`` intrinsic channels come from a ``kernel_size`` x ``kernel_size`` conv with
    ``stride``; ``m * (ratio - 1)`` ghost channels come from a ``dw_size`` x ``dw_size`` conv with
    channel multiplier ``ratio - 1``; the output is the first ``oup`` channels of their concatenation.
    ``act`` is one of :data:`ACTIVATIONS` (``"relu"``, ``"silu"``, ``"hardswish"``, ``"none"``);
    ``"other"`` marks a module with an activation that only the PyTorch path can run. Whether the convs
    have biases and BatchNorms is a property of the tensors (:class:`GhostParams`), not of the spec.
    """

    inp: int
    oup: int
    kernel_size: int = 1
    ratio: int = 2
    dw_size: int = 3
    stride: int = 1
    act: str = "relu"

    def __post_init__(self):
        for name in ("inp", "oup", "kernel_size", "ratio", "dw_size", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"GhostSpec.{name} must be an int, got {type(value).__name__}")
        if self.inp < 1 or self.oup < 1:
            raise ValueError(f"GhostSpec: inp and oup must be >= 1, got inp={self.inp}, oup={self.oup}")
        if self.ratio < 2:
            raise ValueError(f"GhostSpec.ratio must be >= 2, got {self.ratio}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"GhostSpec.kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.dw_size < 1 or self.dw_size % 2 == 0:
            raise ValueError(f"GhostSpec.dw_size must be odd and >= 1, got {self.dw_size}")
        if self.stride < 1:
            raise ValueError(f"GhostSpec.stride must be >= 1, got {self.stride}")
        if self.act not in ACTIVATIONS + ("other",):
            raise ValueError(f"GhostSpec.act must be one of {ACTIVATIONS + ('other',)}, got {self.act!r}")

    @classmethod
    def from_op_args(cls, inp: int, oup: int, kernel_size: int, stride: int, ratio: int, dw_size: int,
                     act: str) -> "GhostSpec":
        """The spec described by the inference ops' arguments."""
        return cls(inp, oup, kernel_size, ratio, dw_size, stride, act)

    @property
    def m(self) -> int:
        """Intrinsic channels: outputs of the primary conv."""
        return math.ceil(self.oup / self.ratio)

    @property
    def new(self) -> int:
        """Ghost channels made by the cheap operation (before the slice to ``oup``)."""
        return self.m * (self.ratio - 1)

    @property
    def ghost_kept(self) -> int:
        """Ghost channels that survive the slice ``[:, :oup]``."""
        return self.oup - self.m

    def out_hw(self, h: int, w: int) -> Tuple[int, int]:
        """Spatial size of the output for an ``h`` x ``w`` input."""
        pad = self.kernel_size // 2
        ho = (h + 2 * pad - self.kernel_size) // self.stride + 1
        wo = (w + 2 * pad - self.kernel_size) // self.stride + 1
        return ho, wo


# GhostNet 1.0x stage table (paper Table 1, timm ``ghostnet.py``): per bottleneck
# (dw kernel, expansion channels, output channels, SE ratio, stride).
GHOSTNET_V1_CFGS = [
    [(3, 16, 16, 0, 1)],
    [(3, 48, 24, 0, 2)],
    [(3, 72, 24, 0, 1)],
    [(5, 72, 40, 0.25, 2)],
    [(5, 120, 40, 0.25, 1)],
    [(3, 240, 80, 0, 2)],
    [(3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1),
     (3, 672, 112, 0.25, 1)],
    [(5, 672, 160, 0.25, 2)],
    [(5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)],
]


def _make_divisible(v: float, divisor: int = 4) -> int:
    # Same rounding as the official code and timm: nearest multiple, never 10% below v.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class ModuleShape:
    """One Ghost module of a GhostNet at a given input size: its spec and its input's H x W."""

    name: str
    spec: GhostSpec
    h: int
    w: int


def ghostnet_100_modules(image_size: int = 224, width: float = 1.0) -> List[ModuleShape]:
    """All 32 Ghost modules of GhostNet (``width`` 1.0 = ghostnet_100) in network order.

    In each bottleneck, ``ghost1`` (ReLU) expands at the bottleneck's input resolution; the optional
    stride-2 depthwise conv sits between ``ghost1`` and ``ghost2``; ``ghost2`` (no activation) projects
    at the output resolution.
    """
    in_chs = _make_divisible(16 * width, 4)
    size = (image_size + 1) // 2  # stem conv has stride 2
    out: List[ModuleShape] = []
    for stage_idx, stage in enumerate(GHOSTNET_V1_CFGS):
        for block_idx, (k, exp, c, _se, s) in enumerate(stage):
            prefix = f"blocks.{stage_idx}.{block_idx}"
            mid = _make_divisible(exp * width, 4)
            oc = _make_divisible(c * width, 4)
            out.append(ModuleShape(f"{prefix}.ghost1", GhostSpec(in_chs, mid, act="relu"), size, size))
            if s > 1:
                size = (size + 2 * (k // 2) - k) // s + 1
            out.append(ModuleShape(f"{prefix}.ghost2", GhostSpec(mid, oc, act="none"), size, size))
            in_chs = oc
    return out


def distinct_ghostnet_100_specs(image_size: int = 224) -> List[ModuleShape]:
    """The distinct (spec, resolution) pairs among :func:`ghostnet_100_modules`, first occurrence kept."""
    seen, out = set(), []
    for shape in ghostnet_100_modules(image_size):
        key = (shape.spec, shape.h, shape.w)
        if key not in seen:
            seen.add(key)
            out.append(shape)
    return out
