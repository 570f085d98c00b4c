"""The training kernels of the Ghost module in Triton (their launchers and ops: ``train_ops.py``).

Design note
===========
Notation: x (N x Cin x H x W), z1 = conv1x1(x, w1, stride) (m channels), y1 = act(BN1(z1 + bias1)),
z2 = dwconv(y1, wd) (m(r-1) channels), y2 = act(BN2(z2 + bias2)), out = cat(y1, y2)[:, :oup]; P = N H' W'
output pixels; BN in train mode normalizes with the batch's mean and biased variance.

Options. ``act`` is any of ``spec.ACTIVATIONS`` (ReLU, SiLU, Hardswish, identity: one ACT constexpr,
codes of ``common.act``) for both stages. The convs may have biases (bias1, bias2; ``GhostParams.b1`` /
``b2``), always followed by a BatchNorm. The kernels compute the convs *without* their biases and centre
with ``mean - bias`` (``train_backward.centred``): in train mode the batch mean absorbs the bias (the
batch statistics of z are those of z + bias, shifted), yet the mean the ops return and running_mean
tracks is eager's, bias included; in eval mode (running statistics) the bias shifts the fold. Not
here: a k x k primary conv (the 1x1 GEMM tiles of F1/F2/B3) and a conv without a BatchNorm (a deployed
module); ``TRAINING_SUPPORT`` in ``backend.py`` says so.

Forward, train mode: the two kernels of ``triton_two_pass`` (``two_pass.py``, its design note), each
run twice -- once as a statistics pass (STATS: the raw conv output reduced per tile, never written),
once writing. Batch statistics must exist before anything is normalized, and z1 / z2 are never
written raw, so nothing of size P x m is kept besides the output.

  F1 ``_pw_kernel`` STATS     reads x; z1 tile by tile (the wgmma GEMM of pass 1); per pixel tile and
                              channel the sum and the tile-centred sum of squares. BN1's batch mean and
                              variance follow (Chan's merge in float64).
  F2 ``_pw_kernel``           reads x again; y1 = act(z1 * scale1 + shift1) -> out[:, :m], with
                              (scale1, shift1) from F1's statistics (``common.AFFINE``).
  F3 ``_dw_kernel`` STATS     reads y1 back (the row-walk stencil of pass 2); z2 for every ghost
                              channel, those sliced off by oup included (nn.BatchNorm2d tracks them
                              too); per program and channel the sum and squared deviations about the
                              program's mean (per-lane shifted sums, merged across lanes).
  F4 ``_dw_kernel`` (``_dw_nchw_kernel`` for a dense NCHW output)
                              reads y1 again; y2 = act(z2 * scale2 + shift2) -> out[:, m:oup].
  An eval-mode BN (running statistics) skips its statistics pass. Bytes per pixel: 2 Cin + 3 m + (oup -
  m) (F3's y1 reads of a dense NCHW output go through the strided kernel, one pixel per lane) against
  the floor Cin + oup; the first design (F1 GEMM on pointers, F2 the halo kernel computing y1 and raw
  z2 on halo tiles, F3 an in-place BN2 pass) moved 2 Cin + oup + 2 (oup - m): the same at ratio 2,
  more at 3 and 4, and it counted 0.6-7.5 warp-instructions per byte in F2 where these passes count
  the inference families' (offline, 2026-12-04: NOTES.md, "Training forward on the two-pass kernels").

Saved for backward: x (eager saves it too) and per-channel mean and 1/std of both BNs. Not the output:
GhostNet's bottleneck adds the shortcut into it in place. y1 and z2 are recomputed from x.

B0/B1 recompute y1, z2 and u2 bit for bit as F2/F4 computed them. B2's y1 and z2 can differ from
them in the last bit where the GEMM's K order differs (F2: wgmma tiles, B2: ``pointwise_conv_tile``);
an activation decision differs only where BN's output is within that rounding of the decision point. (The first design's B1 recomputed u2 from
z2 rounded to the output dtype, as its F3 did; with F4's fp32 z2 that mismatch flipped ReLU's mask at
~0.5% of the elements of a ratio-4 bf16 module and put dL/dx at 3e-2 against eager's 5e-3: caught by
test_gradients_option_sweep.)

Backward: y1 and BN2's backward sums on the forward's kernels, then one launch of
``_ghost_bwd_kernel`` on halo tiles with a halo of 2 (d // 2) pixels (z2 is needed on a 1-pixel-wider
ring than the tile to form the transposed depthwise conv), then cuBLAS.

  B0            ``_pw_kernel`` (``two_pass_train.train_pass1``): y1 into a scratch tensor shaped like out,
                with F2's kernel, scale and shift: the forward's y1 bit for bit (``out`` itself may have
                been modified in place since: GhostNet's bottleneck adds its shortcut into it).
  B1            ``_dw_kernel`` GRAD (``two_pass_train.grad_sums2``): the row walk over B0's y1 recomputes z2
                and u2 = z2 scale2 + shift2 exactly as F4 did (same kernel code, same tap order); g2m =
                act'(u2) g2 with g2 = dL/dy2 (``common.act_grad``, eager's derivative and its conventions:
                ReLU zero where y <= 0, NaN passes; Hardswish 0 at u <= -3, 1 at u >= 3); per program and
                kept ghost channel sum(g2m) and sum(g2m (z2 - mean2)): BN2's backward reductions (dgamma2,
                dbeta2). Half the forward's channel block (the gradient tile and the sums ride on the
                ring's registers). The first design recomputed z1 -> y1 -> z2 on halo tiles here, from x:
                13.7 ms of a 72.9 ms predicted step, now 0.9 ms (NOTES.md).
  B2            recompute z1 -> y1 (halo, scratch slot) -> z2 on the tile from x, then g_z2 = a2 g2m
                + b2 + c2 (z2 - mean2) on the tile + ring (the BN2 backward with B1's global sums); the per-tile depthwise weight gradient
                sum_p y1(p + tap) g_z2(p) for every tap (stored per tile, summed in torch: no atomics,
                deterministic), and as one more "tap" sum_p g_z2(p), dL/dbias2; g_y1 = g1 +
                dwconv^T(g_z2) on the tile; g1m = act'(u1) g_y1 (u1 = BN1's output, ``bn_act_tile``;
                ReLU decides on the recomputed y1 itself); stores g1m and z1 - mean1 (fp32) and per tile
                sum(g1m), sum(g1m (z1 - mean1)) for BN1.
  B3            ``_bn_input_grad_kernel``: g_z1 = a1 g1m + b1 + c1 (z1 - mean1) in one pass (compute
                dtype), then the 1x1 conv's data and weight gradients, two GEMMs (cuBLAS):
                gx = g_z1 w1, gw1 = g_z1^T x; with a bias, dL/dbias1 = sum_p g_z1(p) (torch). With batch
                statistics both bias gradients are 0 up to rounding, as eager's: the mean absorbs a bias.
  Bytes: B0 reads x and writes y1; B1 reads y1 and the ghost half of dL/dout; B2 reads x and dL/dout
  and writes two fp32 m-channel maps; B3 reads them and x, writes gx. No per-element atomics anywhere: every reduction is a per-tile
  partial summed by torch, so the backward is deterministic whatever
  ``torch.are_deterministic_algorithms_enabled()`` says.

SyncBatchNorm: with a process group, the statistics (count, mean, M2) of both BNs are all-gathered
between F1 and F2 and between F3 and F4, and the backward sums all-reduced between B1 and B2 and before
B3: the same communication as ``nn.SyncBatchNorm``, on statistics the kernels compute anyway.
"""
from __future__ import annotations

