"""A Triton kernel family as a backend, and the one registered inference op all families share.

A family file (``triton_two_pass.py``, ...) holds its kernels, its launcher and, at the bottom, its
backend object::

    BACKEND = TritonFamily("triton_two_pass", "two passes: ...", launcher=forward, support=Support(...),
                           default_config=default_config, lab_configs=lab_configs)

The launcher's contract: ``launcher(x, params, dtype, out=None, config=None) -> out``, eval-mode BN
folded inside the kernels from ``params`` (the module's own tensors), output of shape
``N x oup x H' x W'`` in ``dtype`` with eager's memory format (``layout.empty_output``), x of any
strides. ``default_config(spec, ho, wo, dtype, channels_last)`` is the launcher's own choice of
tiling, ``lab_configs(...)`` the few alternatives the GPU lab times; a configuration measured faster
on this GPU (``choice.py``) replaces the default. Under torch.compile every family runs as
``torch.ops.ghost_kernels.triton_forward``, with the family's name as an argument: one op and one
fake implementation for all of them.
"""

# No ``from __future__ import annotations`` here: torch 2.6's custom_op evaluates string annotations
# in its own namespace, which has no ``Tuple`` (the op's schema is inferred from them).
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..core import choice
from ..core.backend import Backend, BackendNotSupported, Request, Support, is_compiling
from ..core.layout import empty_output
from ..core.params import op_args, params_from_op
from ..core.spec import ACTIVATIONS, GhostSpec
from . import common as tc

Launcher = Callable[..., Tensor]
FAMILIES: Dict[str, "TritonFamily"] = {}   # name -> family, for the op


# What the inference families run besides the dtypes and geometry: every activation the package
# names (``common.act``), convs with or without a bias and with or without a BatchNorm (the deployed
# forms of GhostNetV3 and of Ultralytics after ``fuse()``: ``common.folded_bn``).
INFERENCE_SUPPORT = Support(acts=ACTIVATIONS, conv_bias=True, without_bn=True)


