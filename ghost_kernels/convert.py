"""``convert(model)``: swap the Ghost modules of an existing model for :class:`GhostModule`, in place,
and say what was converted and what was not (logger ``ghost_kernels`` at INFO, ``warnings.warn``
for Ghost-like modules left as they were, and a :class:`ConversionReport` on request).

Matching is by structure, not by class name: a module converts when it computes the GhostNet v1
function, i.e. it has ``primary_conv`` and ``cheap_operation``, each ``Sequential(Conv2d,
BatchNorm2d, act)`` with the Ghost module's shapes, an ``oup``/``out_chs`` attribute, and no other
submodule with parameters or buffers. That covers the official and timm ``GhostModule``, their
subclasses, and GhostNetV2's ``GhostModuleV2`` in its ``"original"`` mode (V1's math). GhostModuleV2
with its attention branch and GhostModuleV3 (re-parameterizable branches) are reported, not fused.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import nn

from . import dispatch
from .core.structure import ghost_layers, spec_of, structure_problems
from .module import GhostModule

FilterFn = Callable[[str, nn.Module], bool]
logger = logging.getLogger("ghost_kernels")


@dataclass
class ConversionReport:
    """What :func:`convert` did: qualified names of converted modules, and of Ghost-like modules it left
    alone with the reason (``filter_fn`` exclusions are not listed)."""

    converted: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = Counter(reason for reason in self.skipped.values())
        parts = [f"{n} x {reason}" for reason, n in kinds.most_common()]
        return f"converted {len(self.converted)} Ghost modules" + (
            f"; left {len(self.skipped)} Ghost-like modules as they were: " + "; ".join(parts) if parts else "")


def _class_names(module: nn.Module) -> List[str]:
    return [c.__name__ for c in type(module).__mro__]


def ghost_like(module: nn.Module) -> bool:
    """A module that looks like a Ghost module of any version (official, timm, V2, V3)."""
    names = _class_names(module)
    return (hasattr(module, "primary_conv") and hasattr(module, "cheap_operation")) or any(
        n.startswith("GhostModule") for n in names)


def why_not_convertible(module: nn.Module) -> Optional[str]:
    """None if ``module`` computes GhostNet v1's function with the official structure, else why not."""
    names = _class_names(module)
    kind = type(module).__name__
    if any(n.startswith("GhostModuleV3") for n in names):
        return f"{kind}: GhostNetV3 (re-parameterizable branches) is not fused yet"
    mode = getattr(module, "mode", None)
    if any(n.startswith("GhostModuleV2") for n in names) and mode != "original":
        return f"{kind}: GhostNetV2 attention (DFC) branch{f' (mode={mode!r})' if mode else ''} is not fused yet"
    if not (hasattr(module, "primary_conv") and hasattr(module, "cheap_operation")):
        return f"{kind}: no primary_conv/cheap_operation pair"
    problems = structure_problems(module)
    if problems:
        return f"{kind}: " + "; ".join(problems)
    extra = [name for name, child in module.named_children() if name not in ("primary_conv", "cheap_operation")
             and (any(True for _ in child.parameters()) or any(True for _ in child.buffers()))]
    if extra:
        return f"{kind}: extra submodules with parameters ({', '.join(extra)}) change its function"
    return None


def backend_cannot_run(backend: str, module: nn.Module) -> Optional[str]:
    """Why the explicitly named ``backend`` can never run ``module`` (its own options: activation,
    kernel sizes, stride, ratio), or None. Limits that depend on the input (sizes, dtype, device) are
    checked at each forward; ``"auto"`` and ``"torch"`` run every module."""
    spec = spec_of(module)
    reasons = dispatch.BY_NAME[backend].spec_reasons(spec) if backend != "auto" else []
    if not reasons:
        return None
    if spec.act == "other":
        layers = ghost_layers(module)
        reasons.append("its activations: " + " and ".join(sorted({type(layers[2]).__name__, type(layers[5]).__name__})))
    return f"{type(module).__name__}: backend={backend!r} cannot run its options: " + "; ".join(reasons)


def is_ghost_module(module: nn.Module) -> bool:
    """True for the modules :func:`convert` converts, and for :class:`GhostModule` itself."""
    return why_not_convertible(module) is None


def convert(model: nn.Module, backend: str = "auto", filter_fn: Optional[FilterFn] = None,
            return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every Ghost module in ``model`` by a :class:`GhostModule` sharing its weights and buffers.

    ``filter_fn(qualified_name, module)`` returning False leaves that module alone. Modules that are
    already :class:`GhostModule` get ``backend`` set. With an explicitly named ``backend``, a module
    whose own options that backend can never run (an activation it lacks, a kernel size, ...) is
    left as it was and reported, instead of failing at its first forward. Works in place and returns ``model`` (or the new
    module, if ``model`` itself is a Ghost module); with ``return_report=True``, ``(model, report)``.
    The outputs are those of the original model. Logs the count (logger ``ghost_kernels``, INFO) and
    warns about Ghost-like modules it could not convert, with the reason.
    """
    dispatch.check_backend_name(backend)
    report = ConversionReport()

    def swap(name: str, module: nn.Module) -> Optional[nn.Module]:
        if filter_fn is not None and not filter_fn(name, module):
            return None
        if not isinstance(module, GhostModule) and not ghost_like(module):
            return None
        why = why_not_convertible(module) or backend_cannot_run(backend, module)
        if why is not None:
            report.skipped[name or "<root>"] = why
            return None
        report.converted.append(name or "<root>")
        if isinstance(module, GhostModule):
            module.backend = backend
            return None
        return GhostModule.from_module(module, backend)

    root = swap("", model)
    if root is None:
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                new = swap(full, child)
                if new is not None:
                    setattr(parent, child_name, new)
    # the count in the log, the details of what was left alone once, in the warning
    logger.info("ghost_kernels.convert: converted %d Ghost modules%s", len(report.converted),
                f"; left {len(report.skipped)} Ghost-like modules as they were (see the warning)" if report.skipped else "")
    if report.skipped:
        warnings.warn(f"ghost_kernels.convert: {report.summary()}", stacklevel=2)
    result = root if root is not None else model
    return (result, report) if return_report else result


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
