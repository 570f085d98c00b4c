"""timm's (and the official code's) GhostNetV2 and GhostNetV3 modules.

* **GhostNetV2** ``GhostModuleV2`` with its attention (timm's always; the official code's
  ``mode="attn"``): ``out[:, :oup] * interpolate(sigmoid(short_conv(avg_pool2d(x, 2, 2))), size=out's
  H x W, mode="nearest")``, ``short_conv`` = conv k x k + BN, (1, 5) depthwise + BN, (5, 1) depthwise
  + BN. It becomes :class:`FusedGhostV2`: the quarter-resolution gate branch runs in PyTorch (its own
  submodules), the Ghost module fused, the gate multiplied into the kernel's store.
* **GhostNetV3** ``GhostModuleV3`` after ``reparameterize()`` / ``switch_to_deploy()`` (timm's
  ``reparameterize_model``): ``primary_conv = Sequential(Conv2d(bias=True), act)``,
  ``cheap_operation = Sequential(Conv2d(bias=True), act)``, no BatchNorm; without its "shortcut" mode
  it returns the concatenation unsliced. It becomes :class:`FusedGhostV3`. Its training form
  (re-parameterizable branches) is reported: re-parameterize first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.structure import official_layers, structure_problems
from ..module import FusedGhost
from . import Match, adopt, class_names


class FusedGhostV2(FusedGhost):
    """GhostNetV2's attention Ghost module with the fused kernels; same submodules and state_dict keys
    as timm's ``GhostModuleV2`` (``primary_conv``, ``cheap_operation``, ``short_conv``, ``gate_fn``)."""

    def ghost_layers(self):
        return (*official_layers(self.primary_conv), *official_layers(self.cheap_operation))

    def ghost_oup(self) -> int:
        return self.out_chs

    def ghost_gate(self, x: Tensor) -> Optional[Tensor]:
        return self.gate_fn(self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2)))

    @property
    def gated(self) -> bool:
        return True

    def _gate_requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.short_conv.parameters())

    def forward_eager(self, x: Tensor) -> Tensor:
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.out_chs, :, :] * F.interpolate(self.gate_fn(res), size=(out.shape[-2], out.shape[-1]),
                                                           mode="nearest")


class FusedGhostV3(FusedGhost):
    """GhostNetV3's deployed Ghost module with the fused kernels; same submodules and state_dict keys
    as the deployed ``GhostModuleV3``. Unsliced output (``m * ratio`` channels) unless in "shortcut"
    mode, which slices to ``out_chs`` and multiplies GhostNetV2's gate."""

    def ghost_layers(self):
        return (*official_layers(self.primary_conv), *official_layers(self.cheap_operation))

    def ghost_oup(self) -> int:
        if self.mode == "shortcut":
            return self.out_chs
        return self.primary_conv[0].out_channels + self.cheap_operation[0].out_channels

    def ghost_gate(self, x: Tensor) -> Optional[Tensor]:
        if self.mode != "shortcut":
            return None
        return self.gate_fn(self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2)))

    @property
    def gated(self) -> bool:
        return self.mode == "shortcut"

    def _gate_requires_grad(self) -> bool:
        return self.gated and any(p.requires_grad for p in self.short_conv.parameters())

    def forward_eager(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        if self.mode != "shortcut":
            return out
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        return out[:, :self.out_chs, :, :] * F.interpolate(self.gate_fn(res), size=(out.shape[-2], out.shape[-1]),
                                                           mode="nearest")


def _short_conv_problems(short_conv: nn.Module, inp: int, oup: int, primary: nn.Conv2d) -> Optional[str]:
    """Why ``short_conv`` is not V2's gate branch (k x k conv + BN, (1,5) dw + BN, (5,1) dw + BN)."""
    layers = list(short_conv) if isinstance(short_conv, nn.Sequential) else []
    if len(layers) != 6 or any(type(b) is not nn.BatchNorm2d for b in layers[1::2]) \
            or any(type(c) is not nn.Conv2d for c in layers[0::2]):
        return "short_conv is not Sequential(conv, BN, (1,5) depthwise, BN, (5,1) depthwise, BN)"
    c0, c1, c2 = layers[0::2]
    if (c0.in_channels, c0.out_channels) != (inp, oup) or c1.kernel_size != (1, 5) or c2.kernel_size != (5, 1):
        return "short_conv's shapes are not GhostNetV2's"
    return None


def match(module: nn.Module) -> Optional[Match]:
    names, kind = class_names(module), type(module).__name__
    if any(n.startswith("GhostModuleV3") for n in names):
        return _match_v3(module, kind)
    if any(n.startswith("GhostModuleV2") for n in names) and getattr(module, "mode", None) != "original":
        return _match_v2(module, kind)
    return None


def _gate_ok(module: nn.Module, oup: int) -> Optional[str]:
    if type(getattr(module, "gate_fn", None)) is not nn.Sigmoid:
        return "its gate function is not nn.Sigmoid"
    return _short_conv_problems(getattr(module, "short_conv", None), module.primary_conv[0].in_channels, oup,
                                module.primary_conv[0])


def _match_v2(module: nn.Module, kind: str) -> Match:
    problems = structure_problems(module)
    if problems:
        return Match(kind, reason=f"{kind}: " + "; ".join(problems))
    oup = getattr(module, "out_chs", getattr(module, "oup", None))
    why = _gate_ok(module, oup)
    if why:
        return Match(kind, reason=f"{kind} (attention): {why}")
    return Match(f"{kind} (attention)", build=lambda m, backend: _fused(FusedGhostV2, m, backend, oup,
                                                                        ["primary_conv", "cheap_operation",
                                                                         "short_conv", "gate_fn"]))


def _match_v3(module: nn.Module, kind: str) -> Match:
    if not getattr(module, "infer_mode", False) or official_layers(getattr(module, "primary_conv", None)) is None:
        return Match(kind, reason=f"{kind}: GhostNetV3's training form (re-parameterizable branches): "
                                  f"re-parameterize it first (timm.utils.model.reparameterize_model(model), or "
                                  f"switch_to_deploy()), then convert")
    mode = getattr(module, "mode", "original")
    pconv, cconv = module.primary_conv[0], module.cheap_operation[0]
    oup = pconv.out_channels + cconv.out_channels if mode != "shortcut" else module.out_chs
    shim = _Shim(module.primary_conv, module.cheap_operation, oup)
    problems = structure_problems(shim)
    if not problems and mode == "shortcut":
        why = _gate_ok(module, oup)
        problems = [why] if why else []
    if problems:
        return Match(kind, reason=f"{kind} (deployed): " + "; ".join(problems))
    children = ["primary_conv", "cheap_operation"] + (["short_conv", "gate_fn"] if mode == "shortcut" else [])
    return Match(f"{kind} (deployed)", build=lambda m, backend: _fused(FusedGhostV3, m, backend, None, children,
                                                                       mode=mode))


class _Shim(nn.Module):
    """The official structure over V3's deployed submodules, to check them (its output is unsliced)."""

    def __init__(self, primary_conv, cheap_operation, oup):
        super().__init__()
        self.primary_conv, self.cheap_operation, self.oup = primary_conv, cheap_operation, oup


def _fused(cls, module: nn.Module, backend: str, oup: Optional[int], children, mode: Optional[str] = None):
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.backend = backend
    adopt(new, module, children)
    if oup is not None:
        new.out_chs = oup
    if mode is not None:
        new.mode = mode
    return new

