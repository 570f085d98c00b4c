"""Train-mode forward and fused backward of the Ghost module in Triton, as torch.library ops.

Design note
===========
Notation: x (N x Cin x H x W), z1 = conv1x1(x, w1, stride) (m channels), y1 = act(BN1(z1)),
z2 = dwconv(y1, wd) (m(r-1) channels), y2 = act(BN2(z2)), out = cat(y1, y2)[:, :oup]; P = N H' W'
output pixels; BN in train mode normalizes with the batch's mean and biased variance.

Forward, train mode: three passes, nothing of size P x m is kept besides the output.

  F1 ``_pw_stats_kernel``   reads x; computes z1 tile by tile (tl.dot) and stores per tile and channel
                            the sum and the tile-centred sum of squares. BN1's batch mean and variance
                            follow (Chan's merge in float64), so z1 is never written. (The statistics
                            could also come from x's Cin x Cin Gram matrix, mean(z1) = W mean(x),
                            E[z1^2] = diag(W E[xx^T] W^T); that costs Cin^2 instead of m Cin products
                            per pixel and cancels in E[z^2] - E[z]^2, so we reduce z1 itself.)
  F2 ``_ghost_fwd_kernel``  (triton_forward.py, STATS=True) reads x again; y1 with BN1 from F1 goes
                            to out[:, :m]; z2 (raw depthwise output, no BN) goes to out[:, m:oup]; each
                            tile stores the statistics of z2 for all m(r-1) ghost channels (those
                            sliced off by oup included: nn.BatchNorm2d tracks them too).
  F3 ``_affine_act_kernel`` BN2 + act in place on out[:, m:oup].
  Bytes: x twice, out once, the ghost half once more read and written: (2 Cin + oup + 2 (oup - m)) b per
  pixel against the floor (Cin + oup) b; eager moves about Cin + 15 m (see ghost-module-notes.md).

Saved for backward: x (eager saves it too) and per-channel mean and 1/std of both BNs. Not the output:
GhostNet's bottleneck adds the shortcut into it in place. y1 and z2 are recomputed from x.

Backward: two launches of ``_ghost_bwd_kernel`` on halo tiles with a halo of 2 (d // 2) pixels (z2 is
needed on a 1-pixel-wider ring than the tile to form the transposed depthwise conv), then cuBLAS.

  B1 (PHASE 1)  recompute z1 -> y1 (halo, scratch slot) -> z2 on the tile; with g2 = dL/dy2 and the
                act mask, store per tile and ghost channel sum(g2m) and sum(g2m (z2 - mean2)): BN2's
                backward reductions (dgamma2, dbeta2).
  B2 (PHASE 2)  recompute as B1, then g_z2 = a2 g2m + b2 + c2 (z2 - mean2) on the tile + ring (the
                BN2 backward with B1's global sums); the per-tile depthwise weight gradient
                sum_p y1(p + tap) g_z2(p) for every tap (stored per tile, summed in torch: no atomics,
                deterministic); g_y1 = g1 + dwconv^T(g_z2) on the tile; g1m = act mask * g_y1; stores
                g1m and z1 - mean1 (fp32) and per tile sum(g1m), sum(g1m (z1 - mean1)) for BN1.
  B3            ``_bn_input_grad_kernel``: g_z1 = a1 g1m + b1 + c1 (z1 - mean1) in one pass (compute
                dtype), then the 1x1 conv's data and weight gradients, two GEMMs (cuBLAS):
                gx = g_z1 w1, gw1 = g_z1^T x.
  Bytes: B1 reads x and the ghost half of dL/dout; B2 reads x and dL/dout and writes two fp32 m-channel
  maps; B3 reads them and x, writes gx. No per-element atomics anywhere: every reduction is a per-tile
  partial summed by torch, so the backward is deterministic whatever
  ``torch.are_deterministic_algorithms_enabled()`` says.

SyncBatchNorm: with a process group, the statistics (count, mean, M2) of both BNs are all-gathered
between F1 and F2 and between F2 and F3, and the backward sums all-reduced between B1 and B2 and before
B3: the same communication as ``nn.SyncBatchNorm``, on statistics the kernels compute anyway.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import triton_forward as tf
from .fold import FoldedGhost
from .layout import empty_output, output_memory_format
from .spec import GhostSpec

triton, tl = tf.triton, tf.tl

if triton is not None:

    @triton.jit(do_not_specialize=["C_IN", "HO", "WO", "M", "P_TOTAL", "sxn", "sxh", "n_pblocks"])
    def _pw_stats_kernel(
        x_ptr, w1_ptr, part_ptr,
        C_IN, HO, WO, M, P_TOTAL,
        sxn, sxc, sxh, sxw, n_pblocks,
        STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
        IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """F1: per block of BLOCK_P output pixels and BLOCK_M channels, sum and centred sum of squares of z1."""
        pb = tl.program_id(0)
        mb = tl.program_id(1)
        p = pb.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P_TOTAL
        n = p // (HO * WO)
        rem = p % (HO * WO)
        x_pix = n * sxn + (rem // WO) * STRIDE * sxh + (rem % WO) * STRIDE * sxw
        c = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        c_ok = c < M
        acc = tf.pointwise_conv_tile(x_ptr, w1_ptr, x_pix, p_ok, c, c_ok, C_IN, sxc,
                                     BLOCK_M, BLOCK_K, BLOCK_P, IEEE, DOT_F32)
        cnt = tl.sum(p_ok.to(tl.float32), axis=0)
        s = tl.sum(acc, axis=1)                      # masked lanes hold exact zeros
        dev = tl.where(p_ok[None, :], acc - (s / cnt)[:, None], 0.0)
        row = part_ptr + pb.to(tl.int64) * M + c
        tl.store(row, s, mask=c_ok)
        tl.store(row + n_pblocks.to(tl.int64) * M, tl.sum(dev * dev, axis=1), mask=c_ok)

    @triton.jit(do_not_specialize=["C", "HW", "WO", "son", "soh", "c0"])
    def _affine_act_kernel(
        out_ptr, scale_ptr, shift_ptr, C, HW, WO, son, soc, soh, sow, c0,
        RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """F3: out[:, c0 + c] = act(out[:, c0 + c] * scale[c] + shift[c]) in place (BN2 + act)."""
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (c < C)[:, None] & (p < HW)[None, :]
        off = (n * son + (c0 + c).to(tl.int64)[:, None] * soc
               + ((p // WO).to(tl.int64) * soh + (p % WO).to(tl.int64) * sow)[None, :])
        v = tl.load(out_ptr + off, mask=ok, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + c, mask=c < C, other=0.0)
        sh = tl.load(shift_ptr + c, mask=c < C, other=0.0)
        y = v * sc[:, None] + sh[:, None]
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["numel", "C", "HW"])
    def _bn_input_grad_kernel(g_ptr, zc_ptr, out_ptr, a_ptr, b_ptr, c_ptr, numel, C, HW,
                              CHANNELS_LAST: tl.constexpr, BATCH: tl.constexpr, BLOCK: tl.constexpr):
        """B3's elementwise part in one pass: out = a[c] g + (b[c] + c[c] zc if BATCH), cast to out's dtype.
        g, zc and out share one dense layout (NCHW or channels_last)."""
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = off < numel
        ch = (off % C) if CHANNELS_LAST else ((off // HW) % C)
        y = tl.load(a_ptr + ch, mask=ok, other=0.0) * tl.load(g_ptr + off, mask=ok, other=0.0)
        if BATCH:  # absent in eval mode: zc is NaN wherever x is, and 0 * NaN is NaN
            y += tl.load(b_ptr + ch, mask=ok, other=0.0) + tl.load(c_ptr + ch, mask=ok, other=0.0) \
                * tl.load(zc_ptr + off, mask=ok, other=0.0)
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["C_IN", "HO", "WO", "M", "OUP", "sxn", "sxh", "sgn", "sgh", "sbn", "sbh",
                                   "n_tiles_h", "n_tiles_w", "n_mblocks", "total_tiles"])
    def _ghost_bwd_kernel(
        x_ptr, g_ptr, w1_ptr, scale1_ptr, shift1_ptr, mean1_ptr, wd_ptr, mean2_ptr, scale2_ptr, shift2_ptr,
        ga2_ptr, gb2_ptr, gc2_ptr, y1s_ptr, gzs_ptr, part_ptr, gwd_ptr, g1m_ptr, zc1_ptr,
        C_IN, HO, WO, M, OUP,
        sxn, sxc, sxh, sxw,
        sgn, sgc, sgh, sgw,
        sbn, sbc, sbh, sbw,
        n_tiles_h, n_tiles_w, n_mblocks, total_tiles,
        PHASE: tl.constexpr, STRIDE: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, RELU: tl.constexpr,
        BATCH2: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """B1 (PHASE 1) and B2 (PHASE 2) of the module docstring, on a persistent grid like the forward."""
        PAD: tl.constexpr = DW // 2
        P2: tl.constexpr = 2 * PAD
        TH: tl.constexpr = HALO_H - 2 * P2
        TW: tl.constexpr = HALO_W - 2 * P2
        BLOCK_P: tl.constexpr = HALO_H * HALO_W
        R1: tl.constexpr = RATIO - 1
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)

        q = tl.arange(0, BLOCK_P)
        hh = q // HALO_W
        ww = q % HALO_W
        tile_px = (hh >= P2) & (hh < HALO_H - P2) & (ww >= P2) & (ww < HALO_W - P2)  # the tile itself
        ring = (hh >= PAD) & (hh < HALO_H - PAD) & (ww >= PAD) & (ww < HALO_W - PAD)  # tile + PAD ring
        cm = tl.arange(0, BLOCK_M)
        slot_off = pid.to(tl.int64) * BLOCK_P * BLOCK_M + cm[:, None] * BLOCK_P + q[None, :]
        y1_slot = y1s_ptr + slot_off
        gz_slot = gzs_ptr + slot_off

        for tile in range(pid, total_tiles, nprog):
            mb, tw, th, n = tf.tile_coords(tile, n_mblocks, n_tiles_w, n_tiles_h)
            oh = th * TH - P2 + hh
            ow = tw * TW - P2 + ww
            in_img = (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
            c = mb * BLOCK_M + cm
            c_ok = c < M
            on_tile = tile_px & in_img

            # z1 and y1 on the whole halo tile, with the forward's own code (same rounding, same masks)
            x_pix = n * sxn + (oh * STRIDE).to(tl.int64) * sxh + (ow * STRIDE).to(tl.int64) * sxw
            acc = tf.pointwise_conv_tile(x_ptr, w1_ptr, x_pix, in_img, c, c_ok, C_IN, sxc,
                                         BLOCK_M, BLOCK_K, BLOCK_P, IEEE, DOT_F32)
            y1 = tf.bn_act_tile(acc, scale1_ptr, shift1_ptr, c, c_ok, in_img, RELU)
            tl.debug_barrier()
            tl.store(y1_slot, y1.to(y1s_ptr.dtype.element_ty))   # rounded like the forward's y1
            tl.debug_barrier()

            gy1 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
            for r in tl.static_range(R1):
                j = c * R1 + r
                j_out = c_ok & (j < OUP - M)          # ghost channels that reach the output
                z2 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
                for dy in range(DW):
                    for dx in range(DW):
                        wv = tl.load(wd_ptr + j * (DW * DW) + (dy * DW + dx), mask=c_ok, other=0.0)
                        v = tl.load(y1_slot + ((dy - PAD) * HALO_W + (dx - PAD)), mask=ring[None, :], other=0.0)
                        z2 += wv[:, None] * v.to(tl.float32)
                # z2 unrounded, as F2 reduced it for the batch statistics: BN's scale invariance makes
                # the sums below cancel, and they cancel to rounding only with the same z2 as the mean.
                zc2 = z2 - tl.load(mean2_ptr + j, mask=c_ok, other=0.0)[:, None]
                live = (ring & in_img)[None, :] & j_out[:, None]
                g2 = tl.load(g_ptr + (M + j).to(tl.int64)[:, None] * sgc
                             + (n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[None, :],
                             mask=live, other=0.0).to(tl.float32)
                if RELU:   # eager's threshold_backward: zero where y2 <= 0 (NaN passes), with y2
                    # computed bit for bit as F3 did: from z2 rounded to the output dtype
                    z2r = z2.to(y1s_ptr.dtype.element_ty).to(tl.float32)
                    y2 = z2r * tl.load(scale2_ptr + j, mask=c_ok, other=0.0)[:, None] \
                        + tl.load(shift2_ptr + j, mask=c_ok, other=0.0)[:, None]
                    g2 = tl.where(y2 <= 0.0, 0.0, g2)
                if PHASE == 1:
                    g2 = tl.where(on_tile[None, :], g2, 0.0)
                    row = part_ptr + (tl.cast(tile, tl.int64) * R1 + r) * BLOCK_M + cm
                    tl.store(row, tl.sum(g2, axis=1))
                    tl.store(row + total_tiles.to(tl.int64) * R1 * BLOCK_M,
                             tl.sum(tl.where(on_tile[None, :], g2 * zc2, 0.0), axis=1))
                else:
                    gz = tl.load(ga2_ptr + j, mask=c_ok, other=0.0)[:, None] * g2
                    if BATCH2:  # batch statistics; absent, not multiplied by 0, in eval mode (NaN in z)
                        gz += (tl.load(gb2_ptr + j, mask=c_ok, other=0.0)[:, None]
                               + tl.load(gc2_ptr + j, mask=c_ok, other=0.0)[:, None] * zc2)
                    gz = tl.where(live, gz, 0.0)
                    tl.debug_barrier()                # the previous multiplier's reads of gz_slot are done
                    tl.store(gz_slot, gz)
                    tl.debug_barrier()
                    for dy in range(DW):
                        for dx in range(DW):
                            tap = dy * DW + dx
                            # dL/dwd[j, tap] += sum over the tile of y1(p + tap) g_z2(p)
                            v = tl.load(y1_slot + ((dy - PAD) * HALO_W + (dx - PAD)), mask=on_tile[None, :],
                                        other=0.0).to(tl.float32)
                            tl.store(gwd_ptr + ((tl.cast(tile, tl.int64) * R1 + r) * (DW * DW) + tap) * BLOCK_M + cm,
                                     tl.sum(tl.where(on_tile[None, :], v * gz, 0.0), axis=1))
                            # dL/dy1(p) += wd[j, tap] g_z2(p - tap): the transposed depthwise conv
                            wv = tl.load(wd_ptr + j * (DW * DW) + tap, mask=c_ok, other=0.0)
                            u = tl.load(gz_slot - ((dy - PAD) * HALO_W + (dx - PAD)), mask=tile_px[None, :], other=0.0)
                            gy1 += wv[:, None] * u

            if PHASE == 2:
                store_ok = c_ok[:, None] & on_tile[None, :]
                g1 = tl.load(g_ptr + c.to(tl.int64)[:, None] * sgc
                             + (n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[None, :],
                             mask=store_ok, other=0.0).to(tl.float32)
                gy1 += g1
                if RELU:
                    gy1 = tl.where(y1 <= 0.0, 0.0, gy1)
                gy1 = tl.where(store_ok, gy1, 0.0)
                zc1 = acc - tl.load(mean1_ptr + c, mask=c_ok, other=0.0)[:, None]
                row = part_ptr + tl.cast(tile, tl.int64) * BLOCK_M + cm
                tl.store(row, tl.sum(gy1, axis=1))
                tl.store(row + total_tiles.to(tl.int64) * BLOCK_M, tl.sum(tl.where(store_ok, gy1 * zc1, 0.0), axis=1))
                b_off = c.to(tl.int64)[:, None] * sbc + (n * sbn + oh.to(tl.int64) * sbh + ow.to(tl.int64) * sbw)[None, :]
                tl.store(g1m_ptr + b_off, gy1, mask=store_ok)
                tl.store(zc1_ptr + b_off, zc1, mask=store_ok)


# --------------------------------------------------------------------------------------------------
# Statistics: merging per-tile (count, sum, centred M2) in float64, and their all-gather for SyncBN.

class Moments:
    """count, mean and M2 (sum of squared deviations) per channel; float64."""

    def __init__(self, count: Tensor, mean: Tensor, m2: Tensor):
        self.count, self.mean, self.m2 = count, mean, m2

    @staticmethod
    def merge(count: Tensor, sums: Tensor, m2s: Tensor) -> "Moments":
        """Chan et al.'s parallel merge of T partials: ``count`` [T], ``sums``/``m2s`` [T, C]."""
        count, sums, m2s = count.double(), sums.double(), m2s.double()
        total = count.sum()
        mean = sums.sum(0) / total
        part_mean = sums / count.clamp_min(1)[:, None]
        m2 = m2s.sum(0) + (count[:, None] * (part_mean - mean) ** 2).sum(0)
        return Moments(total, mean, m2)

    def all_gather(self, group) -> "Moments":
        import torch.distributed as dist
        world = dist.get_world_size(group)
        mine = torch.cat([self.count.reshape(1).expand(self.mean.numel()).reshape(1, -1),
                          self.mean.reshape(1, -1), self.m2.reshape(1, -1)])
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine.contiguous(), group=group)
        stacked = torch.stack(parts)          # [world, 3, C]
        count = stacked[:, 0, 0]
        return Moments.merge(count, stacked[:, 1] * count[:, None], stacked[:, 2])


