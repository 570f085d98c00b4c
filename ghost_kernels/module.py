"""``GhostModule``: a drop-in for the official and timm Ghost modules that runs the fused kernels.

Same constructor (either signature), same submodules, same state_dict keys: official and timm
checkpoints load with ``strict=True``. The forward goes through ``dispatch.ghost_forward``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import dispatch, triton_train
from .fold import FoldCache, FoldedGhost, fold_ghost
from .reference import BatchNormState
from .spec import GhostSpec

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


def spec_of(module: nn.Module) -> GhostSpec:
    """The :class:`GhostSpec` of a Ghost module with the official/timm structure."""
    pconv, cconv = module.primary_conv[0], module.cheap_operation[0]
    a1, a2 = act_kind(module.primary_conv[2]), act_kind(module.cheap_operation[2])
    return GhostSpec(
        inp=pconv.in_channels,
        oup=getattr(module, "oup", getattr(module, "out_chs", None)),
        kernel_size=pconv.kernel_size[0],
        ratio=cconv.out_channels // pconv.out_channels + 1,
        dw_size=cconv.kernel_size[0],
        stride=pconv.stride[0],
        act=a1 if a1 == a2 else "other",
    )


class GhostModule(nn.Module):
    """Ghost module (GhostNet, arXiv 1911.11907) with fused GPU kernels.

    Constructed like the official module, ``GhostModule(inp, oup, kernel_size=1, ratio=2, dw_size=3,
    stride=1, relu=True)``, or like timm's, ``GhostModule(in_chs, out_chs, kernel_size=1, ratio=2,
    dw_size=3, stride=1, act_layer=nn.ReLU, device=None, dtype=None)``. Extra keyword: ``backend``,
    one of ``"auto"`` (default), ``"torch"``, ``"triton"``.

    Equivalent PyTorch (this is exactly what ``backend="torch"`` runs, so SyncBatchNorm from
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, forward hooks and custom activations behave as in
    the original)::

        x1 = self.primary_conv(x)           # Conv2d(inp, m, k, stride, k//2) -> BN -> act
        x2 = self.cheap_operation(x1)       # Conv2d(m, m*(ratio-1), d, 1, d//2, groups=m) -> BN -> act
        return torch.cat([x1, x2], 1)[:, :oup]

    In eval mode under ``torch.no_grad()``/``torch.inference_mode()`` the fused kernel runs with BN
    folded (the folding is cached and refreshed when parameters or buffers change). In train mode, or
    whenever gradients are needed, the triton backend runs the training ops (``triton_train.py``):
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
        self._fold_cache = FoldCache()

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
        new._fold_cache = FoldCache()
        new.train(module.training)
        return new

    def _bn_states(self):
        return (BatchNormState.from_module(self.primary_conv[1]), BatchNormState.from_module(self.cheap_operation[1]))

    def _folded(self, dtype: torch.dtype) -> FoldedGhost:
        bn1, bn2 = self.primary_conv[1], self.cheap_operation[1]
        w1, wd = self.primary_conv[0].weight, self.cheap_operation[0].weight
        sources = (w1, wd, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var,
                   bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var)
        key_extra = (bn1.eps, bn2.eps)
        s1, s2 = self._bn_states()
        return self._fold_cache.get(sources, (dtype, key_extra),
                                    lambda: fold_ghost(w1, s1, wd, s2, self.spec, dtype))

    def sync_batch_stats(self, process_group=None, enabled: bool = True) -> "GhostModule":
        """Synchronize the train-mode batch statistics of both BatchNorms over ``process_group``
        (default: the whole world), as ``nn.SyncBatchNorm`` would, while they stay ``nn.BatchNorm2d``
        (DistributedDataParallel accepts those on any device; SyncBatchNorm it accepts on GPUs only).
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` on a converted model works too."""
        self._sync_stats, self._sync_group = enabled, process_group
        return self

    def _sync(self) -> int:
        """The process group index for the training ops in train mode under an initialized process
        group of more than one rank (-1: no synchronization, -2: only one BN is a SyncBatchNorm)."""
        if not self.training:
            return -1
        bn1, bn2 = self.primary_conv[1], self.cheap_operation[1]
        synced = isinstance(bn1, nn.SyncBatchNorm), isinstance(bn2, nn.SyncBatchNorm)
        if getattr(self, "_sync_stats", False):
            group = self._sync_group
        elif any(synced):
            if not all(synced) or bn1.process_group is not bn2.process_group:
                return -2
            group = bn1.process_group
        else:
            return -1
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return -1
        return triton_train.register_group(group)

    def explain(self, x: Tensor) -> str:
        """Which backend runs ``x`` now (given train/eval mode and grad mode), and why the others don't."""
        s1, s2 = self._bn_states()
        w1, wd = self.primary_conv[0].weight, self.cheap_operation[0].weight
        dispatch.validate_input(x, self.spec, w1)
        req = dispatch.make_request(x, w1, s1, wd, s2, self.spec, self.training, self._sync())
        return dispatch.explain(self.backend, req)

    def forward(self, x: Tensor) -> Tensor:
        s1, s2 = self._bn_states()
        return dispatch.ghost_forward(
            x, self.primary_conv[0].weight, s1, self.cheap_operation[0].weight, s2, self.spec,
            training=self.training, backend=self.backend, folded=self._folded, eager=self._forward_eager,
            sync=self._sync(),
        )

    def _forward_eager(self, x: Tensor) -> Tensor:
        """The "torch" backend: the official module's forward, through the submodules themselves."""
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]

    def extra_repr(self) -> str:
        return f"oup={self.oup}, backend={self.backend!r}"
