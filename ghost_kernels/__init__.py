"""ghost_kernels: fused GPU kernels for the Ghost module of GhostNet (Han et al., CVPR 2020).

Entry points:

* :class:`GhostModule` -- drop-in for the official and timm modules (same constructor, same state_dict).
* :func:`convert` -- swap the Ghost modules of an existing model in place (and say what it did): timm's
  GhostNet v1/v2/v3 modules, Ultralytics / YOLOv5 / YOLOv7 ``GhostConv``, the official code's
  (:class:`FusedGhostV2`, :class:`FusedGhostV3`, :class:`FusedGhostConv`; all :class:`FusedGhost`).
* :func:`sync_batch_stats` -- SyncBatchNorm semantics for the converted Ghost modules (DDP on any device).
* :func:`ghost_forward` -- the functional forward on a :class:`GhostParams` bundle, with
  ``backend="auto"`` or any name of :func:`available_backends`.
* :func:`available_backends` -- every backend, and why it cannot run here (also ``python -m ghost_kernels.info``).
"""
from ._version import __version__
from .convert import ConversionReport, convert, is_ghost_module, sync_batch_stats
from .core.backend import Request
from .core.fold import FoldedGhost, fold_ghost
from .core.params import BatchNormState, GhostParams
from .core.reference import ghost_reference
from .core.spec import GhostSpec, ghostnet_100_modules
from .dispatch import (
    BACKEND_CHOICES,
    BackendNotSupported,
    available_backends,
    choose,
    explain,
    ghost_forward,
    not_supported_reasons,
)
from .integrations.timm import FusedGhostV2, FusedGhostV3
from .integrations.ultralytics import FusedGhostConv
from .module import FusedGhost, GhostModule


def ghost_module(*args, **kwargs):
    """Deprecated name of :func:`ghost_forward` (0.1); it was easy to confuse with :class:`GhostModule`."""
    import warnings
    warnings.warn("ghost_kernels.ghost_module is deprecated: use ghost_kernels.ghost_forward", DeprecationWarning,
                  stacklevel=2)
    return ghost_forward(*args, **kwargs)


__all__ = [
    "BACKEND_CHOICES", "BackendNotSupported", "BatchNormState", "ConversionReport", "FoldedGhost", "FusedGhost",
    "FusedGhostConv", "FusedGhostV2", "FusedGhostV3", "GhostModule",
    "GhostParams", "GhostSpec", "Request", "available_backends", "choose", "convert", "explain", "fold_ghost",
    "ghost_forward", "ghost_reference", "ghostnet_100_modules", "is_ghost_module", "not_supported_reasons",
    "sync_batch_stats",
]
