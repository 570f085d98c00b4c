"""Helpers shared by the tests: random parameters, inputs, the float64 oracle, the error bound, the
NaN-poisoned kernel runner, reference modules. Test files import from here (or conftest), never from
each other."""
import contextlib
import itertools
import math

import torch
from torch import nn

import ghost_kernels as gk
from ghost_kernels import dispatch
from ghost_kernels.core.layout import output_memory_format
from ghost_kernels.core.params import BatchNormState
from ghost_kernels.testing import rel_err  # noqa: F401  (the package's one comparison rule)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
# Every Triton kernel family: each family test runs once per name here.
FAMILIES = [f.name for f in dispatch.TRITON_FAMILIES]
# Reduced spatial size per GhostNet resolution: small for the interpreter, >1 tile where it matters.
REDUCED = {112: 12, 56: 9, 28: 6, 14: 5, 7: 3}
# ratio x dw_size x stride x act: the option sweep
SWEEP = list(itertools.product([2, 3, 4], [1, 3, 5, 7], [1, 2], ["relu", "none"]))

# The affine forms after each conv (RandomGhost keywords): BN (the training form), conv bias + BN,
# conv bias without BN (deployed: GhostNetV3, Ultralytics after fuse()), neither
FORMS = {"bn": dict(), "bias+bn": dict(conv_bias=True), "bias": dict(conv_bias=True, bn=False), "plain": dict(bn=False)}

# Error floor per dtype (relative L2), below which differences are rounding noise whatever eager
# does; the real bound is "at most about twice eager's error at the same dtype".
ERR_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float64: 1e-12}


def random_bn(c: int, device, dtype=torch.float32, **kwargs) -> BatchNormState:
    """BatchNorm state with non-trivial statistics (never the identity of a fresh BN)."""
    g = dict(device=device, dtype=dtype)
    return BatchNormState(
        torch.rand(c, **g) + 0.5, torch.randn(c, **g) * 0.5, torch.randn(c, **g) * 0.5,
        torch.rand(c, **g) + 0.5, torch.tensor(0, device=device), kwargs.get("momentum", 0.1),
        kwargs.get("eps", 1e-5), True,
    )


class RandomGhost:
    """Random weights and BN states of a Ghost module (``.params``: a ``gk.GhostParams``), castable to
    any dtype."""

    def __init__(self, spec: gk.GhostSpec, device, dtype=torch.float32, conv_bias: bool = False, bn: bool = True):
        """``conv_bias``: both convs with a bias; ``bn=False``: no BatchNorms (a deployed module)."""
        self.spec = spec
        k, d = spec.kernel_size, spec.dw_size
        self.w1 = torch.randn(spec.m, spec.inp, k, k, device=device, dtype=dtype) / (spec.inp * k * k) ** 0.5
        self.wd = torch.randn(spec.new, 1, d, d, device=device, dtype=dtype) / d
        self.bn1 = random_bn(spec.m, device, dtype) if bn else None
        self.bn2 = random_bn(spec.new, device, dtype) if bn else None
        self.b1 = torch.randn(spec.m, device=device, dtype=dtype) * 0.5 if conv_bias else None
        self.b2 = torch.randn(spec.new, device=device, dtype=dtype) * 0.5 if conv_bias else None

    @property
    def params(self) -> gk.GhostParams:
        return gk.GhostParams(self.w1, self.bn1, self.wd, self.bn2, self.spec, self.b1, self.b2)

    def to(self, dtype) -> "RandomGhost":
        new = RandomGhost.__new__(RandomGhost)
        new.spec = self.spec
        new.w1, new.wd = self.w1.to(dtype), self.wd.to(dtype)
        new.b1, new.b2 = (None if b is None else b.to(dtype) for b in (self.b1, self.b2))
        cast = lambda bn: None if bn is None else bn._replace(**{  # noqa: E731
            f: getattr(bn, f).to(dtype) for f in ("weight", "bias", "running_mean", "running_var")
            if getattr(bn, f) is not None})
        new.bn1, new.bn2 = cast(self.bn1), cast(self.bn2)
        return new

    def reference(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return gk.ghost_reference(x, self.params, **kwargs)

    def fold(self, dtype) -> gk.FoldedGhost:
        return gk.fold_ghost(self.params, dtype)


GhostParams = RandomGhost  # the name the family tests were written against


def eager_and_ref(params: RandomGhost, x: torch.Tensor):
    """(eager PyTorch at x's dtype, float64 reference) outputs, eval mode."""
    eager = params.to(x.dtype).reference(x)
    ref = params.to(torch.float64).reference(x.to(torch.float64))
    return eager, ref


def assert_close_to_reference(out, eager, ref, dtype, what=""):
    err, eager_err = rel_err(out, ref), rel_err(eager, ref)
    bound = 2 * eager_err + ERR_FLOOR[dtype]
    assert err <= bound, f"{what}: rel err {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e})"


class OfficialGhost(nn.Module):
    """The official GhostNet code's GhostModule: same constructor, structure and forward (written here
    for the tests; convert() recognizes Ghost modules by structure, whatever the class name)."""

    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True, bn_kwargs=None):
        super().__init__()
        self.oup = oup
        m = math.ceil(oup / ratio)
        bn_kwargs = bn_kwargs or {}
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, m, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(m, **bn_kwargs),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(m, m * (ratio - 1), dw_size, 1, dw_size // 2, groups=m, bias=False),
            nn.BatchNorm2d(m * (ratio - 1), **bn_kwargs),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.oup]


