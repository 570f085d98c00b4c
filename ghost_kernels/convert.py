"""``convert(model)``: swap the Ghost modules of an existing GhostNet for :class:`GhostModule`, in place."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from . import dispatch
from .module import GhostModule, structure_problems

FilterFn = Callable[[str, nn.Module], bool]


def is_ghost_module(module: nn.Module) -> bool:
    """True for the official and timm GhostNet v1 ``GhostModule`` (and ours).

    Matched by class name and structure: exactly two children, ``primary_conv`` and ``cheap_operation``,
    each ``Sequential(Conv2d, BatchNorm2d, act)``, and an ``oup``/``out_chs`` attribute. Look-alikes with
    extra parts (timm's GhostModuleV2 attention branch, V3's reparameterized branches) don't match.
    """
    if type(module).__name__ != "GhostModule":
        return False
    if [name for name, _ in module.named_children()] != ["primary_conv", "cheap_operation"]:
        return False
    return not structure_problems(module)


def convert(model: nn.Module, backend: str = "auto", filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace every Ghost module in ``model`` by a :class:`GhostModule` sharing its weights and buffers.

    ``filter_fn(qualified_name, module)`` returning False leaves that module alone. Modules that are
    already :class:`GhostModule` get ``backend`` set. Works in place and returns ``model`` (or the new
    module, if ``model`` itself is a Ghost module). The outputs are those of the original model.
    """
    dispatch.check_backend_name(backend)

    def wanted(name: str, module: nn.Module) -> bool:
        return filter_fn is None or bool(filter_fn(name, module))

    def swap(name: str, module: nn.Module) -> Optional[nn.Module]:
        if isinstance(module, GhostModule):
            if wanted(name, module):
                module.backend = backend
            return None
        if is_ghost_module(module) and wanted(name, module):
            return GhostModule.from_module(module, backend)
        return None

    replaced = swap("", model)
    if replaced is not None:
        return replaced
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = swap(full, child)
            if new is not None:
                setattr(parent, child_name, new)
    return model


def sync_batch_stats(model: nn.Module, process_group=None) -> nn.Module:
    """Make every converted Ghost module in ``model`` synchronize its train-mode batch statistics over
    ``process_group`` (default: the world), like ``nn.SyncBatchNorm`` but keeping ``nn.BatchNorm2d``
    submodules, which DistributedDataParallel accepts on CPU devices too. Other BatchNorms in
    ``model`` are left alone (``nn.SyncBatchNorm.convert_sync_batchnorm`` converts those, and the
    Ghost modules' too, which they also honour). Returns ``model``."""
    for mod in model.modules():
        if isinstance(mod, GhostModule):
            mod.sync_batch_stats(process_group)
    return model
