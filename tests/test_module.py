"""Drop-in use: constructors, state_dict compatibility, convert(), the fold cache, backend choice."""
import copy
import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import DEVICE, FAMILIES, OfficialGhost, randomize, rel_err
from torch import nn

import ghost_kernels as gk

timm = pytest.importorskip("timm")  # a test extra: installed by the README's test command
from timm.models.ghostnet import GhostModule as TimmGhost  # noqa: E402
from timm.models.ghostnet import GhostModuleV2 as TimmGhostV2  # noqa: E402

FAMILIES_FIRST = FAMILIES[0]

# (args, kwargs) for the official-style constructor; the same numbers go to timm's.
CONFIGS = [((16, 16), {}), ((16, 33, 1, 3, 5, 2, False), {}), ((8, 7), dict(ratio=4, dw_size=7)),
           ((12, 24, 3), dict(stride=2))]


def test_official_constructor_positional():
    m = gk.GhostModule(16, 33, 1, 3, 5, 2, False)
    assert m.oup == m.out_chs == 33
    assert m.primary_conv[0].stride == (2, 2) and m.cheap_operation[0].kernel_size == (5, 5)
    assert isinstance(m.primary_conv[2], nn.Sequential) and len(m.primary_conv[2]) == 0
    assert m.spec == gk.GhostSpec(16, 33, 1, 3, 5, 2, "none")


def test_timm_constructor_keywords_and_positional_act_layer():
    m = gk.GhostModule(in_chs=16, out_chs=32, act_layer=nn.Identity, device="cpu", dtype=torch.float64)
    assert m.primary_conv[0].weight.dtype == torch.float64 and m.spec.act == "none"
    m2 = gk.GhostModule(16, 32, 1, 2, 3, 1, nn.ReLU)  # timm's 7th positional argument is act_layer
    assert isinstance(m2.cheap_operation[2], nn.ReLU) and m2.spec.act == "relu"
    m3 = gk.GhostModule(16, 32, act_layer=nn.GELU)
    assert m3.spec.act == "other"


