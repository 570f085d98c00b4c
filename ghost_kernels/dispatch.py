"""The one dispatch point: input validation, the legality check of each backend, and the choice.

Backends:

* ``"torch"``: :func:`reference.ghost_reference`, plain PyTorch. Runs everything PyTorch runs.
* ``"triton"``: inference (eval mode, no autograd): the fused single-pass kernel of ``triton_forward.py``
  with both BNs folded. Training (train-mode BN, or any call that needs gradients): the torch.library
  ops of ``triton_train.py`` (fused backward, nn.BatchNorm2d semantics, SyncBatchNorm).
* ``"cuda"``: the inference kernel in CUDA C++ (``csrc/``, loaded by ``cuda_forward.py``); it has no
  train mode and no backward (those calls go to triton or torch under ``"auto"``).

``not_supported_reasons(backend, request)`` lists why a backend cannot run a request (empty: it can).
An explicitly named backend with reasons raises :class:`BackendNotSupported` that lists them;
``"auto"`` takes the fastest backend with no reasons and otherwise falls back to ``"torch"``.
:func:`explain` returns the decision and every reason, for users who want to know why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import cuda_forward, triton_forward, triton_train
from .fold import FoldedGhost, fold_ghost
from .reference import Activation, BatchNormState, ghost_reference
from .spec import GhostSpec

logger = logging.getLogger("ghost_kernels")

BACKENDS = ("torch", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS
# "auto" tries these in order. The rule until GPU benchmark numbers say otherwise: the Triton kernel
# first (its numerics are verified in CI through the interpreter), the CUDA C++ kernel when Triton
# cannot run (triton missing or too old); benchmarks/RESULTS.md is where a per-shape rule will come from.
AUTO_ORDER = ("triton", "cuda")
# Training (train-mode BN or autograd) runs the fused ops when asked for by name: they are verified
# against float64 under the Triton interpreter and compile for sm_90, but have not run on a GPU yet
# (benchmarks/NOTES.md). Set to "" once the GPU suite has measured them faster than eager.
AUTO_TRAINING_REASON = ("auto: training runs the fused ops only with backend='triton' until the GPU suite "
                        "has measured them (benchmarks/RESULTS.md)")


class BackendNotSupported(RuntimeError):
    """An explicitly requested backend cannot run this input; the message lists every reason."""


def check_backend_name(backend: str, argname: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"{argname} must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


@dataclass(frozen=True)
class Request:
    """What a backend needs to know to decide whether it can run a forward call."""

    x: Tensor
    spec: GhostSpec
    training: bool
    needs_grad: bool
    has_running_stats: bool
    compute_dtype: torch.dtype  # x's dtype, or the autocast dtype when torch.autocast is on
    sync: int = -1  # SyncBatchNorm process group index (triton_train.register_group); -2: BNs disagree

    @property
    def inference(self) -> bool:
        """Eval-mode BN with running statistics and no autograd: the folded single-pass kernel."""
        return not self.training and not self.needs_grad and self.has_running_stats

    @property
    def batch_values(self) -> int:
        """Values per channel that batch statistics would be computed from (N * H' * W')."""
        n, _, h, w = self.x.shape
        ho, wo = self.spec.out_hw(h, w) if h and w else (0, 0)
        return n * ho * wo


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype nn.Conv2d would compute in: the autocast dtype under torch.autocast, else x's."""
    if not autocast_enabled(x.device):
        return x.dtype
    try:
        return torch.get_autocast_dtype(x.device.type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if x.device.type == "cuda" else torch.get_autocast_cpu_dtype()


def autocast_enabled(device: torch.device) -> bool:
    """Whether torch.autocast is on for ``device``'s type."""
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def make_request(x: Tensor, primary_weight: Tensor, primary_bn: BatchNormState, cheap_weight: Tensor,
                 cheap_bn: BatchNormState, spec: GhostSpec, training: bool, sync: int = -1) -> Request:
    params = (primary_weight, cheap_weight, primary_bn.weight, primary_bn.bias, cheap_bn.weight, cheap_bn.bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params))
    has_stats = all(t is not None for t in (primary_bn.running_mean, primary_bn.running_var,
                                            cheap_bn.running_mean, cheap_bn.running_var))
    return Request(x, spec, training, needs_grad, has_stats, compute_dtype(x), sync)


