"""The fused backward's launches (B1-B3 of the design note at the top of ``train_kernels.py``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.batch_stats import all_reduce
from ..core.layout import empty_output, output_memory_format
from ..core.spec import GhostSpec
from . import common as tc
from . import two_pass_train
from .common import triton

if triton is not None:
    from .train_kernels import _bn_input_grad_kernel, _ghost_bwd_kernel


def centred(mean: Tensor, conv_bias: Optional[Tensor]) -> Tensor:
    """The mean of a conv's output *without* its bias, from BN's mean of its input (which includes the
    bias: what running_mean tracks), float32. The kernels compute the bias-free conv output z and
    centre it with this (z + b - mean = z - centred): the forward and the backward call this on the
    same tensors, so both see the same scale and shift bit for bit."""
    mean = mean.float()
    return (mean if conv_bias is None else mean - conv_bias.float()).contiguous()


def bn_affine(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """y = z * scale + shift for BN with the given mean (of z: see :func:`centred`) and 1/std (float32)."""
    scale = invstd if weight is None else invstd * weight.float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale.contiguous(), shift.contiguous()


def _pixels(t: Tensor) -> Tensor:
    """N x C x H x W -> (N H W) x C (a view for channels_last tensors)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _bn_backward_coeffs(sum_g: Tensor, sum_gz: Tensor, count: float, invstd: Tensor, weight: Optional[Tensor],
                        batch_stats: bool):
    """dL/dz = a g + b + c (z - mean) for BN's input, from the reductions sum(g) and sum(g (z - mean))."""
    a = invstd if weight is None else invstd * weight.float()
    if not batch_stats:
        return a, torch.zeros_like(a), torch.zeros_like(a)
    return a, -a * sum_g / count, -a * invstd * invstd * sum_gz / count


