"""The fused backward's launches (B0-B5 of the design note at the top of ``train_kernels.py``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.batch_stats import all_reduce
from ..core.layout import empty_output, output_memory_format
from ..core.spec import GhostSpec
from . import common as tc
from . import two_pass, two_pass_train
from .common import triton
from .two_pass import _bands, _dense, _magic, _sms
from .two_pass_config import PASS2_PROGS

if triton is not None:
    from .train_kernels import _dw_bwd_kernel


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


def train_backward(grad: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], bn1_weight: Optional[Tensor],
                   bn1_bias: Optional[Tensor], wd: Tensor, b2: Optional[Tensor], bn2_weight: Optional[Tensor],
                   bn2_bias: Optional[Tensor], mean1: Tensor, invstd1: Tensor, mean2: Tensor, invstd2: Tensor,
                   spec: GhostSpec, batch_stats1: bool, batch_stats2: bool, sync_group: Optional[int] = None):
    """Gradients (x, w1, b1, bn1 weight, bn1 bias, wd, b2, bn2 weight, bn2 bias) of :func:`train_forward`
    (None for an absent conv bias or BN affine parameter). ``mean1``/``mean2``: the forward's BN means,
    which include the conv biases. Launches B0-B5 of the design note (``train_kernels.py``)."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    dev = x.device
    cdtype = w1.dtype
    mean1, mean2 = centred(mean1, b1), centred(mean2, b2)   # of the bias-free conv outputs the kernels compute
    scale1, shift1 = bn_affine(mean1, invstd1, bn1_weight, bn1_bias)
    scale2, shift2 = bn_affine(mean2, invstd2, bn2_weight, bn2_bias)  # the forward's, bit for bit
    count = float(n * ho * wo)
    if sync_group is not None:
        cnt = torch.tensor([count], dtype=torch.float64, device=dev)
        count = float(all_reduce(cnt, sync_group).item())

    # B0: y1 as the forward's F2 wrote it (same kernel, scale and shift: bit for bit), into a scratch
    # output (out itself may have been changed in place); B1: BN2's backward sums (z2, u2 as F4 had them)
    ybuf = empty_output(x, spec.oup, spec.stride, cdtype)
    channels_last = output_memory_format(x) == torch.channels_last
    two_pass_train.train_pass1(x, ybuf, w1, scale1, shift1, spec, cdtype)
    sums2 = two_pass_train.grad_sums2(x, ybuf, grad, wd, scale2, shift2, mean2, spec, cdtype)
    # BN parameter gradients from this rank's sums (DDP averages them over ranks, as for SyncBatchNorm);
    # the input gradient's coefficients from the sums over all ranks
    g_bn2w = None if bn2_weight is None else (sums2[1] * invstd2).to(bn2_weight.dtype)
    g_bn2b = None if bn2_bias is None else sums2[0].to(bn2_bias.dtype)
    if sync_group is not None:
        sums2 = all_reduce(sums2.clone(), sync_group)
    coeffs2 = _bn_backward_coeffs(sums2[0], sums2[1], count, invstd2, bn2_weight, batch_stats2)
    # B2: g_z2 on the same walk; B3: dL/dy1 = dL/dout[:, :m] + dwconv^T(g_z2), and dL/dwd
    gz2, g_b2 = two_pass_train.grad_z2(x, ybuf, grad, wd, scale2, shift2, mean2, coeffs2, batch_stats2, spec, cdtype)
    dy1, gwd = _depthwise_grads(gz2, ybuf, grad, wd, spec, cdtype)
    del ybuf, gz2
    # B4: BN1's backward sums (z1, u1 recomputed from x with F2's tiles); B5: g_z1 over dL/dy1 in place
    sums1 = two_pass_train.grad_bn1(x, dy1, w1, scale1, shift1, mean1, spec, cdtype, channels_last)
    g_bn1w = None if bn1_weight is None else (sums1[1] * invstd1).to(bn1_weight.dtype)
    g_bn1b = None if bn1_bias is None else sums1[0].to(bn1_bias.dtype)
    if sync_group is not None:
        sums1 = all_reduce(sums1.clone(), sync_group)
    coeffs1 = _bn_backward_coeffs(sums1[0], sums1[1], count, invstd1, bn1_weight, batch_stats1)
    two_pass_train.grad_bn1(x, dy1, w1, scale1, shift1, mean1, spec, cdtype, channels_last, coeffs1, batch_stats1)
    gx, gw1, g_b1 = _pointwise_conv_grads(dy1, x, w1, spec, b1 is not None)
    # every gradient dense and contiguous, as the op's fake implementation promises
    return (gx, gw1, None if b1 is None else g_b1.to(b1.dtype), g_bn1w, g_bn1b,
            gwd.reshape(wd.shape).to(wd.dtype).contiguous(), None if b2 is None else g_b2.to(b2.dtype, copy=True),
            g_bn2w, g_bn2b)