def triton_environment_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why Triton kernels cannot run here (for ``device``, if given), or None."""
    if tc.triton is None:
        return f"triton is not importable ({tc.TRITON_IMPORT_ERROR!r})"
    interp = tc.interpreting()
    if device is None:
        if torch.cuda.is_available() or interp:
            return None
        return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"
    if device.type == "cuda" or (device.type == "cpu" and interp):
        return None
    if device.type == "cpu":
        return "x is on the CPU: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the interpreter)"
    return f"x is on {device.type}: Triton kernels run on CUDA devices only"


@dataclass
class TritonFamily(Backend):
    """An inference-only Triton kernel family (eval-mode BN folded in the kernels)."""

    launcher: Optional[Launcher] = field(default=None, repr=False)
    default_config: Optional[Callable] = field(default=None, repr=False)
    lab_configs: Optional[Callable] = field(default=None, repr=False)
    # HBM bytes a call moves (spec, n, h, w, element bytes, channels_last) when more than the floor
    # (x read once, out written once): for the offline model's predicted time and the heuristic.
    extra_hbm_bytes: Optional[Callable] = field(default=None, repr=False)
    # ((major, minor), what needs it): the oldest Triton whose language the kernels use
    min_triton: Optional[Tuple[Tuple[int, int], str]] = None
    # the launcher's launches take only x, out, the gate (or views / TMA descriptors of them), the
    # module's own tensors and values computed from sizes: a repeat call may replay them (LaunchPlan)
    replayable: bool = False

    def __post_init__(self):
        if self.launcher is not None:
            if self.support is not None and not hasattr(self.launcher, "unchecked"):
                self.launcher = _spec_checked(self.name, self.support, self.launcher)
            FAMILIES[self.name] = self

    def environment_reason(self, device: Optional[torch.device] = None) -> Optional[str]:
        reason = triton_environment_reason(device)
        if reason is None and self.min_triton is not None and tc.triton_version() < self.min_triton[0]:
            (major, minor), what = self.min_triton
            reason = f"needs Triton >= {major}.{minor} ({what}); this is Triton {tc.triton.__version__}"
        return reason

    def forward(self, x: Tensor, req: Request) -> Tensor:
        if is_compiling():    # an opaque call with a fake implementation
            return triton_forward_op(x, *op_args(req.params), req.gate, req.compute_dtype, self.name)
        return self.launch(x, req)   # eager: no op-dispatch overhead on the hot path

    def measured_config(self, x: Tensor, spec: GhostSpec, dtype: torch.dtype):
        """The configuration measured fastest for this shape on this GPU (choice.py), or None."""
        if self.default_config is None or not x.is_cuda:
            return None
        found = choice.measured_config(self.name, x, spec, dtype)
        if found is None:
            return None
        ho, wo = spec.out_hw(x.shape[2], x.shape[3])
        default = self.default_config(spec, ho, wo, dtype, choice.is_channels_last(x))
        return type(default)(**found)

    def launch(self, x: Tensor, req: Request, out: Optional[Tensor] = None) -> Tensor:
        params, dtype = req.params, req.compute_dtype
        config = self.measured_config(x, params.spec, dtype)
        if req.gate is not None:
            return self.launcher(x, params, dtype, out=out, config=config, gate=req.gate)
        return self.launcher(x, params, dtype, out=out, config=config)

    def launch_and_plan(self, x: Tensor, req: Request) -> Tuple[Tensor, Optional[tc.LaunchPlan]]:
        """Run the launcher and return, with its output, a :class:`~.common.LaunchPlan` that replays
        its launches for calls of the same kind (None where the family is not replayable)."""
        spec = req.spec
        out = empty_output(x, spec.oup, spec.stride, req.compute_dtype)
        if not self.replayable:
            return self.launch(x, req, out), None
        with tc.record_launches() as launches:
            self.launch(x, req, out)
        try:
            plan = tc.LaunchPlan(launches, {"x": x, "out": out, "gate": req.gate},
                                 [t for t in req.params.tensors() if t is not None])
        except tc.NotReplayable:
            plan = None
        return out, plan


def _spec_checked(name: str, support: Support, launcher: Launcher) -> Launcher:
    """``launcher`` behind the family's declared table (``support.spec_reasons``): a direct call (the
    lab, the bench, a user) with a module the kernels do not run raises, naming every reason, instead
    of launching them on it. The dispatcher checks the same table before it gets here."""
    def checked(x, params, dtype, *args, **kwargs):
        reasons = support.spec_reasons(params.spec)
        if reasons:
            raise ValueError(f"{name} cannot run this module: " + "; ".join(reasons))
        return launcher(x, params, dtype, *args, **kwargs)

    functools.update_wrapper(checked, launcher)
    checked.unchecked = launcher
    return checked


def prepare_output(x: Tensor, spec: GhostSpec, dtype: torch.dtype, out: Optional[Tensor]) -> Tensor:
    """The launcher's output: a new tensor with eager's shape and memory format, or ``out`` after
    checking its shape, dtype and device (any strides)."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    if out is None:
        return empty_output(x, spec.oup, spec.stride, dtype)
    if out.shape != (n, spec.oup, ho, wo) or out.dtype != dtype or out.device != x.device:
        raise ValueError(f"out must be a {dtype} tensor of shape {(n, spec.oup, ho, wo)} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


@torch.library.custom_op("ghost_kernels::triton_forward", mutates_args=())
def triton_forward_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], bn1_weight: Optional[Tensor],
                      bn1_bias: Optional[Tensor], bn1_mean: Optional[Tensor], bn1_var: Optional[Tensor],
                      bn1_eps: float, wd: Tensor, b2: Optional[Tensor], bn2_weight: Optional[Tensor],
                      bn2_bias: Optional[Tensor], bn2_mean: Optional[Tensor], bn2_var: Optional[Tensor],
                      bn2_eps: float, oup: int, kernel_size: int, stride: int, ratio: int, dw_size: int, act: str,
                      gate: Optional[Tensor], dtype: torch.dtype, family: str) -> Tensor:
    """Eval-mode Ghost module forward by the Triton kernel family ``family``, computing in ``dtype``
    (arguments: ``core.params.op_args``; ``gate``: GhostNetV2's attention or None). The family's
    size-dependent limits are checked here, with the real sizes (at trace time they may be symbolic:
    ``Backend.not_supported_reasons``)."""
    params = params_from_op(x, w1, b1, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, wd, b2, bn2_weight, bn2_bias, bn2_mean,
                            bn2_var, bn2_eps, oup, kernel_size, stride, ratio, dw_size, act)
    fam = FAMILIES[family]
    req = Request.for_inference(x, params, dtype, gate)
    reasons = fam.size_reasons(req)
    if reasons:
        raise BackendNotSupported(f"backend={family!r} cannot run this input: " + "; ".join(reasons))
    return fam.launch(x, req)


@triton_forward_op.register_fake
def _(x, w1, b1, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, wd, b2, bn2_weight, bn2_bias, bn2_mean, bn2_var,
      bn2_eps, oup, kernel_size, stride, ratio, dw_size, act, gate, dtype, family):
    return empty_output(x, oup, stride, dtype)