def backward_config(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype) -> tc.TileConfig:
    """The forward's tiling with a halo of 2 (d // 2), on 8 warps: six BLOCK_M x lanes fp32 tiles are live
    at once (z1, y1, z2, its gradient, dL/dy1, a tap), ~250 registers a thread on 4 warps (ptxas, sm_90)."""
    return tc.pick_config(spec, ho, wo, dtype, pad=2 * (spec.dw_size // 2))._replace(num_warps=8)


def train_backward(grad: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], bn1_weight: Optional[Tensor],
                   bn1_bias: Optional[Tensor], wd: Tensor, b2: Optional[Tensor], bn2_weight: Optional[Tensor],
                   bn2_bias: Optional[Tensor], mean1: Tensor, invstd1: Tensor, mean2: Tensor, invstd2: Tensor,
                   spec: GhostSpec, batch_stats1: bool, batch_stats2: bool, sync_group: Optional[int] = None):
    """Gradients (x, w1, b1, bn1 weight, bn1 bias, wd, b2, bn2 weight, bn2 bias) of :func:`train_forward`
    (None for an absent conv bias or BN affine parameter). ``mean1``/``mean2``: the forward's BN means,
    which include the conv biases."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    dev = x.device
    cdtype = w1.dtype
    w1m = w1.reshape(spec.m, spec.inp).contiguous()
    wdm = wd.reshape(spec.new, spec.dw_size ** 2).float().contiguous()
    mean1, mean2 = centred(mean1, b1), centred(mean2, b2)   # of the bias-free conv outputs the kernels compute
    scale1, shift1 = bn_affine(mean1, invstd1, bn1_weight, bn1_bias)
    scale2, shift2 = bn_affine(mean2, invstd2, bn2_weight, bn2_bias)  # the forward's, bit for bit
    count = float(n * ho * wo)
    if sync_group is not None:
        cnt = torch.tensor([count], dtype=torch.float64, device=dev)
        count = float(all_reduce(cnt, sync_group).item())

    # B0 + B1, before B2's buffers exist (the scratch y1 is their peak): y1 as the forward's F2 wrote it
    # (same kernel, scale and shift: bit for bit), then BN2's backward sums from the stencil's GRAD pass
    # (z2 and u2 as F4 computed them)
    ybuf = empty_output(x, spec.oup, spec.stride, cdtype)
    two_pass_train.train_pass1(x, ybuf, w1, scale1, shift1, spec, cdtype)
    sums2 = two_pass_train.grad_sums2(x, ybuf, grad, wd, scale2, shift2, mean2, spec, cdtype)
    del ybuf

    pad = spec.dw_size // 2
    cfg = backward_config(spec, ho, wo, cdtype)
    n_th, n_tw, n_mb, total = tc.tile_grid(spec, n, ho, wo, cfg, 2 * pad)
    r1, bm, taps = spec.ratio - 1, cfg.BLOCK_M, spec.dw_size ** 2
    variant = ("bwd", x.device.index, x.dtype, cdtype, spec.stride, spec.ratio, spec.dw_size, spec.act,
               batch_stats2, cfg)
    programs = tc.persistent_programs(variant, x, max(total, 1))
    lanes = cfg.HALO_H * cfg.HALO_W
    y1s = torch.empty(programs * bm * lanes, dtype=cdtype, device=dev)
    gzs = torch.empty(programs * bm * lanes, dtype=torch.float32, device=dev)
    g1m = torch.empty(n, spec.m, ho, wo, dtype=torch.float32, device=dev, memory_format=output_memory_format(grad))
    zc1 = torch.empty_like(g1m)
    part1 = torch.empty(2 * max(total, 1) * bm, dtype=torch.float32, device=dev)
    gwd_part = torch.empty(max(total, 1) * r1 * (taps + 1) * bm, dtype=torch.float32, device=dev)  # + dL/db2
    f32 = lambda v: v.float().contiguous()  # noqa: E731

    def launch(part, ga2, gb2, gc2):
        with tc.device_ctx(x):
            return tc.launch(
                _ghost_bwd_kernel, (programs,),
                x, grad, w1m, scale1, shift1, mean1, wdm, mean2, scale2, shift2,
                f32(ga2), f32(gb2), f32(gc2), y1s, gzs, part, gwd_part, g1m, zc1,
                spec.inp, ho, wo, spec.m, spec.oup,
                *x.stride(), *grad.stride(), *g1m.stride(),
                n_th, n_tw, n_mb, total,
                # the tile loop, the K loop, then per ghost multiplier the z2 taps, the dL/dwd and
                # transposed-conv taps: dy/dx loop pairs
                loops=(total / programs, triton.cdiv(spec.inp, cfg.BLOCK_K)) + (float(spec.dw_size),) * 4 * r1,
                STRIDE=spec.stride, RATIO=spec.ratio, DW=spec.dw_size, ACT=tc.act_code(spec.act),
                BATCH2=batch_stats2, HALO_H=cfg.HALO_H, HALO_W=cfg.HALO_W, BLOCK_M=bm, BLOCK_K=cfg.BLOCK_K,
                IEEE=cdtype == torch.float32, DOT_F32=tc.interpreting() and cdtype == torch.bfloat16,
                num_warps=cfg.num_warps)

    # BN parameter gradients from this rank's sums (DDP averages them over ranks, as for SyncBatchNorm);
    # the input gradient's coefficients from the sums over all ranks
    g_bn2w = None if bn2_weight is None else (sums2[1] * invstd2).to(bn2_weight.dtype)
    g_bn2b = None if bn2_bias is None else sums2[0].to(bn2_bias.dtype)
    if sync_group is not None:
        sums2 = all_reduce(sums2.clone(), sync_group)
    ga2, gb2, gc2 = _bn_backward_coeffs(sums2[0], sums2[1], count, invstd2, bn2_weight, batch_stats2)

    if total:
        tc.remember_occupancy(variant, launch(part1, ga2, gb2, gc2), x, cfg.num_warps)
        sums1 = part1.view(2, total // n_mb, n_mb * bm).sum(1)[:, :spec.m]
        per_tap = gwd_part.view(total // n_mb, n_mb, r1, taps + 1, bm).sum(0).permute(0, 3, 1, 2)
        per_tap = per_tap.reshape(-1, taps + 1)[:spec.new]
        gwd, g_b2 = per_tap[:, :taps], per_tap[:, taps]
    else:
        g1m.zero_(), zc1.zero_()
        sums1 = torch.zeros(2, spec.m, dtype=torch.float32, device=dev)
        gwd = torch.zeros(spec.new, taps, dtype=torch.float32, device=dev)
        g_b2 = torch.zeros(spec.new, dtype=torch.float32, device=dev)
    g_bn1w = None if bn1_weight is None else (sums1[1] * invstd1).to(bn1_weight.dtype)
    g_bn1b = None if bn1_bias is None else sums1[0].to(bn1_bias.dtype)
    if sync_group is not None:
        sums1 = all_reduce(sums1.clone(), sync_group)
    ga1, gb1, gc1 = _bn_backward_coeffs(sums1[0], sums1[1], count, invstd1, bn1_weight, batch_stats1)

    gx, gw1, g_b1 = _pointwise_conv_grads(g1m, zc1, (ga1, gb1, gc1), batch_stats1, x, w1, spec, b1 is not None)
    # every gradient dense and contiguous, as the op's fake implementation promises (gwd is a
    # permuted view of the per-tile sums until here)
    return (gx, gw1, None if b1 is None else g_b1.to(b1.dtype), g_bn1w, g_bn1b,
            gwd.reshape(wd.shape).to(wd.dtype).contiguous(), None if b2 is None else g_b2.to(b2.dtype, copy=True),
            g_bn2w, g_bn2b)


def _pointwise_conv_grads(g1m: Tensor, zc1: Tensor, coeffs, batch_stats1: bool, x: Tensor, w1: Tensor,
                          spec: GhostSpec, with_bias: bool = False):
    """B3: dL/dz1 = a g1m + b + c (z1 - mean1) in one elementwise pass (compute dtype), then the 1x1
    conv's gradients as two GEMMs (cuBLAS): dL/dx = dL/dz1 w1, dL/dw1 = dL/dz1^T x (stride s: x is
    sampled at every s-th row and column, and dL/dx is zero elsewhere); ``with_bias``: also the conv
    bias's, dL/db1 = the sum of dL/dz1 over N, H', W' (float32; None without)."""
    n, _, ho, wo = g1m.shape
    cdtype = w1.dtype
    ga1, gb1, gc1 = (v.float().contiguous() for v in coeffs)
    gz1 = torch.empty_like(g1m, dtype=cdtype)
    if gz1.numel():
        block = 1024
        with tc.device_ctx(x):
            tc.launch(
                _bn_input_grad_kernel, (triton.cdiv(gz1.numel(), block),),
                g1m, zc1, gz1, ga1, gb1, gc1, gz1.numel(), spec.m, ho * wo, loops=(),
                CHANNELS_LAST=output_memory_format(g1m) == torch.channels_last and spec.m > 1, BATCH=batch_stats1,
                BLOCK=block, num_warps=4)
    xs = x[:, :, ::spec.stride, ::spec.stride] if spec.stride > 1 else x
    gz1p = _pixels(gz1)
    gw1 = (gz1p.t() @ _pixels(xs).to(cdtype)).reshape(w1.shape)
    gb1 = gz1p.sum(0, dtype=torch.float32) if with_bias else None
    gxs = (gz1p @ w1.reshape(spec.m, spec.inp)).reshape(n, ho, wo, spec.inp).permute(0, 3, 1, 2)
    if spec.stride > 1:
        gx = torch.zeros_like(x, dtype=cdtype, memory_format=output_memory_format(x))
        gx[:, :, ::spec.stride, ::spec.stride] = gxs
    else:
        gx = gxs.contiguous(memory_format=output_memory_format(x))
    return gx, gw1, gb1




# --------------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile, torch.export and opcheck see. Optional BN affine parameters
# (affine=False) are None; running statistics given means "eval-mode BN", None means batch statistics.
