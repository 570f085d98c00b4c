"""``convert(model)``: swap the Ghost modules of an existing model for fused ones, in place, and say
what was converted and what was not (logger ``ghost_kernels`` at INFO, ``warnings.warn`` for
Ghost-like modules left as they were, and a :class:`ConversionReport` on request).

Matching is by structure, one file per codebase in ``integrations/`` (the official code and timm's
GhostModule, GhostNetV2's attention module and GhostNetV3's deployed module, Ultralytics / YOLOv5 /
YOLOv7 ``GhostConv``). A converted module shares the original's submodules, so its parameters,
buffers and state_dict keys are the original's: checkpoints load with ``strict=True``, and
``model.fuse()`` (Ultralytics) or ``reparameterize_model`` (timm) keep working on a converted model.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import nn

from . import dispatch
from .integrations import Match, official, timm, ultralytics
from .module import FusedGhost

FilterFn = Callable[[str, nn.Module], bool]
logger = logging.getLogger("ghost_kernels")

# Asked in this order; the first that recognizes a module decides (integrations/__init__.py).
MATCHERS = (ultralytics.match, timm.match, official.match)


@dataclass
class ConversionReport:
    """What :func:`convert` did: qualified names of converted modules, and of Ghost-like modules it left
    alone with the reason (``filter_fn`` exclusions are not listed); ``inference_only``: converted
    modules that ``backend="triton"`` runs fused in inference but whose training its training ops
    refuse (a train-mode call raises, saying why), with the reason."""

    converted: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    inference_only: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = Counter(reason for reason in self.skipped.values())
        parts = [f"{n} x {reason}" for reason, n in kinds.most_common()]
        return f"converted {len(self.converted)} Ghost modules" + (
            f"; left {len(self.skipped)} Ghost-like modules as they were: " + "; ".join(parts) if parts else "") \
            + self.inference_only_note()

    def inference_only_note(self) -> str:
        """The part of the summary about :attr:`inference_only` (empty when there are none)."""
        if not self.inference_only:
            return ""
        kinds = Counter(self.inference_only.values())
        return (f"; {len(self.inference_only)} of the converted run fused in inference only (training them with "
                "backend='triton' raises): " + "; ".join(f"{n} x {r}" for r, n in kinds.most_common()))


def match(module: nn.Module) -> Optional[Match]:
    """What the integrations say of ``module``: None when it is no Ghost module they know."""
    for matcher in MATCHERS:
        found = matcher(module)
        if found is not None:
            return found
    return None


def ghost_like(module: nn.Module) -> bool:
    """A module that looks like a Ghost module of any codebase (converted or not)."""
    return isinstance(module, FusedGhost) or match(module) is not None


def why_not_convertible(module: nn.Module) -> Optional[str]:
    """None if ``module`` converts (or is converted already), else why not."""
    if isinstance(module, FusedGhost):
        return None
    found = match(module)
    if found is None:
        return f"{type(module).__name__}: not a Ghost module of a known structure"
    return found.reason


def backend_cannot_run(backend: str, fused: FusedGhost) -> Optional[str]:
    """Why the explicitly named ``backend`` can never run the fused module (its own options: the
    activation, kernel sizes, stride, ratio, a deployed form, the gate), or None. Limits that depend
    on the input (sizes, dtype, device) are checked at each forward; ``"auto"`` and ``"torch"`` run
    every module."""
    if backend == "auto":
        return None
    params = fused.params()
    reasons = dispatch.BY_NAME[backend].module_reasons(params, fused.gated)
    if not reasons:
        return None
    if params.spec.act == "other":
        layers = fused.ghost_layers()
        reasons.append("its activations: " + " and ".join(sorted({type(layers[2]).__name__, type(layers[5]).__name__})))
    return f"{type(fused).__name__}: backend={backend!r} cannot run its options: " + "; ".join(reasons)


def is_ghost_module(module: nn.Module) -> bool:
    """True for the modules :func:`convert` converts, and for the fused modules themselves."""
    return why_not_convertible(module) is None


def convert(model: nn.Module, backend: str = "auto", filter_fn: Optional[FilterFn] = None,
            return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every Ghost module in ``model`` by a fused module sharing its submodules (weights,
    buffers, state_dict keys, train/eval mode, forward hooks, attributes).

    ``filter_fn(qualified_name, module)`` returning False leaves that module alone. Modules that are
    already fused get ``backend`` set. With an explicitly named ``backend``, a module whose own options
    that backend can never run (an activation it lacks, a kernel size, ...) is left as it was and
    reported, instead of failing at its first forward. Works in place and returns ``model`` (or the
    new module, if ``model`` itself is a Ghost module); with ``return_report=True``, ``(model,
    report)``. The outputs are those of the original model. Logs the count (logger ``ghost_kernels``,
    INFO) and warns about Ghost-like modules it could not convert, with the reason.
    """
    dispatch.check_backend_name(backend)
    report = ConversionReport()

    def swap(name: str, module: nn.Module) -> Optional[nn.Module]:
        if filter_fn is not None and not filter_fn(name, module):
            return None
        label = name or "<root>"
        if isinstance(module, FusedGhost):
            fused = module
        else:
            found = match(module)
            if found is None:
                return None
            if found.reason is not None:
                report.skipped[label] = found.reason
                return None
            fused = found.build(module, backend)
        why = backend_cannot_run(backend, fused)
        if why is not None:
            report.skipped[label] = why
            return None
        report.converted.append(label)
        named = dispatch.BY_NAME.get(backend)   # None for auto, which trains on torch (dispatch.py)
        if named is not None and named.trains:
            untrainable = named.training_module_reasons(fused.params(), fused.gated)
            if untrainable:
                report.inference_only[label] = "; ".join(untrainable)
        fused.backend = backend
        return None if fused is module else fused

    root = swap("", model)
    if root is None:
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                new = swap(full, child)
                if new is not None:
                    setattr(parent, child_name, new)
    # the count in the log, the details of what was left alone once, in the warning
    logger.info("ghost_kernels.convert: converted %d Ghost modules%s%s", len(report.converted),
                f"; left {len(report.skipped)} Ghost-like modules as they were (see the warning)" if report.skipped else "",
                report.inference_only_note())
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
        if isinstance(mod, FusedGhost):
            mod.sync_batch_stats(process_group)
    return model