@pytest.mark.parametrize("args,kwargs", CONFIGS)
def test_official_state_dict_loads_strictly_both_ways(args, kwargs):
    official = randomize(OfficialGhost(*args, **kwargs))
    ours = gk.GhostModule(*args, **kwargs)
    assert list(ours.state_dict()) == list(official.state_dict())
    ours.load_state_dict(official.state_dict(), strict=True)
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, args[0], 9, 8)
    torch.testing.assert_close(ours.eval()(x), official.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("act_layer", [nn.ReLU, nn.Identity])
@pytest.mark.parametrize("args,kwargs", CONFIGS[:1] + CONFIGS[2:])
def test_timm_state_dict_loads_strictly(args, kwargs, act_layer):
    timm_mod = randomize(TimmGhost(*args, act_layer=act_layer, **kwargs))
    ours = gk.GhostModule(*args, act_layer=act_layer, **kwargs)
    assert list(ours.state_dict()) == list(timm_mod.state_dict())
    ours.load_state_dict(timm_mod.state_dict(), strict=True)
    x = torch.randn(2, args[0], 9, 8)
    torch.testing.assert_close(ours.eval()(x), timm_mod.eval()(x), rtol=0, atol=0)


def test_train_mode_matches_timm_including_running_stats():
    timm_mod = randomize(TimmGhost(8, 12)).to(DEVICE)
    ours = gk.GhostModule(8, 12).to(DEVICE)
    ours.load_state_dict(timm_mod.state_dict())
    for _ in range(3):
        x = torch.randn(4, 8, 6, 6, device=DEVICE)
        torch.testing.assert_close(ours.train()(x), timm_mod.train()(x), rtol=0, atol=0)
    for (name, a), (_, b) in zip(timm_mod.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def random_ghostnet():
    model = timm.create_model("ghostnet_100", pretrained=False, num_classes=10)
    return randomize(model).to(DEVICE).eval()


def test_convert_timm_ghostnet_100_reference_backend():
    model = random_ghostnet()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    gk.convert(model, backend="torch")
    assert sum(isinstance(m, gk.GhostModule) for m in model.modules()) == 32
    assert list(model.state_dict()) == keys
    model.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_convert_timm_ghostnet_100_triton_backend():
    model = random_ghostnet()
    original = copy.deepcopy(model)
    gk.convert(model, backend="triton")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out, eager, ref = model(x), original(x), original.double()(x.double())
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + 1e-6  # fp32, through 32 fused modules


def test_convert_filter_fn_and_official_model():
    model = nn.Sequential(OfficialGhost(8, 16), nn.Sequential(OfficialGhost(16, 8, relu=False)))
    gk.convert(model, filter_fn=lambda name, mod: name != "0")
    assert type(model[0]) is OfficialGhost and isinstance(model[1][0], gk.GhostModule)
    assert gk.convert(model, backend="torch") is model
    assert isinstance(model[0], gk.GhostModule) and model[1][0].backend == "torch"


def test_convert_leaves_lookalikes_alone():
    v2 = TimmGhostV2(8, 16)  # the attention variant is not a GhostModule: it becomes its own fused class
    converted = gk.convert(nn.Sequential(v2))[0]
    assert converted is not v2 and not isinstance(converted, gk.GhostModule) and converted.gated

    class GhostModule(OfficialGhost):  # same name, extra part
        def __init__(self):
            super().__init__(8, 16)
            self.extra = nn.Conv2d(16, 16, 1)

    odd = GhostModule()
    assert not gk.is_ghost_module(odd) and gk.convert(nn.Sequential(odd))[0] is odd
    converted = gk.convert(OfficialGhost(8, 16))  # a Ghost module as the root is returned converted
    assert isinstance(converted, gk.GhostModule)


EDITS = ["data_fill", "ema_data_copy", "no_grad_in_place", "optimizer_step", "load_state_dict", "to_dtype",
         "foreach"]


def apply_edit(mod, edit):
    """One way training codebases change a module's weights or buffers in place."""
    if edit == "data_fill":  # through .data: no version-counter bump
        mod.cheap_operation[1].running_var.data.fill_(4.0)
        mod.primary_conv[1].running_mean.data.add_(0.5)
    elif edit == "ema_data_copy":  # timm's ModelEmaV2 style
        for p in mod.parameters():
            p.data.copy_(0.5 * p.data + 0.5 * torch.randn_like(p))
    elif edit == "no_grad_in_place":
        with torch.no_grad():
            mod.primary_conv[0].weight.mul_(-1.5)
            mod.cheap_operation[1].running_var.mul_(3.0)
    elif edit == "optimizer_step":
        opt = torch.optim.SGD(mod.parameters(), lr=0.5)
        for p in mod.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    elif edit == "load_state_dict":
        mod.load_state_dict(randomize(gk.GhostModule(8, 12)).state_dict())
    elif edit == "to_dtype":
        mod.to(torch.float64).to(torch.float32)
        with torch.no_grad():
            mod.primary_conv[1].weight.add_(1.0)
    elif edit == "foreach":
        with torch.no_grad():
            torch._foreach_mul_(list(mod.parameters()), 0.7)
            torch._foreach_add_([mod.primary_conv[1].running_mean, mod.cheap_operation[1].running_mean], 0.3)


@pytest.mark.parametrize("backend", ["triton", "triton_halo", "torch_folded", "cuda", "auto"])
@pytest.mark.parametrize("edit", EDITS)
def test_fresh_results_after_every_in_place_edit(backend, edit):
    """No cached copy of the weights can go stale: after any in-place edit the next forward is the
    module's current function (issue 9: `.data` edits used to leave a stale BN fold behind)."""
    if backend == "cuda" and gk.available_backends()["cuda"]:
        pytest.skip(f"cuda backend: {gk.available_backends()['cuda']}")
    mod = randomize(gk.GhostModule(8, 12, backend=backend)).to(DEVICE).eval()
    x = torch.randn(2, 8, 7, 9, device=DEVICE)

    def check(what):
        with torch.no_grad():
            out = mod(x)
            ref = gk.GhostModule(8, 12, backend="torch").to(DEVICE).double().eval()
            ref.load_state_dict(mod.state_dict())
            assert rel_err(out, ref(x.double())) < 1e-5, what

    check("first call")
    check("second call")
    apply_edit(mod, edit)
    check(f"after {edit}")


def test_backend_choice_and_reasons():
    mod = randomize(gk.GhostModule(8, 12)).to(DEVICE)
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    # train mode: auto stays on torch and says why; backend="triton" trains; the CUDA C++ backend refuses
    why = "only with backend='triton'" if DEVICE == "cuda" else "CUDA tensors only"
    assert "runs 'torch'" in mod.explain(x) and why in mod.explain(x)
    mod_c = copy.deepcopy(mod)
    mod_c.backend = "cuda"
    with pytest.raises(gk.BackendNotSupported, match="train-mode BatchNorm"):
        mod_c(x)
    mod_c.eval()
    with pytest.raises(gk.BackendNotSupported, match="autograd is needed"):
        mod_c(x)
    mod_t = copy.deepcopy(mod)
    mod_t.backend = "triton"
    assert "runs 'triton'" in mod_t.explain(x)
    with pytest.raises(gk.BackendNotSupported, match="more than 1 value per channel, got 1"):
        mod_t(x[:1, :, :1, :1])
    mod_t.eval()
    with torch.no_grad():
        assert "runs 'triton'" in mod_t.explain(x)
        mod_t(x)
        # auto: torch_folded where no GPU measurement says a fused family is faster (choice.py)
        expected = "runs 'torch_folded'" if DEVICE == "cuda" else "CUDA tensors only"
        assert expected in mod.eval().explain(x)


def test_functional_api_matches_reference():
    spec = gk.GhostSpec(8, 13, ratio=3, stride=2)
    mod = randomize(gk.GhostModule(8, 13, ratio=3, stride=2)).to(DEVICE).eval()
    x = torch.randn(2, 8, 9, 9, device=DEVICE)
    params = gk.GhostParams.from_module(mod)
    assert params.spec == spec
    with torch.no_grad():
        fused = gk.ghost_forward(x, params, backend="triton")
        eager = gk.ghost_forward(x, params, backend="torch")
        mod.double()
        ref = gk.ghost_forward(x.double(), gk.GhostParams.from_module(mod))
        with pytest.warns(DeprecationWarning):  # the 0.1 calling convention still works
            legacy = gk.ghost_module(x.double(), mod.primary_conv[0].weight,
                                     gk.BatchNormState.from_module(mod.primary_conv[1]),
                                     mod.cheap_operation[0].weight,
                                     gk.BatchNormState.from_module(mod.cheap_operation[1]), spec)
    assert rel_err(fused, ref) <= 2 * rel_err(eager, ref) + 1e-6
    assert torch.equal(legacy, ref)


def test_available_backends_and_info_command():
    backends = gk.available_backends()
    assert list(backends) == list(gk.BACKEND_CHOICES[1:]) and backends["torch"] is None
    assert {"torch", "triton", "torch_folded", "triton_halo", "cuda"} <= set(backends)
    for name in backends:  # CUDA here, or TRITON_INTERPRET=1 (set by conftest) on a CPU
        if name.startswith("triton") or name.startswith("torch"):
            assert backends[name] is None, (name, backends[name])
    res = subprocess.run([sys.executable, "-m", "ghost_kernels.info"], capture_output=True, text=True, check=True)
    assert "backends:" in res.stdout and "triton" in res.stdout


def test_torch_backend_runs_the_submodules_themselves():
    """BatchNorm subclasses (SyncBatchNorm after convert_sync_batchnorm) and hooks keep working."""
    model = nn.Sequential(randomize(gk.GhostModule(8, 12)))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ghost = model[0]
    assert isinstance(ghost, gk.GhostModule) and type(ghost.primary_conv[1]) is nn.SyncBatchNorm
    calls = []
    ghost.cheap_operation[1].register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    model.to(DEVICE).eval()
    with torch.no_grad():
        ref = gk.ghost_reference(x.double(), gk.GhostParams(
            ghost.primary_conv[0].weight.double(), _double_bn(ghost.primary_conv[1]),
            ghost.cheap_operation[0].weight.double(), _double_bn(ghost.cheap_operation[1]), ghost.spec))
        ghost.backend = "torch"
        assert rel_err(model(x), ref) < 1e-5 and calls == [(2, 6, 5, 5)]
        ghost.backend = "triton"  # eval: SyncBatchNorm normalizes like BatchNorm2d, so the fold applies
        assert rel_err(model(x), ref) < 1e-5
    assert gk.is_ghost_module(copy.deepcopy(ghost))  # convert() accepts SyncBatchNorm too


def _double_bn(bn):
    st = gk.BatchNormState.from_module(bn)
    return st._replace(**{k: getattr(st, k).double() for k in ("weight", "bias", "running_mean", "running_var")})


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_forward_under_autocast(backend):
    """Under torch.autocast an fp32 module computes in the autocast dtype, as nn.Conv2d would."""
    if backend == "cuda" and (DEVICE != "cuda" or gk.available_backends()["cuda"]):
        pytest.skip("the cuda backend needs the extension and a GPU")
    amp = torch.bfloat16
    mod = randomize(gk.GhostModule(16, 24, backend=backend)).to(DEVICE).eval()
    x = torch.randn(2, 16, 9, 11, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with torch.autocast(DEVICE, dtype=amp):
            out = mod(x)
            mod.backend = "torch"
            eager = mod(x)
        ref = mod.double()(x.double())
    assert out.dtype == eager.dtype == amp and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + 2e-3


# ---- issue 9: convert() says what it did; structural matching; TorchScript ----------------------

class OfficialGhostV2(nn.Module):
    """GhostNetV2's official GhostModuleV2 in its "original" mode (V1's math, an unused gate)."""

    def __init__(self, inp, oup, mode="original"):
        super().__init__()
        self.mode = mode
        self.gate_fn = nn.Sigmoid()
        self.oup = oup
        m = math.ceil(oup / 2)
        self.primary_conv = nn.Sequential(nn.Conv2d(inp, m, 1, 1, 0, bias=False), nn.BatchNorm2d(m), nn.ReLU(inplace=True))
        self.cheap_operation = nn.Sequential(nn.Conv2d(m, m, 3, 1, 1, groups=m, bias=False), nn.BatchNorm2d(m),
                                             nn.ReLU(inplace=True))

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.oup]


OfficialGhostV2.__name__ = "GhostModuleV2"


def test_convert_reports_logs_and_warns(caplog):
    """ghostnetv3_100 in its training form (re-parameterizable branches): its 32 GhostModuleV3 are
    reported by kind and count, with the fix, in the log (INFO), in a warning, and in the report."""
    model = timm.create_model("ghostnetv3_100", pretrained=False)
    with caplog.at_level(logging.INFO, logger="ghost_kernels"), pytest.warns(UserWarning) as warned:
        out, report = gk.convert(model, return_report=True)
    assert out is model and not report.converted and len(report.skipped) == 32
    assert all(type(model.get_submodule(n)).__name__ == "GhostModuleV3" for n in report.skipped)
    msg = str(warned[0].message)
    assert "converted 0" in msg and "32 x GhostModuleV3" in msg and "reparameterize_model" in msg
    assert any("converted 0 Ghost modules" in r.getMessage() for r in caplog.records)


def test_convert_matches_by_structure(caplog):
    """A subclass of timm's GhostModule, a class named differently, and GhostModuleV2 in "original"
    mode convert (same function); a V2 "attn" module without V2's gate branch is reported. No warning
    when all convert."""
    class MyGhost(TimmGhost):
        pass

    class RenamedGhost(OfficialGhost):
        pass

    model = nn.Sequential(randomize(MyGhost(8, 16)), randomize(RenamedGhost(16, 8)), randomize(OfficialGhostV2(8, 12)))
    model.eval()
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    model.to(DEVICE)
    with torch.no_grad():
        want = [model[0](x), model[1](model[0](x)), model[2](model[1](model[0](x)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # everything converts: no warning
        with caplog.at_level(logging.INFO, logger="ghost_kernels"):
            _, report = gk.convert(model, backend="torch", return_report=True)
    assert report.converted == ["0", "1", "2"] and not report.skipped
    assert all(isinstance(m, gk.GhostModule) for m in model)
    assert "converted 3 Ghost modules" in caplog.text
    with torch.no_grad():
        got = [model[0](x), model[1](model[0](x)), model[2](model[1](model[0](x)))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    attn = OfficialGhostV2(8, 12, mode="attn")   # an attention module without its gate branch
    with pytest.warns(UserWarning, match=r"GhostModuleV2 \(attention\): short_conv is not Sequential"):
        assert gk.convert(nn.Sequential(attn))[0] is attn


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torchscript_script_and_trace_run_the_pytorch_path(mode):
    """torch.jit.script / trace of a converted model used to fail with opaque errors; now they work
    (the Ghost modules' PyTorch path, with a warning saying so) and compute the model's function.
    Scripting leaves the eager model as it was (issue 18: it swapped its children in place, so the
    eager model silently lost its fused kernels, explain() and backend)."""
    import ghost_kernels.module as gm
    model = randomize(nn.Sequential(OfficialGhost(8, 12), OfficialGhost(12, 8, relu=False))).to(DEVICE)
    gk.convert(model, backend="triton")
    getattr(model, mode)()
    x = torch.randn(2, 8, 6, 5, device=DEVICE)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        before = model(x)
    gm._TORCHSCRIPT_WARNED = False
    with pytest.warns(UserWarning, match="TorchScript .* runs the Ghost modules' PyTorch path"):
        scripted = torch.jit.script(model)
    traced = torch.jit.trace(copy.deepcopy(model), x, check_trace=False)
    for ts in (scripted, traced):
        ref = copy.deepcopy(twin)
        ref[0].backend = ref[1].backend = "torch"
        with torch.no_grad():
            torch.testing.assert_close(ts(x), ref(x), rtol=1e-5, atol=1e-6)
    assert all(type(m) is gk.GhostModule and m.backend == "triton" for m in model)
    assert "runs 'triton'" in model[0].explain(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert scripted[0].primary_conv[0].weight is model[0].primary_conv[0].weight   # shared, not copied


# ---- issue 18: convert() converts only what the backend can run; papercuts -------------------------

@pytest.mark.parametrize("ctor,expected", [(dict(act_layer=nn.ReLU6), "activation 'other'"),
                                           (dict(dw_size=9), "dw_size=9"), (dict(kernel_size=9), "kernel_size=9")])
def test_convert_skips_modules_the_named_backend_can_never_run(ctor, expected):
    """convert(..., backend="triton") used to convert a module whose options no Triton path runs (the
    report said converted; the first forward raised): now it is left alone and reported with the
    reason. auto (which falls back to PyTorch) converts it."""
    model = nn.Sequential(TimmGhost(8, 12, **ctor), TimmGhost(12, 8))
    with pytest.warns(UserWarning, match=expected):
        _, report = gk.convert(model, backend="triton", return_report=True)
    assert report.converted == ["1"] and list(report.skipped) == ["0"]
    assert "backend='triton' cannot run its options" in report.skipped["0"] and expected in report.skipped["0"]
    assert type(model[0]) is TimmGhost and isinstance(model[1], gk.GhostModule)
    _, report = gk.convert(nn.Sequential(TimmGhost(8, 12, **ctor)), backend="auto", return_report=True)
    assert report.converted == ["0"]


def test_convert_reports_skipped_modules_once(caplog):
    """With logging on, the skipped modules used to be reported twice (the INFO line and the warning):
    the INFO line counts, the warning gives the details."""
    model = nn.Sequential(TimmGhost(8, 12, act_layer=nn.ReLU6), TimmGhost(12, 8))
    with caplog.at_level(logging.INFO, logger="ghost_kernels"), pytest.warns(UserWarning) as warned:
        gk.convert(model, backend="triton")
    assert len(warned) == 1 and "ReLU6" in str(warned[0].message)
    info = [r.getMessage() for r in caplog.records if r.name == "ghost_kernels"]
    assert info == ["ghost_kernels.convert: converted 1 Ghost modules; left 1 Ghost-like modules as they were "
                    "(see the warning)"], info


def test_conflicting_constructor_arguments_raise():
    with pytest.raises(TypeError, match="inp=16 and in_chs=8 conflict"):
        gk.GhostModule(inp=16, in_chs=8, oup=8)
    with pytest.raises(TypeError, match="oup=8 and out_chs=4 conflict"):
        gk.GhostModule(16, 8, out_chs=4)
    with pytest.raises(TypeError, match="relu .* or act_layer .*, not both"):
        gk.GhostModule(8, 8, relu=False, act_layer=nn.ReLU)
    with pytest.raises(TypeError, match="act_layer given twice"):
        gk.GhostModule(8, 8, 1, 2, 3, 1, nn.ReLU, act_layer=nn.Identity)
    assert gk.GhostModule(inp=8, in_chs=8, oup=4).spec.inp == 8      # the same value twice is fine
    assert gk.GhostModule(8, 8, relu=False).spec.act == "none"


def test_backend_assignment_is_checked_at_once():
    m = gk.GhostModule(8, 8)
    with pytest.raises(ValueError, match="backend must be one of .* got 'tritonn'"):
        m.backend = "tritonn"
    assert m.backend == "auto"
    m.backend = "torch"
    assert m.backend == "torch" and "backend='torch'" in repr(m)


def test_params_of_a_non_ghost_module_and_repr():
    with pytest.raises(TypeError, match=r"Conv2d does not have the Ghost module structure \(primary_conv and "
                                        r"cheap_operation"):
        gk.GhostParams.from_module(nn.Conv2d(1, 1, 1))
    text = repr(gk.GhostModule(8, 12).params())
    assert "w1=torch.float32[6, 8, 1, 1]" in text and "tensor(" not in text and len(text) < 1000


def test_package_metadata_version_and_typing():
    """One version (ghost_kernels/_version.py, which pyproject.toml reads) and a py.typed marker."""
    import importlib.metadata
    import os
    root = os.path.dirname(gk.__file__)
    assert os.path.exists(os.path.join(root, "py.typed"))
    pyproject = open(os.path.join(os.path.dirname(root), "pyproject.toml")).read()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "ghost_kernels._version.__version__"' in pyproject
    assert "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]
    assert importlib.metadata.version("ghost_kernels") == gk.__version__
    info = subprocess.run([sys.executable, "-m", "ghost_kernels.info"], capture_output=True, text=True, check=True)
    assert gk.__version__ in info.stdout


# ---- issue 15: the per-module cache sees every way a parameter or option can change ------------------

REPLACEMENTS = ["assign_parameter", "assign_buffer", "load_state_dict_assign", "replace_batchnorm",
                "replace_activation", "bn_eps", "param_data_swap", "half_and_back", "oup_attribute"]


def apply_replacement(mod, what):
    """Changes that replace an object (or an option) instead of editing a tensor in place."""
    if what == "assign_parameter":
        mod.primary_conv[0].weight = nn.Parameter(torch.randn_like(mod.primary_conv[0].weight))
    elif what == "assign_buffer":
        mod.cheap_operation[1].running_var = torch.rand_like(mod.cheap_operation[1].running_var) + 2.0
    elif what == "load_state_dict_assign":
        mod.load_state_dict(randomize(gk.GhostModule(8, 12)).to(DEVICE).state_dict(), assign=True)
    elif what == "replace_batchnorm":
        mod.primary_conv[1] = randomize(nn.BatchNorm2d(6)).to(DEVICE).eval()
    elif what == "replace_activation":   # the spec changes: ReLU -> identity on both
        mod.primary_conv[2] = nn.Identity()
        mod.cheap_operation[2] = nn.Identity()
    elif what == "bn_eps":
        mod.cheap_operation[1].eps = 0.5
    elif what == "param_data_swap":
        mod.cheap_operation[0].weight.data = torch.randn_like(mod.cheap_operation[0].weight)
    elif what == "half_and_back":
        mod.half()
        mod.primary_conv[1].running_mean.data.add_(1.0)
        mod.float()
    elif what == "oup_attribute":
        mod.oup = 11


@pytest.mark.parametrize("backend", ["triton", "torch_folded"])
@pytest.mark.parametrize("what", REPLACEMENTS)
def test_fresh_results_after_every_replacement(backend, what):
    """The module caches its parameter bundle and backend choice (issue 15, host overhead): every way
    of replacing a tensor, a submodule or an option is seen by the next call."""
    mod = randomize(gk.GhostModule(8, 12, backend=backend)).to(DEVICE).eval()
    x = torch.randn(2, 8, 5, 6, device=DEVICE)

    def check(label):
        with torch.no_grad():
            out = mod(x)
            ref = copy.deepcopy(mod).double()
            ref.backend = "torch"
            assert rel_err(out, ref(x.double())) < 1e-5, label

    check("first call")
    check("cached call")
    apply_replacement(mod, what)
    check(f"after {what}")


def test_cache_survives_registrations_elsewhere_and_sees_plain_attribute_edits():
    """The identity comparison runs after any registration in the process (module.py's docstring):
    a module built elsewhere keeps this module's entry; a dtype changed through ``.data``, a
    BatchNorm's ``momentum`` in training, and the documented escape after surgery on ``_modules``
    are each seen by the next call."""
    from ghost_kernels import module as gm
    mod = randomize(gk.GhostModule(8, 12, backend="triton")).to(DEVICE).eval()
    x = torch.randn(2, 8, 5, 6, device=DEVICE)
    with torch.no_grad():
        mod(x)
        entry = gm._STATES[mod]
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))   # registrations: the count moves
        assert gm._REGISTRATIONS != entry.registrations
        mod(x)
        assert gm._STATES[mod].params is entry.params and gm._STATES[mod].plans is entry.plans
        mod.cheap_operation[0].weight.data = mod.cheap_operation[0].weight.data.double()   # same object
        with pytest.raises(TypeError, match="wd .cheap conv weight. has dtype torch.float64"):
            mod(x)
        mod.cheap_operation[0].weight.data = mod.cheap_operation[0].weight.data.float()
        # surgery that bypasses PyTorch's hooks, then the documented escape
        mod.primary_conv._modules["1"] = randomize(nn.BatchNorm2d(6)).to(DEVICE).eval()
        mod.backend = mod.backend
        ref = copy.deepcopy(mod).double()
        ref.backend = "torch"
        assert rel_err(mod(x), ref(x.double())) < 1e-5
    # momentum between two training steps (an option of the running-statistics update)
    mod.train()
    ref.train()
    for step, momentum in enumerate((0.1, 0.75)):
        for m in (mod, ref):
            m.primary_conv[1].momentum = momentum
            m.cheap_operation[1].momentum = momentum
        mod(x), ref(x.double())
        for a, b in ((mod.primary_conv[1], ref.primary_conv[1]), (mod.cheap_operation[1], ref.cheap_operation[1])):
            assert rel_err(a.running_mean, b.running_mean) < 1e-5, step
            assert rel_err(a.running_var, b.running_var) < 1e-5, step


def test_cached_choice_follows_mode_grad_and_requires_grad():
    """train/eval, grad mode, requires_grad and autocast are part of each call's key: an explicit
    inference family runs eval calls without autograd and refuses the others, whatever ran before."""
    mod = randomize(gk.GhostModule(8, 12, backend=FAMILIES_FIRST)).to(DEVICE).eval()
    x = torch.randn(2, 8, 5, 6, device=DEVICE)
    with torch.no_grad():
        mod(x)
    with pytest.raises(gk.BackendNotSupported, match="autograd is needed"):
        mod(x)                                   # grad mode on, parameters require grad
    mod.requires_grad_(False)
    mod(x)                                       # nothing needs grad: the inference family runs
    with pytest.raises(gk.BackendNotSupported, match="autograd is needed"):
        mod(x.requires_grad_())
    mod.train()
    with torch.no_grad(), pytest.raises(gk.BackendNotSupported, match="train-mode BatchNorm"):
        mod(x.detach())
    mod.eval().backend = "triton"
    ref = copy.deepcopy(mod).double()
    ref.backend = "torch"
    with torch.no_grad():
        assert rel_err(mod(x.detach()), ref(x.detach().double())) < 1e-5


def test_readme_shows_every_backend():
    """The README's available_backends() example lists every key the function returns, in order."""
    import os
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = readme[readme.index("gk.available_backends()"):]
    block = block[:block.index("print(m.explain(x))")]
    assert re.findall(r"'(\w+)': None", block) == list(gk.available_backends())


@pytest.mark.parametrize("backend", FAMILIES)
def test_replayed_launches_compute_each_new_input(backend):
    """A repeat call of the same kind replays the family's recorded launches (LaunchPlan: issue 15,
    host overhead) with this call's x and out: new data each call, a view at another offset (x's
    alignment is part of the key: it decides the TMA path), channels_last and NCHW, and an in-place
    weight edit between calls, each equal to the reference. 40 input channels: a K loop (fp32: 16 a
    step), where band reads w1 through a TMA descriptor of a view of the weight."""
    from ghost_kernels import module as gm
    mod = randomize(gk.GhostModule(40, 12, backend=backend)).to(DEVICE).eval()
    ref = copy.deepcopy(mod).double()
    ref.backend = "torch"
    big = torch.randn(3, 40, 6, 7, device=DEVICE)
    flat = torch.randn(2 * 40 * 6 * 7 + 1, device=DEVICE)
    inputs = [torch.randn(2, 40, 6, 7, device=DEVICE), torch.randn(2, 40, 6, 7, device=DEVICE), big[1:],
              flat[1:].view(2, 40, 6, 7), flat[:-1].view(2, 40, 6, 7),
              torch.randn(2, 40, 6, 7, device=DEVICE).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 40, 6, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)]
    with torch.no_grad():
        for i, x in enumerate(inputs):
            if i == 2:
                mod.primary_conv[0].weight.mul_(-1.5)
                ref.primary_conv[0].weight.mul_(-1.5)
            assert rel_err(mod(x), ref(x.double())) < 1e-5, i
    replays = gm._STATES[mod].replays
    if gk.dispatch.BY_NAME[backend].replayable:
        assert any(r is not None for r in replays.values())
