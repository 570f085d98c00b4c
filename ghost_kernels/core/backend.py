"""What a backend is: :class:`Request` (one forward call, as a backend sees it), :class:`Support` (the
declared table of what a kernel family runs) and :class:`Backend` (name, limits, reasons, forward).

Each backend lives in its own file beside its kernels and owns its limits; ``dispatch.py`` holds
the one ordered list of them and walks it. A backend answers three questions:

* :meth:`Backend.environment_reason`: can it run on this machine / device at all?
* :meth:`Backend.not_supported_reasons`: every reason it cannot run this request (empty: it can);
* :meth:`Backend.forward`: run it (only called when there are no reasons).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .params import GhostParams, has_running_stats
from .spec import GhostSpec


class BackendNotSupported(RuntimeError):
    """An explicitly requested backend cannot run this input; the message lists every reason."""


def is_compiling() -> bool:
    """True while torch.compile (dynamo) or torch.export traces the caller: input sizes may be symbolic
    then, and nothing may be decided from their values (see ``dispatch.choose``). On every module
    call's path: torch.compiler.is_compiling, which every supported torch (>= 2.6) has."""
    return torch.compiler.is_compiling()


def autocast_enabled(device: torch.device) -> bool:
    """Whether torch.autocast is on for ``device``'s type."""
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype nn.Conv2d would compute in: the autocast dtype under torch.autocast, else x's."""
    if not autocast_enabled(x.device):
        return x.dtype
    try:
        return torch.get_autocast_dtype(x.device.type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if x.device.type == "cuda" else torch.get_autocast_cpu_dtype()


@dataclass
class Request:
    """One forward call, as the backends see it when they decide whether they can run it."""

    x: Tensor
    params: GhostParams
    training: bool                      # the module's train() flag (train-mode BatchNorm)
    needs_grad: bool                    # autograd will differentiate the output
    compute_dtype: torch.dtype          # x's dtype, or the autocast dtype under torch.autocast
    sync_group: Optional[int] = None    # SyncBatchNorm process group (batch_stats.register_group), or None
    sync_error: Optional[str] = None    # why synchronized statistics are impossible (e.g. one BN synced)
    gate: Optional[Tensor] = None       # GhostNetV2's attention, multiplied into the output (reference.apply_gate)

    @classmethod
    def make(cls, x: Tensor, params: GhostParams, training: bool, sync_group: Optional[int] = None,
             sync_error: Optional[str] = None, gate: Optional[Tensor] = None) -> "Request":
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in params.trainable())
            or (gate is not None and gate.requires_grad))
        return cls(x, params, training, needs_grad, compute_dtype(x), sync_group, sync_error, gate)

    @classmethod
    def for_inference(cls, x: Tensor, params: GhostParams, dtype: torch.dtype,
                      gate: Optional[Tensor] = None) -> "Request":
        """An eval-mode call without autograd computing in ``dtype`` (inside the inference ops)."""
        return cls(x, params, False, False, dtype, gate=gate)

    @property
    def spec(self) -> GhostSpec:
        return self.params.spec

    @property
    def inference(self) -> bool:
        """Eval-mode BN with running statistics and no autograd: BN can be folded."""
        return not self.training and not self.needs_grad and has_running_stats(self.params)

    @property
    def channels_last(self) -> bool:
        x = self.x
        return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    @property
    def out_hw(self) -> Tuple[int, int]:
        return self.spec.out_hw(self.x.shape[2], self.x.shape[3])

    @property
    def batch_values(self) -> int:
        """Values per channel that batch statistics would be computed from (N * H' * W')."""
        n, _, h, w = self.x.shape
        ho, wo = self.spec.out_hw(h, w) if h and w else (0, 0)
        return n * ho * wo


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


