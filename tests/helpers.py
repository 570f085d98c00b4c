"""Helpers shared by the tests: random parameters, the float64 oracle, the error bound."""
import math

import torch
from torch import nn

import ghost_kernels as gk
from ghost_kernels.reference import BatchNormState

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Error floor per dtype (relative L2), below which differences are rounding noise whatever eager
# does; the real bound is "at most about twice eager's error at the same dtype".
ERR_FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in ``out`` that ``ref`` lacks gives inf."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if torch.isnan(out64).ne(torch.isnan(ref64)).any():
        return float("inf")
    finite = ~torch.isnan(ref64)
    return ((out64 - ref64)[finite].norm() / ref64[finite].norm().clamp_min(1e-300)).item()


def random_bn(c: int, device, dtype=torch.float32, **kwargs) -> BatchNormState:
    """BatchNorm state with non-trivial statistics (never the identity of a fresh BN)."""
    g = dict(device=device, dtype=dtype)
    return BatchNormState(
        torch.rand(c, **g) + 0.5, torch.randn(c, **g) * 0.5, torch.randn(c, **g) * 0.5,
        torch.rand(c, **g) + 0.5, torch.tensor(0, device=device), kwargs.get("momentum", 0.1),
        kwargs.get("eps", 1e-5), True,
    )


class GhostParams:
    """Random weights and BN states of a Ghost module, castable to any dtype."""

    def __init__(self, spec: gk.GhostSpec, device, dtype=torch.float32):
        self.spec = spec
        k, d = spec.kernel_size, spec.dw_size
        self.w1 = torch.randn(spec.m, spec.inp, k, k, device=device, dtype=dtype) / (spec.inp * k * k) ** 0.5
        self.wd = torch.randn(spec.new, 1, d, d, device=device, dtype=dtype) / d
        self.bn1 = random_bn(spec.m, device, dtype)
        self.bn2 = random_bn(spec.new, device, dtype)

    def to(self, dtype) -> "GhostParams":
        new = GhostParams.__new__(GhostParams)
        new.spec = self.spec
        new.w1, new.wd = self.w1.to(dtype), self.wd.to(dtype)
        cast = lambda bn: bn._replace(**{f: getattr(bn, f).to(dtype) for f in  # noqa: E731
                                         ("weight", "bias", "running_mean", "running_var")})
        new.bn1, new.bn2 = cast(self.bn1), cast(self.bn2)
        return new

    def reference(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return gk.ghost_reference(x, self.w1, self.bn1, self.wd, self.bn2, self.spec, **kwargs)

    def fold(self, dtype) -> gk.FoldedGhost:
        return gk.fold_ghost(self.w1, self.bn1, self.wd, self.bn2, self.spec, dtype)


def eager_and_ref(params: GhostParams, x: torch.Tensor):
    """(eager PyTorch at x's dtype, float64 reference) outputs, eval mode."""
    eager = params.to(x.dtype).reference(x)
    ref = params.to(torch.float64).reference(x.to(torch.float64))
    return eager, ref


def assert_close_to_reference(out, eager, ref, dtype, what=""):
    err, eager_err = rel_err(out, ref), rel_err(eager, ref)
    bound = 2 * eager_err + ERR_FLOOR[dtype]
    assert err <= bound, f"{what}: rel err {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e})"


class GhostModule(nn.Module):
    """The official GhostNet code's GhostModule: same name, constructor and structure (written here
    for the tests; convert() recognizes Ghost modules by class name and structure)."""

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


OfficialStyleGhost = GhostModule


class GhostBottleneckLite(nn.Module):
    """GhostNet's bottleneck without SE: Ghost (ReLU) -> [depthwise stride 2] -> Ghost (no act), plus a
    shortcut added *in place* into the second Ghost module's output, as timm's GhostBottleneck does."""

    def __init__(self, inp, mid, out, stride=1):
        super().__init__()
        self.ghost1 = GhostModule(inp, mid, relu=True)
        self.dw = (nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
                   if stride > 1 else nn.Identity())
        self.ghost2 = GhostModule(mid, out, relu=False)
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
