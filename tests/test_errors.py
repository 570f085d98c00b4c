"""Bad input gets a clear exception naming the argument and what was expected."""
import pytest
import torch
from helpers import DEVICE, GhostParams, randomize, rel_err
from torch import nn

import ghost_kernels as gk
from ghost_kernels.triton_forward import ghost_forward_triton


@pytest.fixture
def mod():
    return randomize(gk.GhostModule(8, 12)).to(DEVICE).eval()


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bad_inputs_raise_clear_errors(mod, backend):
    mod.backend = backend
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"x must have 8 channels \(dim 1\), got shape \(2, 7, 5, 5\)"):
            mod(torch.randn(2, 7, 5, 5, device=DEVICE))
        with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\), got shape \(8, 5, 5\)"):
            mod(torch.randn(8, 5, 5, device=DEVICE))
        with pytest.raises(TypeError, match="x has dtype torch.float64 but the module's parameters are torch.float32"):
            mod(torch.randn(1, 8, 5, 5, device=DEVICE, dtype=torch.float64))
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            mod(torch.ones(1, 8, 5, 5, device=DEVICE, dtype=torch.int32))
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            mod([[1.0]])
        with pytest.raises(ValueError, match="x is on meta but the module's parameters are on"):
            mod(torch.empty(1, 8, 5, 5, device="meta"))


def test_unknown_backend_names():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton', 'cuda'\), got 'cudnn'"):
        gk.GhostModule(8, 12, backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.convert(nn.Sequential(gk.GhostModule(8, 12)), backend="tritonn")
    spec = gk.GhostSpec(8, 12)
    p = GhostParams(spec, DEVICE)
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.ghost_module(torch.randn(1, 8, 4, 4, device=DEVICE), p.w1, p.bn1, p.wd, p.bn2, spec, backend="fast")


@pytest.mark.parametrize("ctor,expected", [
    (dict(kernel_size=3), "kernel_size=3"),
    (dict(stride=3), "stride=3"),
    (dict(ratio=5), "ratio=5"),
    (dict(dw_size=9), "dw_size=9"),
    (dict(act_layer=nn.Hardswish), "activation other than ReLU"),
])
def test_unsupported_option_on_explicit_backend_raises_and_auto_falls_back(ctor, expected):
    fused = randomize(gk.GhostModule(8, 12, backend="triton", **ctor)).to(DEVICE).eval()
    auto = gk.GhostModule(8, 12, **ctor).to(DEVICE).eval()
    auto.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 9, 9, device=DEVICE)
    with torch.no_grad():
        with pytest.raises(gk.BackendNotSupported, match=expected):
            fused(x)
        assert expected in auto.explain(x)
        fused.backend = "torch"
        torch.testing.assert_close(auto(x), fused(x), rtol=0, atol=0)


def test_unsupported_dtype_and_bn_on_explicit_backend():
    mod = randomize(gk.GhostModule(8, 12, backend="triton")).to(DEVICE).double().eval()
    with torch.no_grad(), pytest.raises(gk.BackendNotSupported, match="dtype torch.float64"):
        mod(torch.randn(1, 8, 5, 5, device=DEVICE, dtype=torch.float64))
    mod = gk.GhostModule(8, 12, backend="cuda").to(DEVICE).eval()
    mod.primary_conv[1] = nn.BatchNorm2d(6, track_running_stats=False).to(DEVICE)
    with torch.no_grad(), pytest.raises(gk.BackendNotSupported, match="without running statistics"):
        mod(torch.randn(2, 8, 5, 5, device=DEVICE))
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    for backend in ("auto", "triton"):  # eager semantics: batch statistics, even in eval mode
        mod.backend = backend
        with torch.no_grad():
            expected = torch.cat([mod.primary_conv(x), mod.cheap_operation(mod.primary_conv(x))], 1)[:, :12]
            assert rel_err(mod(x), expected) < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1), "ratio must be >= 2"),
    (dict(dw_size=4), "dw_size must be odd"),
    (dict(kernel_size=2), "kernel_size must be odd"),
    (dict(stride=0), "stride must be >= 1"),
])
def test_invalid_module_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gk.GhostModule(8, 12, **kwargs)


def test_launcher_rejects_wrong_out():
    spec = gk.GhostSpec(8, 12)
    p = GhostParams(spec, DEVICE)
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(1, 12, 5, 5\)"):
        ghost_forward_triton(x, p.fold(torch.float32), spec, out=torch.empty(1, 12, 5, 4, device=DEVICE))
