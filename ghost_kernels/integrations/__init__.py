"""What ``convert()`` matches, one file per codebase whose Ghost modules users run.

Each file holds a ``match(module) -> Optional[Match]``: None when ``module`` is not that codebase's
Ghost module; otherwise either a way to build the fused module (sharing the original's submodules,
so the state_dict keys stay the same) or the reason it is left alone. ``convert.py`` asks them in
:data:`MATCHERS` order; the first answer wins.

* ``official.py``: the official GhostNet code and timm's ``GhostModule`` (and anything with their
  structure: ``primary_conv`` / ``cheap_operation``, each ``Sequential(Conv2d, BatchNorm2d, act)``,
  or the deployed ``Sequential(Conv2d, act)``), GhostNetV2's module in its ``"original"`` mode;
* ``timm.py``: GhostNetV2's module with its attention (DFC) gate, GhostNetV3's deployed module
  (timm and the official code);
* ``ultralytics.py``: Ultralytics / YOLOv5 / YOLOv7 ``GhostConv``, with BatchNorm or after ``fuse()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from torch import nn

from ..module import FusedGhost


@dataclass
class Match:
    """A module some codebase's Ghost module: ``kind`` names it (for the report); ``build(module,
    backend)`` makes the fused module, or ``reason`` says why it stays as it is."""

    kind: str
    build: Optional[Callable[[nn.Module, str], FusedGhost]] = None
    reason: Optional[str] = None


# nn.Module's own bookkeeping: never copied from the original module to the fused one.
_MODULE_INTERNALS = {"training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules",
                     "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks", "_backward_pre_hooks", "_backward_hooks",
                     "_is_full_backward_hook", "forward"}
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs")


def adopt(new: FusedGhost, old: nn.Module, children: List[str]) -> FusedGhost:
    """Make ``new`` stand where ``old`` stood: share ``children`` (so the parameters, buffers and
    state_dict keys are the same objects and names), copy the plain attributes codebases set on their
    modules (Ultralytics' ``f``/``i``/``type``, timm's ``out_chs``, ...), the forward hooks and the
    train/eval mode."""
    for name in children:
        setattr(new, name, getattr(old, name))
    for key, value in old.__dict__.items():
        if key not in _MODULE_INTERNALS and not key.startswith("_") and key not in new.__dict__ \
                and not isinstance(getattr(type(new), key, None), property):
            new.__dict__[key] = value
    for key in _HOOKS:
        if key in old.__dict__:
            new.__dict__[key] = type(old.__dict__[key])(old.__dict__[key])
    new.train(old.training)
    return new


def class_names(module: nn.Module) -> List[str]:
    return [c.__name__ for c in type(module).__mro__]
