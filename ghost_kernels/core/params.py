"""The tensors of a Ghost module, bundled: :class:`BatchNormState` and :class:`GhostParams`.

Every function that needs a module's parameters takes one :class:`GhostParams` (the reference, the
BN fold, the backends, the training ops), named the same way everywhere:

* ``w1``: the primary conv's weight, ``[m, inp, k, k]``;   ``bn1``: its BatchNorm;
* ``wd``: the cheap depthwise conv's weight, ``[m * (ratio - 1), 1, d, d]``;   ``bn2``: its BatchNorm;
* ``spec``: the :class:`~ghost_kernels.core.spec.GhostSpec` (shapes and options).

:meth:`GhostParams.check` validates every tensor against the spec (shapes, dtypes, devices), so a
BatchNorm of the wrong size is an error on every backend, never an out-of-bounds read in a kernel.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor, nn

from .spec import GhostSpec
from .structure import ghost_layers, spec_of


class BatchNormState(NamedTuple):
    """The tensors and options of an ``nn.BatchNorm2d``, for the functional API.

    Tensors are shared with the module they came from, so running statistics updated in train mode
    land in that module, as they would in eager PyTorch.
    """

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    track_running_stats: bool = True

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d) -> "BatchNormState":
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                   bn.momentum, bn.eps, bn.track_running_stats)

    @property
    def has_running_stats(self) -> bool:
        return bn_has_running_stats(self)

    def tensors(self):
        """(weight, bias, running_mean, running_var), any of them None."""
        return self.weight, self.bias, self.running_mean, self.running_var

    def __repr__(self) -> str:   # shapes and dtypes, not every value
        fields = ", ".join(f"{f}={_summary(getattr(self, f))}" for f in ("weight", "bias", "running_mean", "running_var"))
        return (f"BatchNormState({fields}, momentum={self.momentum}, eps={self.eps}, "
                f"track_running_stats={self.track_running_stats})")


class GhostParams(NamedTuple):
    """A Ghost module's parameters and buffers (shared, not copied) and its spec."""

    w1: Tensor
    bn1: Optional[BatchNormState]       # None: no BatchNorm (a deployed module, BN folded into the conv)
    wd: Tensor
    bn2: Optional[BatchNormState]
    spec: GhostSpec
    b1: Optional[Tensor] = None         # the primary conv's bias, [m] (deployed forms), or None
    b2: Optional[Tensor] = None         # the cheap conv's bias, [m * (ratio - 1)], or None

    @classmethod
    def from_module(cls, module: nn.Module, spec: Optional[GhostSpec] = None) -> "GhostParams":
        """The parameters of a module with the official/timm structure (``primary_conv`` and
        ``cheap_operation``, each ``Sequential(Conv2d, [BatchNorm2d,] act)``) or of a module of this
        package (its ``ghost_layers()``); a TypeError saying what is missing for any other module."""
        pconv, pbn, _, cconv, cbn, _ = ghost_layers(module)
        if spec is None:
            spec = spec_of(module)
        return cls(pconv.weight, None if pbn is None else BatchNormState.from_module(pbn), cconv.weight,
                   None if cbn is None else BatchNormState.from_module(cbn), spec, pconv.bias, cconv.bias)

    def __repr__(self) -> str:   # shapes and dtypes, not every value
        device = self.w1.device if isinstance(self.w1, Tensor) else None
        biases = "".join(f", {n}={_summary(t)}" for n, t in (("b1", self.b1), ("b2", self.b2)) if t is not None)
        return (f"GhostParams({self.spec}, w1={_summary(self.w1)}, bn1={self.bn1!r}, wd={_summary(self.wd)}, "
                f"bn2={self.bn2!r}{biases}, device={device})")

    @property
    def plain(self) -> bool:
        """Both convs without bias, each followed by a BatchNorm: the form every kernel runs."""
        return self.b1 is None and self.b2 is None and self.bn1 is not None and self.bn2 is not None

    @property
    def has_running_stats(self) -> bool:
        return has_running_stats(self)

    def tensors(self):
        """Every tensor of the bundle (None for what is absent)."""
        bn1, bn2 = self.bn1 or _NO_BN, self.bn2 or _NO_BN
        return (self.w1, self.wd, self.b1, self.b2, *bn1.tensors(), *bn2.tensors())

    def trainable(self):
        """The tensors autograd may differentiate: both conv weights and biases, both BNs' weight and bias."""
        bn1, bn2 = self.bn1 or _NO_BN, self.bn2 or _NO_BN
        return self.w1, bn1.weight, bn1.bias, self.wd, bn2.weight, bn2.bias, self.b1, self.b2

    def check(self) -> "GhostParams":
        """Raise a clear error if a tensor does not fit the spec, or the tensors disagree on dtype
        or device. Returns self."""
        spec = self.spec
        k, d = spec.kernel_size, spec.dw_size
        _check_tensor("w1 (primary conv weight)", self.w1, (spec.m, spec.inp, k, k))
        _check_tensor("wd (cheap conv weight)", self.wd, (spec.new, 1, d, d))
        for name, bn, c in (("bn1 (primary BatchNorm)", self.bn1, spec.m), ("bn2 (cheap BatchNorm)", self.bn2, spec.new)):
            if bn is None:
                continue
            for field, t in zip(("weight", "bias", "running_mean", "running_var"), bn.tensors()):
                if t is not None:
                    _check_tensor(f"{name}.{field}", t, (c,))
            if (bn.running_mean is None) != (bn.running_var is None):
                raise ValueError(f"{name}: running_mean and running_var must both be given or both be None")
        for name, t, c in (("b1 (primary conv bias)", self.b1, spec.m), ("b2 (cheap conv bias)", self.b2, spec.new)):
            if t is not None:
                _check_tensor(name, t, (c,))
        ref = self.w1
        for name, t in self._named_tensors():
            if t.device != ref.device:
                raise ValueError(f"{name} is on {t.device} but w1 (primary conv weight) is on {ref.device}; "
                                 f"every parameter and buffer must be on one device")
        if self.wd.dtype != ref.dtype:  # eager would fail at the cheap conv: y1 has w1's dtype
            raise TypeError(f"wd (cheap conv weight) has dtype {self.wd.dtype} but w1 (primary conv weight) has "
                            f"{ref.dtype}; the two conv weights must share one dtype")
        # BatchNorm tensors may be wider than the convs (BN kept in float32 in a half model, as
        # nn.BatchNorm2d allows); every kernel reads them in float32.
        return self

    def _named_tensors(self):
        yield "w1 (primary conv weight)", self.w1
        yield "wd (cheap conv weight)", self.wd
        for name, t in (("b1 (primary conv bias)", self.b1), ("b2 (cheap conv bias)", self.b2)):
            if t is not None:
                yield name, t
        for name, bn in (("bn1 (primary BatchNorm)", self.bn1), ("bn2 (cheap BatchNorm)", self.bn2)):
            for field, t in zip(("weight", "bias", "running_mean", "running_var"), (bn or _NO_BN).tensors()):
                if t is not None:
                    yield f"{name}.{field}", t


