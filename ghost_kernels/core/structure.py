"""The official/timm submodule structure of a Ghost module, read without running it.

``primary_conv`` and ``cheap_operation``, each ``Sequential(Conv2d, BatchNorm2d, act)``, plus an
``oup``/``out_chs`` attribute: the official GhostNet code, timm's ``GhostModule`` (and GhostNetV2's in
its ``"original"`` mode) and :class:`ghost_kernels.GhostModule` share it. Here: the activation's kind,
the :class:`~ghost_kernels.core.spec.GhostSpec` of such a module, and why a module does not have the
structure (for ``convert()``).
"""
from __future__ import annotations

import math

from torch import nn

from .spec import GhostSpec


def act_kind(module: nn.Module) -> str:
    """``"relu"``, ``"none"`` or ``"other"`` for an activation submodule."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.Identity or (type(module) is nn.Sequential and len(module) == 0):
        return "none"
    return "other"


def structure_problems(module: nn.Module) -> list:
    """Why ``module`` is not a Ghost module with the official/timm structure (empty list: it is)."""
    problems = []
    for name in ("primary_conv", "cheap_operation"):
        seq = getattr(module, name, None)
        if not isinstance(seq, nn.Sequential) or len(seq) != 3:
            return [f"{name} is not Sequential(Conv2d, BatchNorm2d, act)"]
        if type(seq[0]) is not nn.Conv2d or type(seq[1]) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
            return [f"{name} is not Sequential(Conv2d, BatchNorm2d, act)"]
    oup = getattr(module, "oup", getattr(module, "out_chs", None))
    if not isinstance(oup, int):
        return ["no integer oup/out_chs attribute"]
    pconv, cconv = module.primary_conv[0], module.cheap_operation[0]
    m = pconv.out_channels
    k = pconv.kernel_size[0]
    if pconv.bias is not None or cconv.bias is not None:
        problems.append("a conv has a bias")
    if pconv.groups != 1 or pconv.kernel_size != (k, k) or pconv.padding != (k // 2, k // 2) \
            or pconv.dilation != (1, 1) or pconv.stride[0] != pconv.stride[1] or pconv.padding_mode != "zeros":
        problems.append("primary conv is not a square, dense, 'same'-padded conv")
    d = cconv.kernel_size[0]
    if cconv.in_channels != m or cconv.groups != m or cconv.out_channels % m != 0 \
            or cconv.kernel_size != (d, d) or cconv.padding != (d // 2, d // 2) or cconv.stride != (1, 1) \
            or cconv.dilation != (1, 1) or cconv.padding_mode != "zeros":
        problems.append("cheap operation is not a 'same'-padded depthwise conv over the intrinsic channels")
    elif m != math.ceil(oup / (cconv.out_channels // m + 1)):
        problems.append("channel counts do not match oup")
    return problems


def ghost_layers(module: nn.Module) -> tuple:
    """(primary conv, its BatchNorm, its activation, cheap conv, its BatchNorm, its activation) of a
    module with the official/timm structure, or of a module of this package (its own
    ``ghost_layers()``); a clear TypeError for anything else."""
    if hasattr(module, "ghost_layers"):
        return tuple(module.ghost_layers())
    problems = structure_problems(module)
    if problems:
        raise TypeError(f"{type(module).__name__} does not have the Ghost module structure (primary_conv and "
                        f"cheap_operation, each Sequential(Conv2d, BatchNorm2d, act), and an integer oup or "
                        f"out_chs): " + "; ".join(problems))
    return (*module.primary_conv, *module.cheap_operation)


def spec_of(module: nn.Module) -> GhostSpec:
    """The :class:`GhostSpec` of a Ghost module with the official/timm structure (or of any module
    with ``ghost_layers()``, as the package's fused modules have)."""
    pconv, _, act1, cconv, _, act2 = ghost_layers(module)
    a1, a2 = act_kind(act1), act_kind(act2)
    return GhostSpec(
        inp=pconv.in_channels,
        oup=getattr(module, "oup", getattr(module, "out_chs", None)),
        kernel_size=pconv.kernel_size[0],
        ratio=cconv.out_channels // pconv.out_channels + 1,
        dw_size=cconv.kernel_size[0],
        stride=pconv.stride[0],
        act=a1 if a1 == a2 else "other",
    )
