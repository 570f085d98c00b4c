"""Drop-in use: constructors, state_dict compatibility, convert(), the fold cache, backend choice."""
import copy
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, OfficialStyleGhost, randomize, rel_err
from torch import nn

import ghost_kernels as gk

timm = pytest.importorskip("timm")  # a test extra: installed by the README's test command
from timm.models.ghostnet import GhostModule as TimmGhost  # noqa: E402
from timm.models.ghostnet import GhostModuleV2 as TimmGhostV2  # noqa: E402

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
    m3 = gk.GhostModule(16, 32, act_layer=nn.Hardswish)
    assert m3.spec.act == "other"


@pytest.mark.parametrize("args,kwargs", CONFIGS)
def test_official_state_dict_loads_strictly_both_ways(args, kwargs):
    official = randomize(OfficialStyleGhost(*args, **kwargs))
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
    model = nn.Sequential(OfficialStyleGhost(8, 16), nn.Sequential(OfficialStyleGhost(16, 8, relu=False)))
    gk.convert(model, filter_fn=lambda name, mod: name != "0")
    assert type(model[0]) is OfficialStyleGhost and isinstance(model[1][0], gk.GhostModule)
    assert gk.convert(model, backend="torch") is model
    assert isinstance(model[0], gk.GhostModule) and model[1][0].backend == "torch"


def test_convert_leaves_lookalikes_alone():
    v2 = TimmGhostV2(8, 16)  # attention variant: different forward
    assert gk.convert(nn.Sequential(v2))[0] is v2

    class GhostModule(OfficialStyleGhost):  # same name, extra part
        def __init__(self):
            super().__init__(8, 16)
            self.extra = nn.Conv2d(16, 16, 1)

    odd = GhostModule()
    assert not gk.is_ghost_module(odd) and gk.convert(nn.Sequential(odd))[0] is odd
    converted = gk.convert(OfficialStyleGhost(8, 16))  # a Ghost module as the root is returned converted
    assert isinstance(converted, gk.GhostModule)


def count_folds(monkeypatch):
    calls = []
    real = gk.module.fold_ghost

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gk.module, "fold_ghost", counting)
    return calls


def test_fold_cache_refreshes_when_parameters_or_buffers_change(monkeypatch):
    folds = count_folds(monkeypatch)
    mod = randomize(gk.GhostModule(8, 12, backend="triton")).to(DEVICE).eval()
    x = torch.randn(2, 8, 7, 9, device=DEVICE)

    def check(what, dtype=torch.float32):
        with torch.no_grad():
            out = mod(x.to(dtype))
            ref = gk.GhostModule(8, 12, backend="torch").to(DEVICE).double().eval()
            ref.load_state_dict(mod.state_dict())
            err = rel_err(out, ref(x.double()))
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), what  # bf16 rounding: ~4e-3

    check("first call")
    check("second call")
    assert len(folds) == 1, "unchanged parameters must reuse the cached fold"
    mod.load_state_dict(randomize(gk.GhostModule(8, 12)).state_dict())
    check("after load_state_dict")
    opt = torch.optim.SGD(mod.parameters(), lr=0.5)
    for p in mod.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    check("after an optimizer step")
    with torch.no_grad():
        mod.cheap_operation[1].running_var.mul_(3.0)
    check("after a running_var update")
    mod.to(torch.bfloat16)
    check("after .to(bfloat16)", torch.bfloat16)
    assert len(folds) == 5


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
        expected = "runs 'triton'" if DEVICE == "cuda" else "CUDA tensors only"
        assert expected in mod.eval().explain(x)


def test_functional_api_matches_reference():
    spec = gk.GhostSpec(8, 13, ratio=3, stride=2)
    mod = randomize(gk.GhostModule(8, 13, ratio=3, stride=2)).to(DEVICE).eval()
    x = torch.randn(2, 8, 9, 9, device=DEVICE)
    bn1 = gk.BatchNormState.from_module(mod.primary_conv[1])
    bn2 = gk.BatchNormState.from_module(mod.cheap_operation[1])
    args = (x, mod.primary_conv[0].weight, bn1, mod.cheap_operation[0].weight, bn2, spec)
    with torch.no_grad():
        fused = gk.ghost_module(*args, backend="triton")
        eager = gk.ghost_module(*args, backend="torch")
        mod.double()
        ref = gk.ghost_module(x.double(), mod.primary_conv[0].weight, gk.BatchNormState.from_module(mod.primary_conv[1]),
                              mod.cheap_operation[0].weight, gk.BatchNormState.from_module(mod.cheap_operation[1]), spec)
    assert rel_err(fused, ref) <= 2 * rel_err(eager, ref) + 1e-6


def test_available_backends_and_info_command():
    backends = gk.available_backends()
    assert set(backends) == {"torch", "triton", "cuda"} and backends["torch"] is None
    assert backends["triton"] is None  # CUDA here, or TRITON_INTERPRET=1 (set by conftest) on a CPU
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
        ref = gk.ghost_reference(x.double(), ghost.primary_conv[0].weight.double(),
                                 *[_double_bn(ghost.primary_conv[1]), ghost.cheap_operation[0].weight.double(),
                                   _double_bn(ghost.cheap_operation[1])], ghost.spec)
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
