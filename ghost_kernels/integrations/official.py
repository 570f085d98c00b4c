"""The official GhostNet code's ``GhostModule`` and timm's, and whatever has their structure.

``primary_conv`` and ``cheap_operation``, each ``Sequential(Conv2d, BatchNorm2d, act)`` (or, deployed
with BN folded into a biased conv, ``Sequential(Conv2d, act)``), an ``oup`` (official) or ``out_chs``
(timm) attribute, and no other submodule with parameters or buffers: GhostNet v1's function. That
covers subclasses, renamed copies, and GhostNetV2's ``GhostModuleV2`` in its ``"original"`` mode.
They become :class:`ghost_kernels.GhostModule` (same submodules, same state_dict keys).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..core.structure import structure_problems
from ..module import GhostModule
from . import Match, adopt, class_names


def match(module: nn.Module) -> Optional[Match]:
    if not (hasattr(module, "primary_conv") and hasattr(module, "cheap_operation")):
        return None
    names, kind = class_names(module), type(module).__name__
    if any(n.startswith(("GhostModuleV2", "GhostModuleV3")) for n in names):
        if not any(n.startswith("GhostModuleV2") for n in names) or getattr(module, "mode", None) != "original":
            return None   # timm.py: the attention gate, and GhostNetV3
    problems = structure_problems(module)
    if problems:
        return Match(kind, reason=f"{kind}: " + "; ".join(problems))
    extra = [name for name, child in module.named_children() if name not in ("primary_conv", "cheap_operation")
             and (any(True for _ in child.parameters()) or any(True for _ in child.buffers()))]
    if extra:
        return Match(kind, reason=f"{kind}: extra submodules with parameters ({', '.join(extra)}) change its "
                                  f"function")
    return Match(kind, build=_build)


def _build(module: nn.Module, backend: str) -> GhostModule:
    return adopt(GhostModule.from_module(module, backend), module, [])