from .common import tl, triton

if triton is not None:
    from .common import act_grad, bn_act_tile, pointwise_conv_tile, tile_coords

if triton is not None:

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
        STRIDE: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, ACT: tl.constexpr,
        BATCH2: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """B2 of the module docstring, on a persistent grid of halo tiles."""
        PAD: tl.constexpr = DW // 2
        P2: tl.constexpr = 2 * PAD
        TH: tl.constexpr = HALO_H - 2 * P2
        TW: tl.constexpr = HALO_W - 2 * P2
        BLOCK_P: tl.constexpr = HALO_H * HALO_W
        R1: tl.constexpr = RATIO - 1
        TAPS1: tl.constexpr = DW * DW + 1            # per tile and ghost channel: dL/dwd's taps, then dL/db2
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
            mb, tw, th, n = tile_coords(tile, n_mblocks, n_tiles_w, n_tiles_h)
            oh = th * TH - P2 + hh
            ow = tw * TW - P2 + ww
            in_img = (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
            c = mb * BLOCK_M + cm
            c_ok = c < M
            on_tile = tile_px & in_img

            # z1 and y1 on the whole halo tile, with the forward's own code (same rounding, same masks)
            x_pix = n * sxn + (oh * STRIDE).to(tl.int64) * sxh + (ow * STRIDE).to(tl.int64) * sxw
            acc = pointwise_conv_tile(x_ptr, w1_ptr, x_pix, in_img, c, c_ok, C_IN, sxc,
                                         BLOCK_M, BLOCK_K, BLOCK_P, IEEE, DOT_F32)
            y1 = bn_act_tile(acc, scale1_ptr, shift1_ptr, c, c_ok, in_img, ACT)
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
                if ACT != 0:   # the activation's derivative at BN2's output u2, computed bit for bit as
                    # the forward's last pass did: from z2 in fp32 (ReLU: u2 <= 0 iff y2 <= 0, NaN passes)
                    u2 = z2 * tl.load(scale2_ptr + j, mask=c_ok, other=0.0)[:, None] \
                        + tl.load(shift2_ptr + j, mask=c_ok, other=0.0)[:, None]
                    g2 = act_grad(g2, u2, u2, ACT)
                gz = tl.load(ga2_ptr + j, mask=c_ok, other=0.0)[:, None] * g2
                if BATCH2:  # batch statistics; absent, not multiplied by 0, in eval mode (NaN in z)
                    gz += (tl.load(gb2_ptr + j, mask=c_ok, other=0.0)[:, None]
                           + tl.load(gc2_ptr + j, mask=c_ok, other=0.0)[:, None] * zc2)
                gz = tl.where(live, gz, 0.0)
                # dL/db2[j] (a conv bias before BN2) += sum over the tile of g_z2
                tl.store(gwd_ptr + ((tl.cast(tile, tl.int64) * R1 + r) * TAPS1 + DW * DW) * BLOCK_M + cm,
                         tl.sum(tl.where(on_tile[None, :], gz, 0.0), axis=1))
                tl.debug_barrier()                # the previous multiplier's reads of gz_slot are done
                tl.store(gz_slot, gz)
                tl.debug_barrier()
                for dy in range(DW):
                    for dx in range(DW):
                        tap = dy * DW + dx
                        # dL/dwd[j, tap] += sum over the tile of y1(p + tap) g_z2(p)
                        v = tl.load(y1_slot + ((dy - PAD) * HALO_W + (dx - PAD)), mask=on_tile[None, :],
                                    other=0.0).to(tl.float32)
                        tl.store(gwd_ptr + ((tl.cast(tile, tl.int64) * R1 + r) * TAPS1 + tap) * BLOCK_M + cm,
                                 tl.sum(tl.where(on_tile[None, :], v * gz, 0.0), axis=1))
                        # dL/dy1(p) += wd[j, tap] g_z2(p - tap): the transposed depthwise conv
                        wv = tl.load(wd_ptr + j * (DW * DW) + tap, mask=c_ok, other=0.0)
                        u = tl.load(gz_slot - ((dy - PAD) * HALO_W + (dx - PAD)), mask=tile_px[None, :], other=0.0)
                        gy1 += wv[:, None] * u

            store_ok = c_ok[:, None] & on_tile[None, :]
            g1 = tl.load(g_ptr + c.to(tl.int64)[:, None] * sgc
                         + (n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[None, :],
                         mask=store_ok, other=0.0).to(tl.float32)
            gy1 += g1
            if ACT != 0:   # at BN1's output u1, as bn_act_tile computed it (ReLU: on y1 itself)
                u1 = acc * tl.load(scale1_ptr + c, mask=c_ok, other=0.0)[:, None] \
                    + tl.load(shift1_ptr + c, mask=c_ok, other=0.0)[:, None]
                gy1 = act_grad(gy1, u1, y1, ACT)
            gy1 = tl.where(store_ok, gy1, 0.0)
            zc1 = acc - tl.load(mean1_ptr + c, mask=c_ok, other=0.0)[:, None]
            row = part_ptr + tl.cast(tile, tl.int64) * BLOCK_M + cm
            tl.store(row, tl.sum(gy1, axis=1))
            tl.store(row + total_tiles.to(tl.int64) * BLOCK_M, tl.sum(tl.where(store_ok, gy1 * zc1, 0.0), axis=1))
            b_off = c.to(tl.int64)[:, None] * sbc + (n * sbn + oh.to(tl.int64) * sbh + ow.to(tl.int64) * sbw)[None, :]
            tl.store(g1m_ptr + b_off, gy1, mask=store_ok)
            tl.store(zc1_ptr + b_off, zc1, mask=store_ok)


