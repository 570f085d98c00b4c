"""Bad input gets a clear exception naming the argument and what was expected."""
import re

import pytest
import torch
from helpers import DEVICE, FAMILIES, RandomGhost, randomize, rel_err
from torch import nn

import ghost_kernels as gk
from ghost_kernels import dispatch


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
    names = ", ".join(repr(n) for n in gk.BACKEND_CHOICES)
    assert "'auto', 'torch', 'triton'" in names and "'cuda'" in names
    with pytest.raises(ValueError, match=re.escape(f"backend must be one of ({names}), got 'cudnn'")):
        gk.GhostModule(8, 12, backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.convert(nn.Sequential(gk.GhostModule(8, 12)), backend="tritonn")
    spec = gk.GhostSpec(8, 12)
    p = RandomGhost(spec, DEVICE)
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.ghost_forward(torch.randn(1, 8, 4, 4, device=DEVICE), p.params, backend="fast")


@pytest.mark.parametrize("ctor,expected", [
    (dict(kernel_size=9), "kernel_size=9"),
    (dict(stride=3), "stride=3"),
    (dict(ratio=5), "ratio=5"),
    (dict(dw_size=9), "dw_size=9"),
    (dict(act_layer=nn.ReLU6), "activation 'other'"),
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


@pytest.mark.parametrize("fam", FAMILIES)
def test_launcher_rejects_wrong_out(fam):
    spec = gk.GhostSpec(8, 12)
    p = RandomGhost(spec, DEVICE)
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(1, 12, 5, 5\)"):
        dispatch.BY_NAME[fam].launcher(x, p.params, torch.float32, out=torch.empty(1, 12, 5, 4, device=DEVICE))


# ---- issue 9, bug 2: every parameter validated against the spec, on every backend -----------------

ALL_BACKENDS = ["auto", "torch", "triton", "torch_folded"] + FAMILIES


def _swap(mod, path, new):
    seq, idx = path
    getattr(mod, seq)[idx] = new.to(DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case,match", [
    ("bn1_size", r"bn1 \(primary BatchNorm\)\.weight must have shape \(6,\) for this GhostSpec, got \(4,\)"),
    ("bn2_size", r"bn2 \(cheap BatchNorm\)\.weight must have shape \(6,\) for this GhostSpec, got \(9,\)"),
    ("bn_dtype_device", r"bn1 \(primary BatchNorm\)\.running_mean is on meta but w1"),
])
def test_module_parameters_validated_on_every_backend(backend, case, match):
    """A BatchNorm of the wrong size (silent out-of-bounds reads on triton before) or on another
    device is a clear error naming the tensor, whatever the backend, in eval and train mode."""
    for train in (False, True):
        mod = randomize(gk.GhostModule(8, 12, backend=backend)).to(DEVICE).train(train)
        if case == "bn1_size":
            _swap(mod, ("primary_conv", 1), randomize(nn.BatchNorm2d(4)))
        elif case == "bn2_size":
            _swap(mod, ("cheap_operation", 1), randomize(nn.BatchNorm2d(9)))
        else:
            mod.primary_conv[1].running_mean = torch.empty(6, device="meta")
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            mod(torch.randn(2, 8, 5, 5, device=DEVICE))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_functional_api_validates_every_tensor(backend):
    """The functional API checks both conv weights' shapes (a 3x3 primary weight with kernel_size=1
    returned a wrong shape on torch and an opaque error on triton), the BNs' sizes and dtypes."""
    spec = gk.GhostSpec(8, 12)
    p = RandomGhost(spec, DEVICE)
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    bad = [
        (p.params._replace(w1=torch.randn(6, 8, 3, 3, device=DEVICE)),
         r"w1 \(primary conv weight\) must have shape \(6, 8, 1, 1\) for this GhostSpec, got \(6, 8, 3, 3\)"),
        (p.params._replace(wd=torch.randn(6, 1, 5, 5, device=DEVICE)),
         r"wd \(cheap conv weight\) must have shape \(6, 1, 3, 3\)"),
        (p.params._replace(bn2=p.bn2._replace(running_var=torch.ones(5, device=DEVICE))),
         r"bn2 \(cheap BatchNorm\)\.running_var must have shape \(6,\)"),
        (p.params._replace(bn1=p.bn1._replace(bias=torch.ones(6, device=DEVICE, dtype=torch.int64))),
         r"bn1 \(primary BatchNorm\)\.bias must be a floating-point tensor"),
    ]
    for params, match in bad:
        with torch.no_grad(), pytest.raises((ValueError, TypeError), match=match):
            gk.ghost_forward(x, params, backend=backend)
    with pytest.raises(TypeError, match=r"wd \(cheap conv weight\) has dtype torch.float64 but w1"):
        gk.ghost_forward(x, p.params._replace(wd=p.wd.double()), backend=backend)
    with pytest.raises(TypeError, match="params must be a ghost_kernels.GhostParams"):
        gk.ghost_forward(x, (p.w1, p.bn1), backend=backend)


# ---- issue 18: an empty spatial size is one clear error on every backend -----------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("hw", [(0, 6), (5, 0)])
def test_empty_spatial_size_is_one_clear_error(backend, hw):
    """Eager nn.Conv2d raises for H or W = 0 (a padded-size error not naming x); the fused backends
    said "BackendNotSupported: empty spatial size". Now every backend, in the module and the
    functional API, eval and train, raises the same ValueError naming x. (N = 0 is eager's empty
    result, tests/test_training.py.)"""
    mod = randomize(gk.GhostModule(8, 12, backend=backend)).to(DEVICE)
    x = torch.randn(2, 8, *hw, device=DEVICE)
    match = re.escape(f"x has an empty spatial size (H, W) = {hw}")
    for train in (False, True):
        mod.train(train)
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            mod(x)
    with pytest.raises(ValueError, match=match):
        gk.ghost_forward(x, mod.params(), backend=backend)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        mod.forward_eager(x)   # eager's own forward: an error too
