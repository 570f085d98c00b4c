"""The submodule structure of a Ghost module, read without running it.

A Ghost module is six layers: the primary conv, its BatchNorm, its activation; the cheap (depthwise)
conv, its BatchNorm, its activation. Codebases name and nest them differently (official and timm:
``primary_conv`` / ``cheap_operation``, each ``Sequential(Conv2d, BatchNorm2d, act)``; a deployed
module has ``Sequential(Conv2d(bias=True), act)``; Ultralytics: ``cv1`` / ``cv2``, each
``Conv(conv, bn, act)``); ``ghost_kernels/integrations/`` reads each codebase's. Here, what they
share: :func:`layer_problems` (do six layers compute a Ghost module?), :func:`spec_from_layers`, the
activation's kind, and the official structure itself (:func:`ghost_layers`, :func:`spec_of`), which
:class:`ghost_kernels.GhostModule` keeps.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

from torch import nn

from .spec import GhostSpec

# Activation modules the kernels know, by exact type (a subclass may change the function).
_ACT_KINDS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Identity: "none"}
_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def act_kind(module: nn.Module) -> str:
    """``"relu"``, ``"silu"``, ``"hardswish"``, ``"none"`` or ``"other"`` for an activation submodule."""
    kind = _ACT_KINDS.get(type(module))
    if kind is not None:
        return kind
    if type(module) is nn.Sequential and len(module) == 0:   # the official code's "no activation"
        return "none"
    return "other"


def layer_problems(conv1: nn.Module, bn1: Optional[nn.Module], conv2: nn.Module, bn2: Optional[nn.Module],
                   oup: Optional[int]) -> List[str]:
    """Why six layers (activations aside) do not compute a Ghost module with ``oup`` outputs."""
    if type(conv1) is not nn.Conv2d or type(conv2) is not nn.Conv2d:
        return ["the convs are not nn.Conv2d"]
    for name, bn, conv in (("primary", bn1, conv1), ("cheap", bn2, conv2)):
        if bn is not None and (type(bn) not in _BATCHNORMS or bn.num_features != conv.out_channels):
            return [f"the {name} conv's normalization is not a BatchNorm2d over its outputs"]
    if not isinstance(oup, int):
        return ["no integer oup/out_chs attribute"]
    problems = []
    m, k = conv1.out_channels, conv1.kernel_size[0]
    if conv1.groups != 1 or conv1.kernel_size != (k, k) or k % 2 == 0 or conv1.padding != (k // 2, k // 2) \
            or conv1.dilation != (1, 1) or conv1.stride[0] != conv1.stride[1] or conv1.padding_mode != "zeros":
        problems.append("primary conv is not a square, dense, 'same'-padded conv of odd size")
    d = conv2.kernel_size[0]
    if conv2.in_channels != m or conv2.groups != m or conv2.out_channels % m != 0 or conv2.out_channels == 0 \
            or conv2.kernel_size != (d, d) or d % 2 == 0 or conv2.padding != (d // 2, d // 2) \
            or conv2.stride != (1, 1) or conv2.dilation != (1, 1) or conv2.padding_mode != "zeros":
        problems.append("cheap operation is not a 'same'-padded depthwise conv over the intrinsic channels")
    elif m != math.ceil(oup / (conv2.out_channels // m + 1)) or oup > m * (conv2.out_channels // m + 1):
        problems.append("channel counts do not match oup")
    return problems


def spec_from_layers(layers: Tuple[nn.Module, ...], oup: int) -> GhostSpec:
    """The :class:`GhostSpec` of six layers (see :func:`layer_problems`)."""
    conv1, _, act1, conv2, _, act2 = layers
    a1, a2 = act_kind(act1), act_kind(act2)
    return GhostSpec(inp=conv1.in_channels, oup=oup, kernel_size=conv1.kernel_size[0],
                     ratio=conv2.out_channels // conv1.out_channels + 1, dw_size=conv2.kernel_size[0],
                     stride=conv1.stride[0], act=a1 if a1 == a2 else "other")


def official_layers(seq: nn.Module) -> Optional[Tuple[nn.Module, Optional[nn.Module], nn.Module]]:
    """(conv, BatchNorm or None, activation) of ``Sequential(Conv2d, BatchNorm2d, act)`` or of a
    deployed ``Sequential(Conv2d, act)``; None for anything else."""
    if not isinstance(seq, nn.Sequential):
        return None
    if len(seq) == 3 and isinstance(seq[1], _BATCHNORMS):
        return seq[0], seq[1], seq[2]
    if len(seq) == 2 and not isinstance(seq[1], _BATCHNORMS):
        return seq[0], None, seq[1]
    return None


def official_oup(module: nn.Module) -> Optional[int]:
    oup = getattr(module, "oup", getattr(module, "out_chs", None))
    return oup if isinstance(oup, int) and not isinstance(oup, bool) else None


def structure_problems(module: nn.Module) -> list:
    """Why ``module`` is not a Ghost module with the official/timm structure (empty list: it is)."""
    parts = []
    for name in ("primary_conv", "cheap_operation"):
        found = official_layers(getattr(module, name, None))
        if found is None:
            return [f"{name} is not Sequential(Conv2d, BatchNorm2d, act) (or a deployed Sequential(Conv2d, act))"]
        parts.append(found)
    (conv1, bn1, _), (conv2, bn2, _) = parts
    return layer_problems(conv1, bn1, conv2, bn2, official_oup(module))


def ghost_layers(module: nn.Module) -> tuple:
    """(primary conv, its BatchNorm or None, its activation, cheap conv, its BatchNorm or None, its
    activation) of a module with the official/timm structure, or of a module of this package (its
    own ``ghost_layers()``); a clear TypeError for anything else."""
    if hasattr(module, "ghost_layers"):
        return tuple(module.ghost_layers())
    problems = structure_problems(module)
    if problems:
        raise TypeError(f"{type(module).__name__} does not have the Ghost module structure (primary_conv and "
                        f"cheap_operation, each Sequential(Conv2d, BatchNorm2d, act), and an integer oup or "
                        f"out_chs): " + "; ".join(problems))
    return (*official_layers(module.primary_conv), *official_layers(module.cheap_operation))


def spec_of(module: nn.Module) -> GhostSpec:
    """The :class:`GhostSpec` of a Ghost module with the official/timm structure (or of a module of
    this package, whose ``ghost_spec()`` says it: e.g. a deployed GhostNetV3 module's output is not
    sliced to its ``out_chs``)."""
    if hasattr(module, "ghost_spec"):
        return module.ghost_spec()
    return spec_from_layers(ghost_layers(module), official_oup(module))