_NO_BN = BatchNormState(None, None, None, None, None)


def _summary(t) -> str:
    return f"{t.dtype}{list(t.shape)}" if isinstance(t, Tensor) else repr(t)


def _check_tensor(name: str, t, shape) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} for this GhostSpec, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


# Functions, not only the properties above: torch 2.6's dynamo cannot evaluate a property of a
# NamedTuple (it becomes "dynamic control flow" under torch.compile / export); the package calls these.
def bn_has_running_stats(bn: Optional[BatchNormState]) -> bool:
    """True for a BatchNorm with running statistics, and for no BatchNorm at all (nothing to estimate)."""
    return bn is None or (bn.running_mean is not None and bn.running_var is not None)


def has_running_stats(params: GhostParams) -> bool:
    """Eval mode can fold both BatchNorms: each has running statistics (or is absent)."""
    return bn_has_running_stats(params.bn1) and bn_has_running_stats(params.bn2)


def op_args(params: GhostParams) -> tuple:
    """The inference ops' tensor and option arguments (``ghost_kernels::triton_forward`` and
    ``ghost_kernels::forward``) from a parameter bundle; :func:`params_from_op` inverts it. An absent
    BatchNorm is passed as ``None`` running statistics (inference ops never see a BatchNorm without
    them: that one normalizes with batch statistics)."""
    spec = params.spec
    return (params.w1, params.b1, *_bn_args(params.bn1), params.wd, params.b2, *_bn_args(params.bn2),
            spec.oup, spec.kernel_size, spec.stride, spec.ratio, spec.dw_size, spec.act)


def _bn_args(bn: Optional[BatchNormState]) -> tuple:
    if bn is None:
        return None, None, None, None, 0.0
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, float(bn.eps)


def params_from_op(x: Tensor, w1, b1, g1, beta1, rm1, rv1, eps1, wd, b2, g2, beta2, rm2, rv2, eps2, oup, kernel_size,
                   stride, ratio, dw_size, act) -> GhostParams:
    spec = GhostSpec.from_op_args(x.shape[1], oup, kernel_size, stride, ratio, dw_size, act)
    bn1 = None if rm1 is None else BatchNormState(g1, beta1, rm1, rv1, None, None, eps1)
    bn2 = None if rm2 is None else BatchNormState(g2, beta2, rm2, rv2, None, None, eps2)
    return GhostParams(w1, bn1, wd, bn2, spec, b1, b2)
