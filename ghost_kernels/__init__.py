"""ghost_kernels: fused GPU kernels for the Ghost module of GhostNet (Han et al., CVPR 2020).

Entry points:

* :class:`GhostModule` -- drop-in for the official and timm modules (same constructor, same state_dict).
* :func:`convert` -- swap the Ghost modules of an existing model in place.
* :func:`sync_batch_stats` -- SyncBatchNorm semantics for the converted Ghost modules (DDP on any device).
* :func:`ghost_module` -- the functional forward, with ``backend="auto" | "torch" | "triton"``.
* :func:`available_backends` -- which backends run here, and why the others don't
  (also ``python -m ghost_kernels.info``).
"""
from .convert import convert, is_ghost_module, sync_batch_stats
from .dispatch import (BACKENDS, BackendNotSupported, available_backends, not_supported_reasons,
                       select_backend)
from .dispatch import ghost_forward as ghost_module
from .fold import FoldedGhost, fold_ghost
from .module import GhostModule
from .reference import BatchNormState, ghost_reference
from .spec import GhostSpec, ghostnet_100_modules

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendNotSupported", "BatchNormState", "FoldedGhost", "GhostModule", "GhostSpec",
    "available_backends", "convert", "fold_ghost", "ghost_module", "ghost_reference", "ghostnet_100_modules",
    "is_ghost_module", "not_supported_reasons", "select_backend", "sync_batch_stats",
]
