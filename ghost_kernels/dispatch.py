"""The one dispatch point: the ordered list of backends, input validation, the choice, and why.

Every backend is an object in its own file (``backend.Backend``: its name, its declared limits, its
reasons, its forward). :data:`BACKENDS` is the one ordered list of them; adding a kernel family is
one new file, one entry here and one test parametrization.

* An explicitly named backend that cannot run a call raises :class:`BackendNotSupported` listing
  every reason.
* ``"auto"`` uses the fused paths on CUDA tensors only (the Triton interpreter is a test tool). For
  inference it ranks the inference backends per shape with ``choice.py`` (GPU measurements, else a
  documented heuristic) and runs the first whose limits admit the call; training runs on
  ``"torch"`` until the fused training path is measured on a GPU (:data:`AUTO_TRAINING_REASON`).
* :func:`explain` says which backend runs, the measurement behind the choice, and every reason of
  the backends passed over.
"""
# No ``from __future__ import annotations``: torch 2.6's custom_op evaluates the op's string annotations
# in its own namespace (tests/test_style.py).
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .core import choice, reference, torch_folded
from .core.backend import Backend, BackendNotSupported, Request, autocast_enabled, is_compiling
from .core.layout import empty_output, output_memory_format
from .core.params import GhostParams, op_args, params_from_op
from .core.reference import legacy_params
from .cuda import backend as cuda_backend
from .triton import band as triton_band
from .triton import halo as triton_halo
from .triton import two_pass as triton_two_pass
from .triton.backend import TritonBackend

logger = logging.getLogger("ghost_kernels")

# The inference-only Triton kernel families, each a backend of its own (triton_<family>.py).
TRITON_FAMILIES = [triton_band.BACKEND, triton_two_pass.BACKEND, triton_halo.BACKEND]

TRITON = TritonBackend("triton", "the Triton kernels: per shape the fastest admissible family for inference, "
                       "the fused training ops for train-mode BN and autograd", trains=True,
                       families=TRITON_FAMILIES)

# The one ordered list. "auto" ranks the fused/folded inference backends per shape (choice.py).
BACKENDS: List[Backend] = [reference.BACKEND, TRITON, torch_folded.BACKEND, *TRITON_FAMILIES, cuda_backend.BACKEND]
BY_NAME: Dict[str, Backend] = {b.name: b for b in BACKENDS}
BACKEND_CHOICES = ("auto",) + tuple(BY_NAME)

# Training (train-mode BN or autograd) runs the fused ops when asked for by name: they are verified
# against float64 under the Triton interpreter and compile for sm_90, but have not run on a GPU yet
# (benchmarks/NOTES.md). Set to "" once a GPU run has measured them faster than eager.
AUTO_TRAINING_REASON = ("auto: training runs the fused ops only with backend='triton' until a GPU run "
                        "has measured them (benchmarks/RESULTS.md)")