def _all_reduce(t: Tensor, group) -> Tensor:
    import torch.distributed as dist
    dist.all_reduce(t, group=group)
    return t


# Process groups for SyncBatchNorm, referred to by index in the ops (a ProcessGroup is no op argument).
_GROUPS: List[object] = []


def register_group(group) -> int:
    """Index of ``group`` for the ``sync`` argument of the ops (``None`` is the default group)."""
    for i, g in enumerate(_GROUPS):
        if g is group:
            return i
    _GROUPS.append(group)
    return len(_GROUPS) - 1


def _group(sync: int):
    """The registered process group (None is the default group: test ``sync >= 0`` for "synchronize")."""
    return _GROUPS[sync] if sync >= 0 else None


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Forward

def _bn_affine(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """y = z * scale + shift for BN with the given mean and 1/std (float32)."""
    scale = invstd if weight is None else invstd * weight.float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale.contiguous(), shift.contiguous()


def pw_moments(x: Tensor, w1: Tensor, spec: GhostSpec) -> Moments:
    """F1: the batch moments of z1 = conv1x1(x, w1) per channel, without writing z1."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    total = n * ho * wo
    block_p, block_m = 128, 32 if spec.m > 16 else 16
    block_k = 16 if spec.inp <= 16 or w1.dtype == torch.float32 else 32
    n_pb = triton.cdiv(total, block_p)
    part = torch.empty(2, n_pb, spec.m, dtype=torch.float32, device=x.device)
    with _device_ctx(x):
        _pw_stats_kernel[(n_pb, triton.cdiv(spec.m, block_m))](
            x, w1, part, spec.inp, ho, wo, spec.m, total, *x.stride(), n_pb,
            STRIDE=spec.stride, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_P=block_p,
            IEEE=w1.dtype == torch.float32, DOT_F32=tf.interpreting() and w1.dtype == torch.bfloat16,
            num_warps=4)
    count = torch.full((n_pb,), float(block_p), dtype=torch.float64, device=x.device)
    count[-1] = total - (n_pb - 1) * block_p
    return Moments.merge(count, part[0], part[1])


def _tile_moments(buf: Tensor, spec: GhostSpec, n_tiles: int, n_mb: int, block_m: int) -> Moments:
    """Decode ``launch_forward(stats=True)``'s buffer into the moments of the m(r-1) ghost channels."""
    r1 = spec.ratio - 1
    per = n_tiles * r1 * block_m
    sums = buf[:per].view(n_tiles // n_mb, n_mb, r1, block_m)
    m2s = buf[per:2 * per].view(n_tiles // n_mb, n_mb, r1, block_m)
    count = buf[2 * per:2 * per + n_tiles].view(n_tiles // n_mb, n_mb)[:, 0]
    # ghost channel j = c * (r - 1) + k of intrinsic channel c = mb * BLOCK_M + cm
    as_channels = lambda t: t.permute(0, 1, 3, 2).reshape(t.shape[0], -1)[:, :spec.new]  # noqa: E731
    return Moments.merge(count, as_channels(sums), as_channels(m2s))


def train_forward(x: Tensor, w1: Tensor, bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], wd: Tensor,
                  bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], stats1: Optional[Tuple[Tensor, Tensor]],
                  stats2: Optional[Tuple[Tensor, Tensor]], eps1: float, eps2: float, spec: GhostSpec,
                  sync: int = -1):
    """The forward of both BNs' modes. ``stats1``/``stats2`` = (running_mean, running_var) for eval-mode
    BN, None for batch statistics (train mode). Returns out and, per BN, (mean, invstd, unbiased var)
    float32 (the unbiased variance is for the running statistics; NaN-free zeros in eval mode)."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    out = empty_output(x, spec.oup, spec.stride, w1.dtype)
    w1m = w1.reshape(spec.m, spec.inp).contiguous()
    wdm = wd.reshape(spec.new, spec.dw_size ** 2).float().contiguous()
    group = _group(sync)

    def finish(mom: Moments):
        """(mean, unbiased variance) in float32 and the biased variance in float64, batch-wide."""
        if sync >= 0:
            mom = mom.all_gather(group)
        return mom.mean.float(), (mom.m2 / (mom.count - 1).clamp_min(1)).float(), mom.m2 / mom.count

    if stats1 is None:
        mean1, var1u, var1 = finish(pw_moments(x, w1m, spec))
        invstd1 = torch.rsqrt(var1 + eps1).float()
    else:
        mean1, invstd1 = stats1[0].float().clone(), torch.rsqrt(stats1[1].float() + eps1)  # outputs never alias inputs
        var1u = torch.zeros_like(mean1)
    scale1, shift1 = _bn_affine(mean1, invstd1, bn1_weight, bn1_bias)

    if stats2 is not None:  # eval-mode BN2: the single-pass inference kernel with BN2 folded
        mean2, invstd2 = stats2[0].float().clone(), torch.rsqrt(stats2[1].float() + eps2)
        scale2, shift2 = _bn_affine(mean2, invstd2, bn2_weight, bn2_bias)
        folded = FoldedGhost(w1m, scale1, shift1, (wdm * scale2[:, None]).contiguous(), shift2)
        if out.numel():
            tf.launch_forward(x, out, folded, spec, relu2=spec.act == "relu")
        return out, mean1, invstd1, var1u, mean2, invstd2, torch.zeros_like(mean2)

    zero = torch.zeros(spec.new, dtype=torch.float32, device=x.device)
    folded = FoldedGhost(w1m, scale1, shift1, wdm, zero)
    cfg = tf.pick_config(spec, ho, wo, w1.dtype)
    _, _, n_mb, total = tf.tile_grid(spec, n, ho, wo, cfg, spec.dw_size // 2)
    buf = tf.launch_forward(x, out, folded, spec, relu2=False, stats=True)
    mean2, var2u, var2 = finish(_tile_moments(buf, spec, total, n_mb, cfg.BLOCK_M))
    invstd2 = torch.rsqrt(var2 + eps2).float()
    scale2, shift2 = _bn_affine(mean2, invstd2, bn2_weight, bn2_bias)
    kept = spec.oup - spec.m
    if kept > 0:
        block_c, block_p = 16, 128
        with _device_ctx(x):
            _affine_act_kernel[(n, triton.cdiv(kept, block_c), triton.cdiv(ho * wo, block_p))](
                out, scale2, shift2, kept, ho * wo, wo, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                spec.m, RELU=spec.act == "relu", BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)
    return out, mean1, invstd1, var1u, mean2, invstd2, var2u


# --------------------------------------------------------------------------------------------------
# Backward

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


def backward_config(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype) -> "tf.TileConfig":
    """The forward's tiling with a halo of 2 (d // 2), on 8 warps: six BLOCK_M x lanes fp32 tiles are live
    at once (z1, y1, z2, its gradient, dL/dy1, a tap), ~250 registers a thread on 4 warps (ptxas, sm_90)."""
    return tf.pick_config(spec, ho, wo, dtype, pad=2 * (spec.dw_size // 2))._replace(num_warps=8)


def train_backward(grad: Tensor, x: Tensor, w1: Tensor, bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor],
                   wd: Tensor, bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], mean1: Tensor,
                   invstd1: Tensor, mean2: Tensor, invstd2: Tensor, spec: GhostSpec, batch_stats1: bool,
                   batch_stats2: bool, sync: int = -1):
    """Gradients (x, w1, bn1 weight, bn1 bias, wd, bn2 weight, bn2 bias) of :func:`train_forward`."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    dev = x.device
    cdtype = w1.dtype
    w1m = w1.reshape(spec.m, spec.inp).contiguous()
    wdm = wd.reshape(spec.new, spec.dw_size ** 2).float().contiguous()
    scale1, shift1 = _bn_affine(mean1, invstd1, bn1_weight, bn1_bias)
    scale2, shift2 = _bn_affine(mean2, invstd2, bn2_weight, bn2_bias)  # the forward's, bit for bit
    group = _group(sync)
    count = float(n * ho * wo)
    if sync >= 0:
        cnt = torch.tensor([count], dtype=torch.float64, device=dev)
        count = float(_all_reduce(cnt, group).item())

    pad = spec.dw_size // 2
    cfg = backward_config(spec, ho, wo, cdtype)
    n_th, n_tw, n_mb, total = tf.tile_grid(spec, n, ho, wo, cfg, 2 * pad)
    r1, bm, taps = spec.ratio - 1, cfg.BLOCK_M, spec.dw_size ** 2
    variant = ("bwd", x.device.index, x.dtype, cdtype, spec.stride, spec.ratio, spec.dw_size, spec.act,
               batch_stats2, cfg)
    programs = tf.persistent_programs(variant, x, max(total, 1))
    lanes = cfg.HALO_H * cfg.HALO_W
    y1s = torch.empty(programs * bm * lanes, dtype=cdtype, device=dev)
    gzs = torch.empty(programs * bm * lanes, dtype=torch.float32, device=dev)
    g1m = torch.empty(n, spec.m, ho, wo, dtype=torch.float32, device=dev, memory_format=output_memory_format(grad))
    zc1 = torch.empty_like(g1m)
    part2 = torch.empty(2 * max(total, 1) * r1 * bm, dtype=torch.float32, device=dev)
    part1 = torch.empty(2 * max(total, 1) * bm, dtype=torch.float32, device=dev)
    gwd_part = torch.empty(max(total, 1) * r1 * taps * bm, dtype=torch.float32, device=dev)
    f32 = lambda v: v.float().contiguous()  # noqa: E731
    mean1, mean2 = f32(mean1), f32(mean2)
    ga2 = gb2 = gc2 = scale2  # placeholders in phase 1

    def launch(phase, part, ga2, gb2, gc2):
        with _device_ctx(x):
            return _ghost_bwd_kernel[(programs,)](
                x, grad, w1m, scale1, shift1, mean1, wdm, mean2, scale2, shift2,
                f32(ga2), f32(gb2), f32(gc2), y1s, gzs, part, gwd_part, g1m, zc1,
                spec.inp, ho, wo, spec.m, spec.oup,
                *x.stride(), *grad.stride(), *g1m.stride(),
                n_th, n_tw, n_mb, total,
                PHASE=phase, STRIDE=spec.stride, RATIO=spec.ratio, DW=spec.dw_size, RELU=spec.act == "relu",
                BATCH2=batch_stats2, HALO_H=cfg.HALO_H, HALO_W=cfg.HALO_W, BLOCK_M=bm, BLOCK_K=cfg.BLOCK_K,
                IEEE=cdtype == torch.float32, DOT_F32=tf.interpreting() and cdtype == torch.bfloat16,
                num_warps=cfg.num_warps)

    def per_ghost_channel(t: Tensor) -> Tensor:   # [T * r1 * bm] per tile -> [new], summed over tiles
        return t.view(total // n_mb, n_mb, r1, bm).sum(0).permute(0, 2, 1).reshape(-1)[:spec.new]

    if total:
        tf.remember_occupancy(variant, launch(1, part2, ga2, gb2, gc2), x, cfg.num_warps)
        half = total * r1 * bm
        sums2 = torch.stack([per_ghost_channel(part2[:half]), per_ghost_channel(part2[half:])])
    else:
        sums2 = torch.zeros(2, spec.new, dtype=torch.float32, device=dev)
    # BN parameter gradients from this rank's sums (DDP averages them over ranks, as for SyncBatchNorm);
    # the input gradient's coefficients from the sums over all ranks
    g_bn2w = None if bn2_weight is None else (sums2[1] * invstd2).to(bn2_weight.dtype)
    g_bn2b = None if bn2_bias is None else sums2[0].to(bn2_bias.dtype)
    if sync >= 0:
        sums2 = _all_reduce(sums2.clone(), group)
    ga2, gb2, gc2 = _bn_backward_coeffs(sums2[0], sums2[1], count, invstd2, bn2_weight, batch_stats2)

    if total:
        launch(2, part1, ga2, gb2, gc2)
        sums1 = part1.view(2, total // n_mb, n_mb * bm).sum(1)[:, :spec.m]
        gwd = gwd_part.view(total // n_mb, n_mb, r1, taps, bm).sum(0).permute(0, 3, 1, 2).reshape(-1, taps)[:spec.new]
    else:
        g1m.zero_(), zc1.zero_()
        sums1 = torch.zeros(2, spec.m, dtype=torch.float32, device=dev)
        gwd = torch.zeros(spec.new, taps, dtype=torch.float32, device=dev)
    g_bn1w = None if bn1_weight is None else (sums1[1] * invstd1).to(bn1_weight.dtype)
    g_bn1b = None if bn1_bias is None else sums1[0].to(bn1_bias.dtype)
    if sync >= 0:
        sums1 = _all_reduce(sums1.clone(), group)
    ga1, gb1, gc1 = _bn_backward_coeffs(sums1[0], sums1[1], count, invstd1, bn1_weight, batch_stats1)

    gx, gw1 = _pointwise_conv_grads(g1m, zc1, (ga1, gb1, gc1), batch_stats1, x, w1, spec)
    return gx, gw1, g_bn1w, g_bn1b, gwd.reshape(wd.shape).to(wd.dtype), g_bn2w, g_bn2b


def _pointwise_conv_grads(g1m: Tensor, zc1: Tensor, coeffs, batch_stats1: bool, x: Tensor, w1: Tensor,
                          spec: GhostSpec):
    """B3: dL/dz1 = a g1m + b + c (z1 - mean1) in one elementwise pass (compute dtype), then the 1x1
    conv's gradients as two GEMMs (cuBLAS): dL/dx = dL/dz1 w1, dL/dw1 = dL/dz1^T x (stride s: x is
    sampled at every s-th row and column, and dL/dx is zero elsewhere)."""
    n, _, ho, wo = g1m.shape
    cdtype = w1.dtype
    ga1, gb1, gc1 = (v.float().contiguous() for v in coeffs)
    gz1 = torch.empty_like(g1m, dtype=cdtype)
    if gz1.numel():
        block = 1024
        with _device_ctx(x):
            _bn_input_grad_kernel[(triton.cdiv(gz1.numel(), block),)](
                g1m, zc1, gz1, ga1, gb1, gc1, gz1.numel(), spec.m, ho * wo,
                CHANNELS_LAST=output_memory_format(g1m) == torch.channels_last and spec.m > 1, BATCH=batch_stats1,
                BLOCK=block, num_warps=4)
    xs = x[:, :, ::spec.stride, ::spec.stride] if spec.stride > 1 else x
    gz1p = _pixels(gz1)
    gw1 = (gz1p.t() @ _pixels(xs).to(cdtype)).reshape(w1.shape)
    gxs = (gz1p @ w1.reshape(spec.m, spec.inp)).reshape(n, ho, wo, spec.inp).permute(0, 3, 1, 2)
    if spec.stride > 1:
        gx = torch.zeros_like(x, dtype=cdtype, memory_format=output_memory_format(x))
        gx[:, :, ::spec.stride, ::spec.stride] = gxs
    else:
        gx = gxs.contiguous(memory_format=output_memory_format(x))
    return gx, gw1




# --------------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile, torch.export and opcheck see. Optional BN affine parameters
# (affine=False) are None; running statistics given means "eval-mode BN", None means batch statistics.


@torch.library.custom_op("ghost_kernels::triton_train_forward", mutates_args=())
def train_forward_op(x: Tensor, w1: Tensor, bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], wd: Tensor,
                     bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], running_mean1: Optional[Tensor],
                     running_var1: Optional[Tensor], running_mean2: Optional[Tensor],
                     running_var2: Optional[Tensor], eps1: float, eps2: float, oup: int, stride: int, ratio: int,
                     dw_size: int, relu: bool, sync: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = GhostSpec(x.shape[1], oup, 1, ratio, dw_size, stride, "relu" if relu else "none")
    s1 = None if running_mean1 is None else (running_mean1, running_var1)
    s2 = None if running_mean2 is None else (running_mean2, running_var2)
    return train_forward(x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias, s1, s2, eps1, eps2, spec, sync)


@train_forward_op.register_fake
def _(x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias, running_mean1, running_var1, running_mean2,
      running_var2, eps1, eps2, oup, stride, ratio, dw_size, relu, sync):
    m, new = w1.shape[0], wd.shape[0]
    v1, v2 = (lambda: x.new_empty(m, dtype=torch.float32)), (lambda: x.new_empty(new, dtype=torch.float32))
    return empty_output(x, oup, stride, w1.dtype), v1(), v1(), v1(), v2(), v2(), v2()


@torch.library.custom_op("ghost_kernels::triton_train_backward", mutates_args=())
def train_backward_op(grad: Tensor, x: Tensor, w1: Tensor, bn1_weight: Optional[Tensor],
                      bn1_bias: Optional[Tensor], wd: Tensor, bn2_weight: Optional[Tensor],
                      bn2_bias: Optional[Tensor], mean1: Tensor, invstd1: Tensor, mean2: Tensor, invstd2: Tensor,
                      oup: int, stride: int, ratio: int, dw_size: int, relu: bool, batch_stats1: bool,
                      batch_stats2: bool, sync: int
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, w1, bn1 weight/bias, wd, bn2 weight/bias (an empty tensor for an absent affine)."""
    spec = GhostSpec(x.shape[1], oup, 1, ratio, dw_size, stride, "relu" if relu else "none")
    grads = train_backward(grad, x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias, mean1, invstd1, mean2,
                           invstd2, spec, batch_stats1, batch_stats2, sync)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@train_backward_op.register_fake
def _(grad, x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias, mean1, invstd1, mean2, invstd2, oup, stride,
      ratio, dw_size, relu, batch_stats1, batch_stats2, sync):
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    gx = torch.empty_like(x, memory_format=output_memory_format(x))
    return gx, torch.empty_like(w1), like(bn1_weight), like(bn1_bias), torch.empty_like(wd), like(bn2_weight), like(bn2_bias)


def _setup_context(ctx, inputs, output):
    (x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias, rm1, _, rm2, _, _, _, oup, stride, ratio, dw_size,
     relu, sync) = inputs
    _, mean1, invstd1, _, mean2, invstd2, _ = output
    ctx.save_for_backward(x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias, mean1, invstd1, mean2, invstd2)
    ctx.args = (oup, stride, ratio, dw_size, relu, rm1 is None, rm2 is None, sync)
    ctx.has = tuple(t is not None for t in (bn1_weight, bn1_bias, bn2_weight, bn2_bias))


def _backward(ctx, grad, *_stat_grads):
    x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias, mean1, invstd1, mean2, invstd2 = ctx.saved_tensors
    gx, gw1, g1w, g1b, gwd, g2w, g2b = train_backward_op(grad, x, w1, bn1_weight, bn1_bias, wd, bn2_weight, bn2_bias,
                                                         mean1, invstd1, mean2, invstd2, *ctx.args)
    h1w, h1b, h2w, h2b = ctx.has
    return (gx, gw1, g1w if h1w else None, g1b if h1b else None, gwd, g2w if h2w else None,
            g2b if h2b else None) + (None,) * 12


train_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _update_running_stats(bn, mean: Tensor, var_unbiased: Tensor) -> None:
    """nn.BatchNorm2d's train-mode buffer update (momentum, or a cumulative average for momentum=None)."""
    with torch.no_grad():
        factor = bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # a 0-d tensor, not .item(): no graph break under torch.compile
                factor = 1.0 / bn.num_batches_tracked.to(torch.float64)
        elif bn.momentum is None:
            factor = 0.0
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype) * factor)
        bn.running_var.mul_(1 - factor).add_(var_unbiased.to(bn.running_var.dtype) * factor)


def ghost_train(x: Tensor, w1: Tensor, bn1, wd: Tensor, bn2, spec: GhostSpec, training: bool,
                compute_dtype: torch.dtype, sync: int = -1) -> Tensor:
    """The Ghost module with autograd and nn.BatchNorm2d semantics in both modes (bn1/bn2:
    ``reference.BatchNormState``): casts to ``compute_dtype`` like nn.Conv2d under autocast, runs the
    op, and in train mode updates the running statistics the way nn.BatchNorm2d does.

    Equivalent PyTorch: ``reference.ghost_reference(x, w1, bn1, wd, bn2, spec, training=training)``.
    """
    def mode(bn):
        batch = training or (bn.running_mean is None and bn.running_var is None)
        return batch, (training and bn.track_running_stats and bn.running_mean is not None)

    batch1, update1 = mode(bn1)
    batch2, update2 = mode(bn2)
    stats = lambda bn, batch: (None, None) if batch else (bn.running_mean, bn.running_var)  # noqa: E731
    out, mean1, _, var1u, mean2, _, var2u = train_forward_op(
        x.to(compute_dtype), w1.to(compute_dtype), bn1.weight, bn1.bias, wd, bn2.weight, bn2.bias,
        *stats(bn1, batch1), *stats(bn2, batch2), float(bn1.eps), float(bn2.eps),
        spec.oup, spec.stride, spec.ratio, spec.dw_size, spec.act == "relu", sync)
    if update1:
        _update_running_stats(bn1, mean1, var1u)
    if update2:
        _update_running_stats(bn2, mean2, var2u)
    return out
