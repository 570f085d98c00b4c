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
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import Tensor

from .core import choice, reference, torch_folded
from .core.backend import Backend, Request, autocast_enabled
from .core.params import GhostParams
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


class BackendNotSupported(RuntimeError):
    """An explicitly requested backend cannot run this input; the message lists every reason."""


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
    hot path."""
    check_backend_name(requested)
    if requested != "auto":
        backend = BY_NAME[requested]
        reasons = backend.not_supported_reasons(req)
        if reasons:
            raise BackendNotSupported(f"backend={requested!r} cannot run this input: " + "; ".join(reasons))
        return Choice(backend, (backend.explain_choice(req) if detail else "") or "requested by name")
    candidates = [b for b in BACKENDS if b.fused or b is torch_folded.BACKEND]
    if not req.x.is_cuda or not req.inference:
        why = "auto uses fused kernels for CUDA tensors only" if not req.x.is_cuda else AUTO_TRAINING_REASON
        passed = {b.name: b.not_supported_reasons(req) + [why] for b in [TRITON] + candidates} if detail else {}
        return Choice(reference.BACKEND, why if not req.x.is_cuda else "train-mode BN / autograd: " + why, passed)
    gpu, capability = choice.device_of(req.x)
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


def explain(requested: str, req: Request) -> str:
    """A readable account of which backend runs ``req``, the measurement behind it, and why the
    others do not."""
    try:
        c = choose(requested, req, detail=True)
    except BackendNotSupported as exc:
        return str(exc)
    lines = [f"backend={requested!r} runs {c.backend.name!r}: {c.why}"]
    lines += [f"  {name}: not used: " + "; ".join(r) for name, r in c.passed.items()]
    return "\n".join(lines)


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
