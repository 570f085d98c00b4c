"""Ultralytics (YOLOv8 / YOLO11 ghost models), YOLOv5 and YOLOv7 ``GhostConv``.

``GhostConv(c1, c2, k=1, s=1, g=1, act=True)``: ``c_ = c2 // 2`` (an odd ``c2`` gives ``c2 - 1``
channels: no slice), ``cv1 = Conv(c1, c_, k, s)``, ``cv2 = Conv(c_, c_, 5, 1, groups=c_)`` (a 5 x 5
depthwise); ``Conv`` is ``conv`` (no bias) + ``bn`` + ``act``, SiLU by default (``Conv.default_act``,
which a yaml's ``activation:`` can change), ``nn.Identity`` for ``act=False``; the downsampling
GhostConvs of the ghost yamls have a 3 x 3 stride-2 primary conv. After ``model.fuse()`` each ``Conv``
has a biased conv, no ``bn``, and ``forward = forward_fuse``. ``forward``: ``y = cv1(x); cat(y, cv2(y))``.

It becomes :class:`FusedGhostConv`, which keeps ``cv1`` and ``cv2`` (the same ``Conv`` objects: the
state_dict keys stay, ``model.fuse()`` still finds and fuses them, and the fused module reads
whichever form they are in at each call) and Ultralytics' bookkeeping attributes (``f``, ``i``,
``type``, ``np``). Matched by structure and class name; ultralytics is never imported.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.structure import layer_problems
from ..module import FusedGhost
from . import Match, adopt, class_names


def _conv_layers(conv_module: nn.Module):
    """(conv, bn or None, act) of an Ultralytics ``Conv``, or None if it is not one."""
    mods = conv_module._modules if isinstance(conv_module, nn.Module) else {}
    if type(mods.get("conv")) is not nn.Conv2d or "act" not in mods:
        return None
    bn = mods.get("bn")
    if bn is not None and type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return None
    return mods["conv"], bn, mods["act"]


class FusedGhostConv(FusedGhost):
    """Ultralytics' ``GhostConv`` with the fused kernels (same ``cv1``/``cv2`` submodules and keys)."""

    def ghost_layers(self):
        return (*_conv_layers(self._modules["cv1"]), *_conv_layers(self._modules["cv2"]))

    def ghost_oup(self) -> int:
        return self.cv1.conv.out_channels + self.cv2.conv.out_channels

    def forward_eager(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


def match(module: nn.Module) -> Optional[Match]:
    if "GhostConv" not in class_names(module) or not all(hasattr(module, n) for n in ("cv1", "cv2")):
        return None
    kind = type(module).__name__
    parts = _conv_layers(module.cv1), _conv_layers(module.cv2)
    if None in parts:
        return Match(kind, reason=f"{kind}: cv1/cv2 are not Conv(conv, bn, act) modules")
    (conv1, bn1, act1), (conv2, bn2, act2) = parts
    oup = conv1.out_channels + conv2.out_channels
    problems = layer_problems(conv1, bn1, conv2, bn2, oup)
    if conv2.out_channels != conv1.out_channels:
        problems.append("cv2 does not make one ghost channel per intrinsic channel")
    extra = [n for n, c in module.named_children() if n not in ("cv1", "cv2") and any(True for _ in c.parameters())]
    if extra:
        problems.append(f"extra submodules with parameters ({', '.join(extra)})")
    if problems:
        return Match(kind, reason=f"{kind}: " + "; ".join(problems))
    return Match(kind, build=_build)


def _build(module: nn.Module, backend: str) -> FusedGhostConv:
    new = FusedGhostConv.__new__(FusedGhostConv)
    nn.Module.__init__(new)
    new.backend = backend
    return adopt(new, module, ["cv1", "cv2"])