@dataclass(frozen=True)
class Support:
    """The declared table of what a kernel family runs (``csrc/`` checks the same numbers for the
    CUDA C++ kernel, and a test holds the two sides equal)."""

    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    kernel_sizes: Optional[Tuple[int, ...]] = (1,)     # None: any
    strides: Optional[Tuple[int, ...]] = (1, 2)
    ratios: Optional[Tuple[int, ...]] = (2, 3, 4)
    dw_sizes: Optional[Tuple[int, ...]] = (1, 3, 5, 7)
    acts: Tuple[str, ...] = ("relu", "none")
    conv_bias: bool = False       # convs with a bias (deployed forms: GhostNetV3, Ultralytics after fuse())
    without_bn: bool = False      # convs without a BatchNorm (deployed forms)
    gate: bool = False            # GhostNetV2's attention multiplied into the output

    def reasons(self, req: Request) -> List[str]:
        """Every reason this table does not admit ``req``: the module's options and the compute dtype."""
        x, dtype = req.x, req.compute_dtype
        out = []
        if dtype not in self.dtypes or x.dtype not in self.dtypes:
            names = ", ".join(_DTYPE_NAMES.get(d, str(d)) for d in self.dtypes)
            out.append(f"dtype {x.dtype if x.dtype not in self.dtypes else dtype} (supported: {names})")
        elif dtype == torch.bfloat16 and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
            out.append("bfloat16 needs compute capability 8.0 or newer")
        return out + self.module_reasons(req.params, req.gate is not None)

    def module_reasons(self, params: GhostParams, gated: bool = False) -> List[str]:
        """The reasons that depend on the module alone (its options and form), never on an input: a
        module with any of them can never run on a backend with this table (``convert()`` skips it)."""
        out = self.spec_reasons(params.spec)
        if not self.conv_bias and (params.b1 is not None or params.b2 is not None):
            out.append("a conv with a bias (a deployed module)")
        if not self.without_bn and (params.bn1 is None or params.bn2 is None):
            out.append("a conv without a BatchNorm (a deployed module)")
        if not self.gate and gated:
            out.append("GhostNetV2's attention gate")
        return out

    def spec_reasons(self, spec: GhostSpec) -> List[str]:
        """The reasons that depend on the spec alone."""
        out = []
        for name, value, allowed in (("kernel_size", spec.kernel_size, self.kernel_sizes),
                                     ("stride", spec.stride, self.strides), ("ratio", spec.ratio, self.ratios),
                                     ("dw_size", spec.dw_size, self.dw_sizes)):
            if allowed is not None and value not in allowed:
                out.append(f"{name}={value} (supported: {allowed})")
        if spec.act not in self.acts:
            out.append(f"activation {spec.act!r} (supported: {', '.join(self.acts)})")
        return out


@dataclass
class Backend:
    """A way to run the Ghost module's forward. Subclasses override what differs."""

    name: str
    summary: str
    support: Optional[Support] = None          # None: everything the reference runs
    trains: bool = False                       # runs train-mode BN and autograd
    fused: bool = True                         # a fused kernel family ("auto" uses those on CUDA only)
    extra_reasons: Optional[Callable[[Request], List[str]]] = field(default=None, repr=False)

    def environment_reason(self, device: Optional[torch.device] = None) -> Optional[str]:
        """Why this backend cannot run at all on this machine (for ``device``, if given), or None."""
        return None

    def not_supported_reasons(self, req: Request) -> List[str]:
        """Every reason this backend cannot run ``req``; an empty list means it can. While torch.compile
        or export traces the call, the reasons that depend on the input's sizes are left to run time
        (:meth:`size_reasons`, checked by the registered op itself): sizes may be symbolic then."""
        env = self.environment_reason(req.x.device)
        reasons = [env] if env else []
        if self.support is not None:
            reasons += self.support.reasons(req)
        if not req.inference:
            reasons += self.training_reasons(req)
        if not is_compiling():
            reasons += self.size_reasons(req)
        return reasons

    def size_reasons(self, req: Request) -> List[str]:
        """The reasons that depend on the input's N, H or W (e.g. a maximum image width)."""
        return self.extra_reasons(req) if self.extra_reasons is not None else []

    def module_reasons(self, params: GhostParams, gated: bool = False) -> List[str]:
        """Every reason this backend can never run the module of ``params`` (gated: with GhostNetV2's
        attention), whatever the input and machine (``convert()`` skips such modules for an
        explicitly named backend)."""
        return self.support.module_reasons(params, gated) if self.support is not None else []

    def training_module_reasons(self, params: GhostParams, gated: bool = False) -> List[str]:
        """For a backend that trains (``trains``): why it can run the module in inference but never
        train it (``convert()``'s report says so); empty where it trains every module it runs."""
        return []

    def training_reasons(self, req: Request) -> List[str]:
        """Reasons this backend cannot run a call that is not plain inference (train-mode BN,
        autograd, or BN without running statistics)."""
        if self.trains:
            return []
        reasons = []
        if req.training:
            reasons.append(f"train-mode BatchNorm ({self.name} is inference-only; backend='triton' trains the "
                           f"modules its training ops take: see its reasons)")
        if req.needs_grad:
            reasons.append(f"autograd is needed: {'an eval-mode call ' if not req.training else ''}with gradients "
                           f"enabled and x or a parameter requiring grad ({self.name} has no backward). For "
                           f"inference run it under torch.no_grad() or torch.inference_mode(); to train, use "
                           f"backend='triton', whose training ops have one")
        if not has_running_stats(req.params):
            reasons.append("BatchNorm without running statistics cannot be folded")
        return reasons

    def launch_and_plan(self, x: Tensor, req: Request):
        """(the output of :meth:`forward`, a plan that replays its kernel launches for calls of the
        same kind, or None): a kernel family's way to skip its launcher's Python on repeat calls."""
        return self.forward(x, req), None

    def resolve(self, req: Request) -> "Backend":
        """The backend whose :meth:`forward` runs ``req`` (a group such as ``triton`` returns the member
        it picks): what a module caches for calls like ``req``."""
        return self

    def explain_choice(self, req: Request) -> str:
        """What this backend runs for ``req`` and why (for ``explain``); empty if nothing to add."""
        return ""

    def forward(self, x: Tensor, req: Request) -> Tensor:
        raise NotImplementedError