def validate_input(x, spec: GhostSpec, weight: Tensor, argname: str = "x") -> None:
    """Bad input raises here, whatever the backend: the same errors eager PyTorch would raise, clearer."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{argname} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != spec.inp:
        raise ValueError(f"{argname} must have {spec.inp} channels (dim 1), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{argname} must be a floating-point tensor, got dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{argname} is on {x.device} but the module's parameters are on {weight.device}; "
                         f"move one of them (module.to(x.device))")
    if x.dtype != weight.dtype and not autocast_enabled(x.device):
        raise TypeError(f"{argname} has dtype {x.dtype} but the module's parameters are {weight.dtype}; "
                        f"cast one of them (module.to({x.dtype})) or run under torch.autocast")


def environment_reason(backend: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why ``backend`` cannot run at all on this machine (for ``device``, if given), or None."""
    if backend == "torch":
        return None
    if backend == "triton":
        if triton_forward.triton is None:
            return f"triton is not importable ({triton_forward.TRITON_IMPORT_ERROR!r})"
        interp = triton_forward.interpreting()
        if device is None:
            if torch.cuda.is_available() or interp:
                return None
            return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interp:
            return None
        if device.type == "cpu":
            return "x is on the CPU: the triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 for the interpreter)"
        return f"x is on {device.type}: the triton backend runs on CUDA devices only"
    if backend == "cuda":
        if device is not None and device.type != "cuda":
            return f"x is on {device.type}: the cuda backend needs a CUDA tensor"
        return cuda_forward.UNAVAILABLE_REASON
    raise ValueError(f"unknown backend {backend!r}")


def not_supported_reasons(backend: str, req: Request) -> List[str]:
    """Every reason ``backend`` cannot run ``req``; an empty list means it can."""
    env = environment_reason(backend, req.x.device)
    if backend == "torch":
        return []
    reasons = [env] if env else []
    if backend in ("triton", "cuda"):  # the two fused kernels have the same contract
        spec, x = req.spec, req.x
        dtype = req.compute_dtype
        if dtype not in triton_forward.SUPPORTED_DTYPES or x.dtype not in triton_forward.SUPPORTED_DTYPES:
            reasons.append(f"dtype {x.dtype} (supported: float32, float16, bfloat16)")
        elif dtype == torch.bfloat16 and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
            reasons.append("bfloat16 needs compute capability 8.0 or newer")
        if spec.kernel_size != 1:
            reasons.append(f"kernel_size={spec.kernel_size} (supported: 1)")
        if spec.stride not in triton_forward.SUPPORTED_STRIDES:
            reasons.append(f"stride={spec.stride} (supported: {triton_forward.SUPPORTED_STRIDES})")
        if spec.ratio not in triton_forward.SUPPORTED_RATIOS:
            reasons.append(f"ratio={spec.ratio} (supported: {triton_forward.SUPPORTED_RATIOS})")
        if spec.dw_size not in triton_forward.SUPPORTED_DW_SIZES:
            reasons.append(f"dw_size={spec.dw_size} (supported: {triton_forward.SUPPORTED_DW_SIZES})")
        if spec.act not in ("relu", "none"):
            reasons.append("activation other than ReLU or identity")
        if x.shape[2] == 0 or x.shape[3] == 0:
            reasons.append(f"empty spatial size {tuple(x.shape[2:])}")
    if backend == "cuda" and not req.inference:
        if req.training:
            reasons.append("train-mode BatchNorm (the CUDA C++ kernel is inference-only; the triton backend trains)")
        if req.needs_grad:
            reasons.append("autograd is needed (the CUDA C++ kernel has no backward; the triton backend has one)")
        if not req.has_running_stats:
            reasons.append("BatchNorm without running statistics cannot be folded")
    if backend == "triton" and not req.inference:
        batch_stats = req.training or not req.has_running_stats
        if batch_stats and req.batch_values < 2:
            reasons.append(f"batch statistics need more than 1 value per channel, got {req.batch_values}")
        if req.sync == -2:
            reasons.append("one BatchNorm is a SyncBatchNorm and the other is not")
    return reasons


