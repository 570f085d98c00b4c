"""``GhostModule``: a drop-in for the official and timm Ghost modules that runs the fused kernels.

Same constructor (either signature), same submodules, same state_dict keys: official and timm
checkpoints load with ``strict=True``. The forward is a flat branch: validate, choose a backend
(``dispatch.choose``), then either the module's own submodules (``"torch"``) or the chosen backend,
called once with the module's parameters (``GhostParams.from_module``). Nothing is cached: every
call reads the current parameters and buffers, whatever edited them.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import dispatch
from .core import batch_stats, reference
from .core.backend import Request
from .core.params import GhostParams
from .core.spec import GhostSpec
from .core.structure import spec_of, structure_problems

_UNSET = object()


def _make_act(act_layer, relu: bool) -> nn.Module:
    """The official code's ``ReLU(inplace=True)`` / empty ``Sequential()``, or timm's ``act_layer(inplace=True)``."""
    if act_layer is _UNSET:
        return nn.ReLU(inplace=True) if relu else nn.Sequential()
    if act_layer is None:
        return nn.Identity()
    try:
        return act_layer(inplace=True)
    except TypeError:  # activations without an inplace argument (nn.GELU, ...)
        return act_layer()


class GhostModule(nn.Module):
    """Ghost module (GhostNet, arXiv 1911.11907) with fused GPU kernels.

    Constructed like the official module, ``GhostModule(inp, oup, kernel_size=1, ratio=2, dw_size=3,
    stride=1, relu=True)``, or like timm's, ``GhostModule(in_chs, out_chs, kernel_size=1, ratio=2,
    dw_size=3, stride=1, act_layer=nn.ReLU, device=None, dtype=None)``. Extra keyword: ``backend``,
    ``"auto"`` (default) or any name of :func:`ghost_kernels.available_backends`.

    Equivalent PyTorch (this is exactly what ``backend="torch"`` runs, so SyncBatchNorm from
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, forward hooks and custom activations behave as in
    the original)::

        x1 = self.primary_conv(x)           # Conv2d(inp, m, k, stride, k//2) -> BN -> act
        x2 = self.cheap_operation(x1)       # Conv2d(m, m*(ratio-1), d, 1, d//2, groups=m) -> BN -> act
        return torch.cat([x1, x2], 1)[:, :oup]

    In eval mode under ``torch.no_grad()``/``torch.inference_mode()`` the chosen inference backend
    runs with BN folded from the current parameters and buffers on every call (nothing is cached, so
    no in-place edit can leave a stale fold behind). In train mode, or
    whenever gradients are needed, the triton backend runs the training ops (``train_ops.py``):
    batch statistics and running-statistics updates exactly as ``nn.BatchNorm2d``, a fused backward,
    and, after ``nn.SyncBatchNorm.convert_sync_batchnorm``, batch statistics synchronized over the
    SyncBatchNorm's process group. ``explain(x)`` says which backend runs ``x`` and why.
    """

    def __init__(self, inp: Optional[int] = None, oup: Optional[int] = None, kernel_size: int = 1,
                 ratio: int = 2, dw_size: int = 3, stride: int = 1, relu=True, *,
                 act_layer=_UNSET, device=None, dtype=None, backend: str = "auto",
                 in_chs: Optional[int] = None, out_chs: Optional[int] = None):
        super().__init__()
        inp = in_chs if inp is None else inp
        oup = out_chs if oup is None else oup
        if inp is None or oup is None:
            raise TypeError("GhostModule needs inp (in_chs) and oup (out_chs)")
        if not isinstance(relu, bool):  # timm passes act_layer as the 7th positional argument
            act_layer, relu = relu, True
        dd = {"device": device, "dtype": dtype}
        spec = GhostSpec(inp, oup, kernel_size, ratio, dw_size, stride)  # validates the arguments
        self.oup = oup
        self.backend = dispatch.check_backend_name(backend)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, spec.m, kernel_size, stride, kernel_size // 2, bias=False, **dd),
            nn.BatchNorm2d(spec.m, **dd),
            _make_act(act_layer, relu),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(spec.m, spec.new, dw_size, 1, dw_size // 2, groups=spec.m, bias=False, **dd),
            nn.BatchNorm2d(spec.new, **dd),
            _make_act(act_layer, relu),
        )

    @property
    def out_chs(self) -> int:
        """timm's name for ``oup``."""
        return self.oup

    @property
    def spec(self) -> GhostSpec:
        return spec_of(self)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "GhostModule":
        """A GhostModule that shares ``module``'s submodules (weights, buffers, train/eval mode)."""
        problems = structure_problems(module)
        if problems:
            raise ValueError(f"{type(module).__name__} is not a convertible Ghost module: " + "; ".join(problems))
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.oup = getattr(module, "oup", getattr(module, "out_chs", None))
        new.backend = dispatch.check_backend_name(backend)
        new.primary_conv = module.primary_conv
        new.cheap_operation = module.cheap_operation
        new.train(module.training)
        return new

    def params(self) -> GhostParams:
        """This module's parameters and buffers (shared, not copied) as one bundle."""
        return GhostParams.from_module(self, self.spec)

    def sync_batch_stats(self, process_group=None, enabled: bool = True) -> "GhostModule":
        """Synchronize the train-mode batch statistics of both BatchNorms over ``process_group``
        (default: the whole world), as ``nn.SyncBatchNorm`` would, while they stay ``nn.BatchNorm2d``
        (DistributedDataParallel accepts those on any device; SyncBatchNorm it accepts on GPUs only).
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` on a converted model works too."""
        self._sync_stats, self._sync_group = enabled, process_group
        return self

    def _sync(self) -> Tuple[Optional[int], Optional[str]]:
        """(process group index, None) when train-mode batch statistics are synchronized over more than
        one rank (SyncBatchNorm or :meth:`sync_batch_stats`), (None, why not) when they cannot be
        (only one BN is a SyncBatchNorm), else (None, None)."""
        if not self.training:
            return None, None
        bn1, bn2 = self.primary_conv[1], self.cheap_operation[1]
        synced = isinstance(bn1, nn.SyncBatchNorm), isinstance(bn2, nn.SyncBatchNorm)
        if getattr(self, "_sync_stats", False):
            group = self._sync_group
        elif any(synced):
            if not all(synced) or bn1.process_group is not bn2.process_group:
                return None, "one BatchNorm is a SyncBatchNorm and the other is not (or another group)"
            group = bn1.process_group
        else:
            return None, None
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return None, None
        return batch_stats.register_group(group), None

    def _request(self, x: Tensor) -> Request:
        params = self.params()
        dispatch.validate_input(x, params)
        return Request.make(x, params, self.training, *self._sync())

    def explain(self, x: Tensor) -> str:
        """Which backend runs ``x`` now (given train/eval mode and grad mode), the measurement behind
        the choice, and why the others don't."""
        return dispatch.explain(self.backend, self._request(x))

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # TorchScript records the PyTorch path (see __prepare_scriptable__)
            _warn_torchscript()
            return self._forward_eager(x)
        req = self._request(x)
        backend = dispatch.choose(self.backend, req).backend
        if backend is reference.BACKEND:
            return self._forward_eager(x)
        return backend.forward(x, req)

    def _forward_eager(self, x: Tensor) -> Tensor:
        """The "torch" backend: the official module's forward, through the submodules themselves."""
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` scripts the official module's forward (the PyTorch path, sharing this
        module's submodules): TorchScript cannot call the fused kernels. For fused kernels in a
        compiled or exported graph use ``torch.compile`` or ``torch.export``."""
        _warn_torchscript()
        return _ScriptableGhost(self.primary_conv, self.cheap_operation, self.oup)

    def extra_repr(self) -> str:
        return f"oup={self.oup}, backend={self.backend!r}"


class _ScriptableGhost(nn.Module):
    """The official Ghost module's forward over shared submodules: what TorchScript gets."""

    def __init__(self, primary_conv: nn.Module, cheap_operation: nn.Module, oup: int):
        super().__init__()
        self.oup = oup
        self.primary_conv = primary_conv
        self.cheap_operation = cheap_operation

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]


_TORCHSCRIPT_WARNED = False


def _warn_torchscript() -> None:
    global _TORCHSCRIPT_WARNED
    if not _TORCHSCRIPT_WARNED:
        _TORCHSCRIPT_WARNED = True
        warnings.warn("ghost_kernels: TorchScript (torch.jit.script / torch.jit.trace) runs the Ghost modules' "
                      "PyTorch path, not the fused kernels; use torch.compile or torch.export for those",
                      stacklevel=3)
