"""The functional reference is the oracle: it must equal the official/timm modules exactly."""
import copy

import pytest
import torch
from helpers import DEVICE, OfficialGhost, RandomGhost, randomize, rel_err
from torch import nn

import ghost_kernels as gk
from ghost_kernels.core.fold import fold_batch_norm
from ghost_kernels.core.params import BatchNormState
from ghost_kernels.core.reference import batch_norm


def functional(module, x, training):
    spec = gk.GhostSpec(module.primary_conv[0].in_channels, module.oup,
                        module.primary_conv[0].kernel_size[0],
                        module.cheap_operation[0].out_channels // module.primary_conv[0].out_channels + 1,
                        module.cheap_operation[0].kernel_size[0], module.primary_conv[0].stride[0],
                        "relu" if isinstance(module.primary_conv[2], nn.ReLU) else "none")
    return gk.ghost_reference(x, gk.GhostParams.from_module(module, spec), training=training)


BN_OPTIONS = [dict(), dict(momentum=None), dict(momentum=0.3), dict(track_running_stats=False), dict(affine=False)]


@pytest.mark.parametrize("bn_kwargs", BN_OPTIONS, ids=str)
@pytest.mark.parametrize("cfg", [(8, 12, 1, 2, 3, 1, True), (6, 11, 3, 3, 5, 2, False), (5, 9, 1, 4, 1, 2, True)])
def test_reference_equals_module_train_and_eval(bn_kwargs, cfg):
    """Same outputs and same BN buffer updates (momentum, cumulative average, no stats, no affine)."""
    module = randomize(OfficialGhost(*cfg, bn_kwargs=bn_kwargs)).to(DEVICE).double()
    twin = copy.deepcopy(module)
    for step in range(3):
        x = torch.randn(3, cfg[0], 7, 10, device=DEVICE, dtype=torch.float64)
        expected = module.train()(x)
        got = functional(twin, x, training=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for (name, a), (_, b) in zip(module.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    x = torch.randn(2, cfg[0], 5, 6, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(functional(twin, x, training=False), module.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_reference_dtypes(dtype):
    module = randomize(OfficialGhost(8, 13, ratio=3)).to(DEVICE).eval()
    x = torch.randn(2, 8, 6, 7, device=DEVICE)
    ref = functional(copy.deepcopy(module).double(), x.double(), False)
    out = functional(module.to(dtype), x.to(dtype), False)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)


def test_fold_batch_norm_matches_eval_batch_norm():
    bn = BatchNormState(torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64),
                        torch.randn(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64) + 0.5,
                        torch.tensor(0), 0.1, 1e-3, True)
    y = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    scale, shift = fold_batch_norm(bn, torch.float64)
    torch.testing.assert_close(y * scale[:, None, None] + shift[:, None, None], batch_norm(y, bn, False))


def test_folded_parameters_reproduce_the_module():
    """fold_ghost's parameters, applied with plain PyTorch, give the reference output (float64)."""
    spec = gk.GhostSpec(6, 11, ratio=3, dw_size=5, stride=2, act="relu")
    p = RandomGhost(spec, DEVICE, torch.float64)
    f = p.fold(torch.float64)
    x = torch.randn(2, 6, 9, 8, device=DEVICE, dtype=torch.float64)
    y1 = torch.relu(torch.nn.functional.conv2d(x, f.w1[:, :, None, None], stride=2) * f.scale1[:, None, None]
                    + f.shift1[:, None, None])
    y2 = torch.relu(torch.nn.functional.conv2d(y1, f.wd.view(-1, 1, 5, 5), padding=2, groups=spec.m)
                    + f.shift2[:, None, None])
    torch.testing.assert_close(torch.cat([y1, y2], 1)[:, :11], p.reference(x))


def test_fold_without_running_stats_raises():
    bn = BatchNormState(None, None, None, None, None, 0.1, 1e-5, False)
    with pytest.raises(ValueError, match="track_running_stats"):
        fold_batch_norm(bn)