def _depthwise_grads(gz2: Tensor, ybuf: Tensor, grad: Tensor, wd: Tensor, spec: GhostSpec, cdtype: torch.dtype):
    """B3: (dL/dy1 = dL/dout[:, :m] + dwconv^T(g_z2), N x m x H' x W' in ``cdtype`` and y1's layout; dL/dwd
    float32 [m (r - 1), d * d], 0 for the sliced-off ghost channels). dL/dwd comes from the kernel's
    per-lane sums where its weights fit in registers (d*d*(r-1) <= 9: GhostNet's 3x3 at ratio 2), else
    from torch (the depthwise conv's weight gradient, as eager computes it)."""
    n, _, ho, wo = ybuf.shape
    d, r1, kept = spec.dw_size, spec.ratio - 1, spec.oup - spec.m
    dy1 = torch.empty(n, spec.m, ho, wo, dtype=cdtype, device=ybuf.device, memory_format=output_memory_format(ybuf))
    gwd = torch.zeros(spec.new, d * d, dtype=torch.float32, device=ybuf.device)
    if dy1.numel() == 0:
        return dy1, gwd
    wgrad = r1 * d * d <= 9
    pixr, block_c, block_g = _stencil_tiles(spec, wo, ybuf.stride(1) == 1, cdtype)
    wg = -(-wo // pixr)
    u_total = n * wg
    mg_wg, sh_wg = _magic(wg)
    n_ub = -(-u_total // block_g)
    n_cb = -(-spec.m // block_c)
    n_bands, band_rows = _bands(ho, n_ub * n_cb, _sms(ybuf), PASS2_PROGS)
    programs = n_ub * n_bands * n_cb
    part = torch.empty(n_ub * n_bands, max(kept, 1), d * d, dtype=torch.float32, device=ybuf.device) if wgrad else gwd
    gzv = gz2 if kept else dy1       # (nothing of it is read when no ghost channel is kept)
    wdm = wd.reshape(spec.new, d * d).contiguous()
    with tc.device_ctx(ybuf):
        tc.launch(
            _dw_bwd_kernel, (programs,),
            gzv, ybuf, grad, dy1, wdm, part,
            u_total, ho, wo, wg, mg_wg, sh_wg,
            *gzv.stride(), *ybuf.stride(), *grad.stride(), *dy1.stride(),
            n_bands, band_rows,
            loops=(ho / n_bands,) + (() if wgrad else (float(d),)),
            M=spec.m, OUP=spec.oup, KEPT=kept, RATIO=spec.ratio, DW=d, WGRAD=wgrad,
            DENSE=all(_dense(t, (1, 3, 2, 0)) for t in (gzv, ybuf, grad, dy1)),
            BLOCK_G=block_g, BLOCK_C=block_c, PIXR=pixr, STAGES=3 if wgrad else 1, num_warps=4)
    if wgrad:
        gwd[:kept] = part.sum(0)[:kept]
    elif kept:
        gz_all = torch.empty(n, spec.new, ho, wo, dtype=cdtype, device=gz2.device,
                             memory_format=output_memory_format(gz2)).zero_()
        gz_all[:, :kept] = gz2
        y1 = ybuf[:, :spec.m]
        gwd = torch.ops.aten.convolution_backward(
            gz_all, y1, wd.to(cdtype), None, [1, 1], [d // 2] * 2, [1, 1], False, [0, 0], spec.m,
            [False, True, False])[1].reshape(spec.new, d * d).float()
    return dy1, gwd


def _stencil_tiles(spec: GhostSpec, wo: int, channels_last: bool, dtype: torch.dtype):
    """(PIXR, BLOCK_C, BLOCK_G) of B3 on 4 warps: 4 channels a thread (8 or 16 bytes), one or two pixels
    (the hoisted weights and the d*d weight-gradient sums are 2 d*d (r-1) register tiles); under the
    interpreter, wide tiles (its cost is per operation)."""
    if tc.interpreting() and two_pass.INTERPRETER_TILES and not tc.capturing():
        return 1, min(64, tc.next_pow2(spec.m)), 64
    if not channels_last:
        return 1, min(4, tc.next_pow2(spec.m)), 128
    block_c = min(4, tc.next_pow2(spec.m))
    return (2 if wo >= 8 else 1), block_c, 128 * 4 // block_c


def _pointwise_conv_grads(gz1: Tensor, x: Tensor, w1: Tensor, spec: GhostSpec, with_bias: bool = False):
    """The 1x1 conv's gradients from dL/dz1 (``gz1``, compute dtype) as two GEMMs (cuBLAS): dL/dx = dL/dz1 w1,
    dL/dw1 = dL/dz1^T x (stride s: x is sampled at every s-th row and column, and dL/dx is zero
    elsewhere); ``with_bias``: also the conv bias's, dL/db1 = the sum of dL/dz1 over N, H', W' (float32;
    None without)."""
    n, _, ho, wo = gz1.shape
    cdtype = w1.dtype
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