def randomize(module):
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.BatchNorm2d):
                if mod.affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.5)
                if mod.running_mean is not None:
                    mod.running_mean.normal_(0, 0.5)
                    mod.running_var.uniform_(0.5, 1.5)
    return module


OfficialStyleGhost = OfficialGhost


class GhostBottleneckLite(nn.Module):
    """GhostNet's bottleneck without SE: Ghost (ReLU) -> [depthwise stride 2] -> Ghost (no act), plus a
    shortcut added *in place* into the second Ghost module's output, as timm's GhostBottleneck does."""

    def __init__(self, inp, mid, out, stride=1):
        super().__init__()
        self.ghost1 = OfficialGhost(inp, mid, relu=True)
        self.dw = (nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
                   if stride > 1 else nn.Identity())
        self.ghost2 = OfficialGhost(mid, out, relu=False)
        self.shortcut = (nn.Identity() if inp == out and stride == 1 else nn.Sequential(
            nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
            nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out)))

    def forward(self, x):
        y = self.ghost2(self.dw(self.ghost1(x)))
        y += self.shortcut(x)
        return y


def small_ghost_net(classes: int = 10) -> nn.Module:
    """A GhostNet-shaped network small enough for the Triton interpreter: stem, three bottlenecks
    (one with stride 2, odd channel counts so that the channel slice drops ghost channels), head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        GhostBottleneckLite(8, 12, 8), GhostBottleneckLite(8, 20, 13, stride=2), GhostBottleneckLite(13, 27, 13),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(13, classes),
    )


def make_x(n, c, h, w, dtype, layout):
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=torch.float32).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def poisoned_output(x, spec, dtype=None):
    """A NaN-filled output of eager's shape and memory format: unwritten elements show as NaN."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    out = torch.full((n, spec.oup, ho, wo), float("nan"), dtype=dtype or x.dtype, device=x.device)
    return out.contiguous(memory_format=output_memory_format(x))


def run_poisoned(x, params, spec, backend="triton_halo"):
    """Run a fused kernel into NaN-filled memory, so that unwritten output elements show as NaN.
    ``backend``: a Triton family name, or "cuda"."""
    if backend != "cuda":
        out = poisoned_output(x, spec)
        result = dispatch.BY_NAME[backend].launcher(x, params.params, x.dtype, out=out)
        assert result.data_ptr() == out.data_ptr()
        return out
    # The CUDA op allocates its own output: PyTorch's deterministic mode fills every fresh allocation
    # with NaN (torch.utils.deterministic.fill_uninitialized_memory), that output included.
    from ghost_kernels.cuda import backend as cuda_backend
    folded = params.fold(x.dtype)
    with nan_filled_allocations():
        assert torch.isnan(torch.empty(4, device=x.device, dtype=x.dtype)).all(), "allocations are not NaN-filled"
        return cuda_backend.forward_folded(x, folded, spec)


@contextlib.contextmanager
def nan_filled_allocations():
    """Deterministic mode with NaN fill of uninitialized memory, restored afterwards."""
    mode, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def check(spec, n, h, w, dtype, layout, what, backend="triton_halo", **form):
    """One NaN-poisoned run of a fused kernel against the float64 reference, with eager's strides
    (``form``: RandomGhost's conv_bias / bn)."""
    params = RandomGhost(spec, DEVICE, **form)
    x = make_x(n, spec.inp, h, w, dtype, layout)
    out = run_poisoned(x, params, spec, backend)
    eager, ref = eager_and_ref(params, x)
    assert out.shape == eager.shape
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) elements"
    probe = torch.nn.functional.conv2d(x, x.new_zeros(spec.oup, spec.inp, 1, 1), stride=spec.stride)
    same = all(a == b for a, b, size in zip(out.stride(), probe.stride(), out.shape) if size > 1)
    assert same, f"{what}: output strides {out.stride()} differ from eager conv2d's {probe.stride()}"
    assert_close_to_reference(out, eager, ref, dtype, what)