def check_backend_name(backend: str, argname: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"{argname} must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def validate_input(x, params: GhostParams, argname: str = "x") -> None:
    """Bad input raises here, whatever the backend: clear errors naming the argument and what was
    expected (eager PyTorch would raise later, less clearly, or not at all)."""
    params.check()
    if not isinstance(x, Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{argname} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != params.spec.inp:
        raise ValueError(f"{argname} must have {params.spec.inp} channels (dim 1), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{argname} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[2] == 0 or x.shape[3] == 0:   # eager's conv2d raises too, less clearly
        raise ValueError(f"{argname} has an empty spatial size (H, W) = {tuple(x.shape[2:])}; a Ghost module needs "
                         f"H >= 1 and W >= 1 (an empty batch, N = 0, is fine)")
    w = params.w1
    if x.device != w.device:
        raise ValueError(f"{argname} is on {x.device} but the module's parameters are on {w.device}; "
                         f"move one of them (module.to(x.device))")
    if x.dtype != w.dtype and not autocast_enabled(x.device):
        raise TypeError(f"{argname} has dtype {x.dtype} but the module's parameters are {w.dtype}; "
                        f"cast one of them (module.to({x.dtype})) or run under torch.autocast")


@dataclass
class Choice:
    """The backend that runs a request, why, and the reasons of each backend passed over."""

    backend: Backend
    why: str = ""
    passed: Dict[str, List[str]] = field(default_factory=dict)


def not_supported_reasons(backend: str, req: Request) -> List[str]:
    """Every reason ``backend`` cannot run ``req``; an empty list means it can."""
    return BY_NAME[check_backend_name(backend)].not_supported_reasons(req)


def choose(requested: str, req: Request, detail: bool = False) -> Choice:
    """The backend to run ``req`` (see the module docstring); raises :class:`BackendNotSupported` for an
    explicit backend that cannot run it. ``detail``: also collect the reasons of the backends that
    ``auto`` passes over without asking them (CPU tensors, training): for :func:`explain`, not the
    hot path.

    While torch.compile or torch.export traces the call, the input's sizes may be symbolic, so
    nothing is decided from them: what depends only on static facts (device, train/eval, grad mode,
    the module's options, dtype, layout) is decided here; the per-shape choice of ``auto`` and
    ``triton`` inference goes into the graph as one op, ``ghost_kernels::forward``, which makes it
    per call with the real sizes (:data:`CHOSEN_PER_CALL`). The graph is valid for every size."""
    check_backend_name(requested)
    tracing = is_compiling()
    if requested != "auto":
        backend = BY_NAME[requested]
        reasons = backend.not_supported_reasons(req)
        if reasons:
            raise BackendNotSupported(f"backend={requested!r} cannot run this input: " + "; ".join(reasons))
        if tracing and backend is TRITON and req.inference:
            return Choice(CHOSEN_PER_CALL[requested], COMPILED_WHY)
        return Choice(backend, (backend.explain_choice(req) if detail else "") or "requested by name")
    candidates = [b for b in BACKENDS if b.fused or b is torch_folded.BACKEND]
    if not req.x.is_cuda or not req.inference:
        why = "auto uses fused kernels for CUDA tensors only" if not req.x.is_cuda else AUTO_TRAINING_REASON
        passed = {b.name: b.not_supported_reasons(req) + [why] for b in [TRITON] + candidates} if detail else {}
        return Choice(reference.BACKEND, why if not req.x.is_cuda else "train-mode BN / autograd: " + why, passed)
    gpu, capability = choice.device_of(req.x)
    if tracing:
        if choice.spec_measured(choice.spec_key(req.spec, req.compute_dtype, req.channels_last), gpu, capability):
            return Choice(CHOSEN_PER_CALL[requested], COMPILED_WHY)
        return Choice(torch_folded.BACKEND, UNMEASURED_SPEC_WHY)
    key = choice.shape_key(req.spec, req.x.shape[2], req.x.shape[3], req.compute_dtype, req.channels_last)
    order, why = choice.rank([b.name for b in candidates], key, gpu, capability, ["torch_folded"])
    passed: Dict[str, List[str]] = {}
    for name in order:
        reasons = BY_NAME[name].not_supported_reasons(req)
        if not reasons:
            return Choice(BY_NAME[name], why, passed)
        passed[name] = reasons
    logger.debug("ghost_kernels: auto fell back to torch: %s", passed)
    return Choice(reference.BACKEND, why, passed)


def compiled_choice(requested: str, req: Request) -> str:
    """What torch.compile / torch.export put in the graph for ``req`` (for :func:`explain`)."""
    if requested in CHOSEN_PER_CALL and req.inference and (requested == "triton" or req.x.is_cuda):
        if requested == "auto" and not choice.spec_measured(
                choice.spec_key(req.spec, req.compute_dtype, req.channels_last), *choice.device_of(req.x)):
            return "torch_folded, traced into the graph: " + UNMEASURED_SPEC_WHY
        return "the op ghost_kernels::forward, which makes the per-shape choice above per call (valid for every size)"
    if requested == "auto" and req.inference:
        return "as above (the choice does not depend on the input's sizes)"
    return "as above"


def explain(requested: str, req: Request) -> str:
    """A readable account of which backend runs ``req``, the measurement behind it, why the others do
    not, and what torch.compile / torch.export would put in a graph for it."""
    try:
        c = choose(requested, req, detail=True)
    except BackendNotSupported as exc:
        return str(exc)
    lines = [f"backend={requested!r} runs {c.backend.name!r}: {c.why}"]
    lines += [f"  {name}: not used: " + "; ".join(r) for name, r in c.passed.items()]
    lines.append(f"  under torch.compile / torch.export: {compiled_choice(requested, req)}")
    return "\n".join(lines)


@torch.library.custom_op("ghost_kernels::forward", mutates_args=())
def forward_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], bn1_weight: Optional[Tensor],
               bn1_bias: Optional[Tensor], bn1_mean: Optional[Tensor], bn1_var: Optional[Tensor],
               bn1_eps: float, wd: Tensor, b2: Optional[Tensor], bn2_weight: Optional[Tensor],
               bn2_bias: Optional[Tensor], bn2_mean: Optional[Tensor], bn2_var: Optional[Tensor],
               bn2_eps: float, oup: int, kernel_size: int, stride: int, ratio: int, dw_size: int, act: str,
               gate: Optional[Tensor], dtype: torch.dtype, backend: str) -> Tensor:
    """Eval-mode Ghost module forward through ``backend`` ("auto" or "triton"), computing in ``dtype``,
    with the backend (and Triton family) chosen per call from the real input sizes: what a compiled
    or exported graph holds where the choice depends on sizes that were symbolic at trace time."""
    params = params_from_op(x, w1, b1, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, wd, b2, bn2_weight, bn2_bias, bn2_mean,
                            bn2_var, bn2_eps, oup, kernel_size, stride, ratio, dw_size, act)
    req = Request.for_inference(x, params, dtype, gate)
    out = choose(backend, req).backend.forward(x, req)
    # every backend returns eager's memory format; this keeps the fake's promise should one not
    return out.contiguous(memory_format=output_memory_format(x))


@forward_op.register_fake
def _(x, w1, b1, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, wd, b2, bn2_weight, bn2_bias, bn2_mean, bn2_var,
      bn2_eps, oup, kernel_size, stride, ratio, dw_size, act, gate, dtype, backend):
    return empty_output(x, oup, stride, dtype)


@dataclass
class ChosenPerCall(Backend):
    """The op :func:`forward_op` as a backend: what a traced ``auto`` / ``triton`` inference call runs."""

    requested: str = "auto"

    def forward(self, x: Tensor, req: Request) -> Tensor:
        return forward_op(x, *op_args(req.params), req.gate, req.compute_dtype, self.requested)


CHOSEN_PER_CALL = {name: ChosenPerCall(f"{name} (chosen per call)", f"ghost_kernels::forward(backend={name!r})",
                                       requested=name) for name in ("auto", "triton")}
COMPILED_WHY = ("traced by torch.compile / torch.export: the op ghost_kernels::forward chooses per call from the "
                "real input sizes (the per-shape choice cannot be made from symbolic sizes)")
UNMEASURED_SPEC_WHY = ("no GPU measurement of this module's shape on this GPU at any size, so auto runs "
                       "torch_folded at every size")


def available_backends() -> Dict[str, Optional[str]]:
    """Every backend name, mapped to None if it can run on this machine, else to the reason it cannot."""
    return {b.name: b.environment_reason() for b in BACKENDS}


def ghost_forward(x: Tensor, params: GhostParams, *legacy, training: bool = False, backend: str = "auto") -> Tensor:
    """The Ghost module's forward as a function: validate, choose, run (see the module docstring).

    ``params``: a :class:`~ghost_kernels.core.params.GhostParams` (``GhostParams.from_module(m)`` for a
    module's); ``training``: train-mode BatchNorm (running statistics are updated in place, as
    nn.BatchNorm2d does). Equivalent PyTorch: ``ghost_reference(x, params, training=training)``.
    """
    params = legacy_params(params, legacy, "ghost_forward")
    validate_input(x, params)
    req = Request.make(x, params, training)
    return choose(backend, req).backend.forward(x, req)