def select_backend(requested: str, req: Request) -> Tuple[str, Dict[str, List[str]]]:
    """Return the backend to run and the reasons of each backend that was passed over.

    An explicit backend that cannot run raises :class:`BackendNotSupported`. ``"auto"`` picks the
    first of :data:`AUTO_ORDER` with no reasons, on CUDA tensors only (the Triton interpreter is a
    test tool, not a fast path), and falls back to ``"torch"``.
    """
    check_backend_name(requested)
    if requested != "auto":
        reasons = not_supported_reasons(requested, req)
        if reasons:
            raise BackendNotSupported(f"backend={requested!r} cannot run this input: " + "; ".join(reasons))
        return requested, {}
    passed: Dict[str, List[str]] = {}
    for name in AUTO_ORDER:
        reasons = not_supported_reasons(name, req)
        if not req.x.is_cuda:
            reasons = reasons + ["auto uses fused kernels for CUDA tensors only"]
        elif not req.inference and AUTO_TRAINING_REASON:
            reasons = reasons + [AUTO_TRAINING_REASON]
        if not reasons:
            return name, passed
        passed[name] = reasons
    if req.x.is_cuda:
        logger.debug("ghost_kernels: auto fell back to torch: %s", passed)
    return "torch", passed


def explain(requested: str, req: Request) -> str:
    """A readable account of which backend runs ``req`` and why the others do not."""
    try:
        chosen, passed = select_backend(requested, req)
    except BackendNotSupported as exc:
        return str(exc)
    lines = [f"backend={requested!r} runs {chosen!r}"]
    lines += [f"  {name}: not used: " + "; ".join(r) for name, r in passed.items()]
    return "\n".join(lines)


def available_backends() -> Dict[str, Optional[str]]:
    """Every backend, mapped to None if it can run on this machine, else to the reason it cannot."""
    return {name: environment_reason(name) for name in BACKENDS}


KERNELS: Dict[str, Callable[[Tensor, FoldedGhost, GhostSpec], Tensor]] = {
    "triton": triton_forward.run_triton,
    "cuda": cuda_forward.ghost_forward_cuda,
}


def ghost_forward(
    x: Tensor,
    primary_weight: Tensor,
    primary_bn: BatchNormState,
    cheap_weight: Tensor,
    cheap_bn: BatchNormState,
    spec: GhostSpec,
    *,
    training: bool = False,
    backend: str = "auto",
    act: Optional[Activation] = None,
    folded: Optional[Callable[[torch.dtype], FoldedGhost]] = None,
    eager: Optional[Callable[[Tensor], Tensor]] = None,
    sync: int = -1,
) -> Tensor:
    """Run a Ghost module's forward on the chosen backend (see the module docstring).

    ``folded(dtype)`` returns the folded parameters for the fused kernels (a cache, in GhostModule);
    by default they are folded on every call. ``eager(x)``, if given, is the "torch" backend instead
    of :func:`reference.ghost_reference`: GhostModule passes its own submodules, so that what they
    do beyond ``nn.BatchNorm2d`` (SyncBatchNorm's all-reduce, hooks) happens as in the original.
    ``sync``: a process group index from ``triton_train.register_group`` to synchronize the batch
    statistics over (SyncBatchNorm), -1 for none.
    """
    validate_input(x, spec, primary_weight)
    req = make_request(x, primary_weight, primary_bn, cheap_weight, cheap_bn, spec, training, sync)
    name, _ = select_backend(backend, req)
    if name == "torch":
        if eager is not None:
            return eager(x)
        return ghost_reference(x, primary_weight, primary_bn, cheap_weight, cheap_bn, spec,
                               training=training, act=act)
    # Under autocast the kernels compute in the autocast dtype, as nn.Conv2d would: the weights are
    # folded for it, and x is cast on load (triton) or before the launch (cuda).
    dtype = req.compute_dtype
    if not req.inference:  # train-mode BN and/or autograd: the triton training ops
        return triton_train.ghost_train(x, primary_weight, primary_bn, cheap_weight, cheap_bn, spec, training,
                                        dtype, sync)
    if folded is None:
        folded_params = fold_ghost(primary_weight, primary_bn, cheap_weight, cheap_bn, spec, dtype)
    else:
        folded_params = folded(dtype)
    if name == "cuda" and x.dtype != dtype:
        x = x.to(dtype)
    return KERNELS[name](x, folded_params, spec)
