"""``triton_band``'s kernel: one program = a band of full-width rows (or whole small images) x a block of
intrinsic channels; y1 in registers, the depthwise stencil by shifts (tl.gather). Design note, tiling
and launcher: ``triton_band.py``."""
from __future__ import annotations

from . import common as tc
from .common import tl, triton

if triton is not None:

    # The batch and the band count are not specialized (a batch of 1, 16 or 7 would each compile a
    # variant); H' and W' are (Triton's "== 1" / "% 16": W' = 112 makes the column masks constant over 16
    # lanes: -14% instructions at 112x112), and so are the strides, with their power-of-two factors
    # made explicit (_aligned_strides).
    @triton.jit(do_not_specialize=["N", "n_bands"])
    def _band_kernel(
        x_src, out_ptr, w1_src, wd_ptr,    # x_src: x's pointer, or (X_TMA) a TMA descriptor of x as N x H x W x C;
                                           # w1_src: w1's pointer, or (W1_TMA) a TMA descriptor of w1 as m x Cin
        g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr,    # BN1 and the primary conv's bias (tc.bn_args)
        g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr,
        N, HO, WO, n_bands,
        gate_ptr, sgn, sgc, sgh, sgw, GH, GW,   # GATE: GhostNetV2's attention (N x OUP x GH x GW), upsampled nearest
        sxn, sxc, sxh, sxw,            # strides of x, divided by 2**(digit of XAL): see _aligned_strides
        son, soc, soh, sow,            # the same for out (OAL)
        sw1m, sw1k, swdj, swdy, swdx,
        C_IN: tl.constexpr, M: tl.constexpr, OUP: tl.constexpr,
        STRIDE: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, ACT: tl.constexpr,
        BN1: tl.constexpr, BN2: tl.constexpr,
        XAL: tl.constexpr, OAL: tl.constexpr, X_TMA: tl.constexpr, W1_TMA: tl.constexpr, GATE: tl.constexpr,
        W_PAD: tl.constexpr, T_ROWS: tl.constexpr, TOP: tl.constexpr, IMGS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # Strides times their known power-of-two factor: the compiler then knows, e.g., that a pixel of a
        # channels_last tensor with 72 channels starts 16-byte aligned (Triton itself only knows "% 16").
        sxn = sxn * (1 << (XAL % 8))
        sxc = sxc * (1 << (XAL // 8 % 8))
        sxh = sxh * (1 << (XAL // 64 % 8))
        sxw = sxw * (1 << (XAL // 512 % 8))
        son = son * (1 << (OAL % 8))
        soc = soc * (1 << (OAL // 8 % 8))
        soh = soh * (1 << (OAL // 64 % 8))
        sow = sow * (1 << (OAL // 512 % 8))
        PAD: tl.constexpr = DW // 2
        IMG_P: tl.constexpr = T_ROWS * W_PAD               # lanes of one image's tile
        BLOCK_P: tl.constexpr = IMGS * IMG_P
        R_OUT: tl.constexpr = T_ROWS - TOP - PAD          # output rows of one band
        N_MB: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M
        dt = out_ptr.dtype.element_ty

        pid = tl.program_id(0)
        mb = pid % N_MB                                    # channel block fastest: co-running programs share x in L2
        t = pid // N_MB
        band = t % n_bands
        img0 = (t // n_bands) * IMGS

        q = tl.arange(0, BLOCK_P)                          # lane = (image, tile row, column)
        trow = (q // W_PAD) % T_ROWS
        col = q % W_PAD
        row = band * R_OUT - TOP + trow                    # output row of each lane
        n = img0 + q // IMG_P
        in_img = (row >= 0) & (row < HO) & (col < WO) & (n < N)
        keep = in_img & (trow >= TOP) & (trow < TOP + R_OUT)
        n64 = n.to(tl.int64)
        g_pix = gate_ptr
        if GATE:   # the gate's pixel of each lane: nearest, floor(row * GH / H') as interpolate(size=...) picks
            g_pix = gate_ptr + n64 * sgn + ((row * GH) // HO).to(tl.int64) * sgh + ((col * GW) // WO).to(tl.int64) * sgw

        c = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        c_ok = c < M

        # BN1 and BN2 folded before the K loop where their vectors are small (BN_EARLY: BLOCK_M <= 16): their
        # loads fly while the loop waits for x instead of costing one more round trip after it. Wide channel
        # blocks fold after the loop: 4 x 64-channel vectors live across it spilled under Triton 3.6.
        BN_EARLY: tl.constexpr = BLOCK_M <= 16
        j0 = c * (RATIO - 1)   # ghost channels j = c * (r - 1) + k, k < r - 1 <= 3
        if BN_EARLY:
            scale1, shift1, s20, b20, s21, b21, s22, b22 = _bn_both(
                c, j0, c_ok, g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2,
                cb2_ptr, BN1, BN2, RATIO)

        # 1. primary 1x1 conv: acc[pixels, channels] = x[pixels, Cin] @ w1^T[Cin, channels]
        if not X_TMA:
            x_pix = x_src + n64 * sxn + (row * STRIDE).to(tl.int64) * sxh + (col * STRIDE).to(tl.int64) * sxw
        acc = tl.zeros([BLOCK_P, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, C_IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < C_IN
            if X_TMA:   # the box's out-of-image rows, columns, images and channels arrive as zeros
                xt = x_src.load([img0, band * R_OUT - TOP, 0, k0])
                xt = tl.reshape(xt, [BLOCK_P, BLOCK_K]).to(dt)
            else:
                xt = tl.load(x_pix[:, None] + k[None, :] * sxc, mask=in_img[:, None] & k_ok[None, :],
                             other=0.0).to(dt)
            if W1_TMA:  # a 2-D box [BLOCK_M, BLOCK_K] of w1 (out-of-range channels arrive as zeros)
                wt = tl.trans(w1_src.load([mb * BLOCK_M, k0])).to(dt)
            else:
                wt = tl.load(w1_src + k[:, None] * sw1k + c[None, :] * sw1m, mask=k_ok[:, None] & c_ok[None, :],
                             other=0.0).to(dt)
            acc = tc.dot_acc(xt, wt, acc, IEEE, DOT_F32)

        # 2. BN1 + act in fp32; zero outside the image (the depthwise conv zero-pads y1, not x)
        if not BN_EARLY:
            scale1, shift1, s20, b20, s21, b21, s22, b22 = _bn_both(
                c, j0, c_ok, g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2,
                cb2_ptr, BN1, BN2, RATIO)
        y = acc * scale1[None, :] + shift1[None, :]
        y = tc.act(y, ACT)
        y1 = y.to(dt)                                      # rounded like eager's y1
        o_pix = out_ptr + n64 * son + row.to(tl.int64) * soh + col.to(tl.int64) * sow
        tl.store(o_pix[:, None] + c.to(tl.int64)[None, :] * soc, _gated(y1, g_pix, c, keep, c_ok, sgc, GATE),
                 mask=keep[:, None] & c_ok[None, :])

        # 3. depthwise conv by shifts of the y1 tile along its lanes: neighbour (dy, dx) of lane q is
        # lane q + dy * W_PAD + dx (spare columns and out-of-image rows hold zeros)
        yf = tl.where(in_img[:, None], y1.to(tl.float32), 0.0)
        # ghost channels j = c * (r - 1) + k: one accumulator each, fed by the same shifted tile (one
        # gather per tap, whatever the ratio), started at BN2's shift
        acc0 = tl.zeros([BLOCK_P, BLOCK_M], dtype=tl.float32) + b20[None, :]
        if RATIO > 2:
            acc1 = tl.zeros([BLOCK_P, BLOCK_M], dtype=tl.float32) + b21[None, :]
        if RATIO > 3:
            acc2 = tl.zeros([BLOCK_P, BLOCK_M], dtype=tl.float32) + b22[None, :]
        for dy in tl.static_range(DW):
            for dx in tl.static_range(DW):
                if PAD == 0:
                    v = yf
                else:
                    idx = (q + ((dy - PAD) * W_PAD + (dx - PAD))) & (BLOCK_P - 1)
                    v = tl.gather(yf, tl.broadcast_to(idx[:, None], [BLOCK_P, BLOCK_M]), 0)
                tap = wd_ptr + dy * swdy + dx * swdx
                acc0 += v * (tl.load(tap + j0 * swdj, mask=c_ok, other=0.0).to(tl.float32) * s20)[None, :]
                if RATIO > 2:
                    acc1 += v * (tl.load(tap + (j0 + 1) * swdj, mask=c_ok, other=0.0).to(tl.float32) * s21)[None, :]
                if RATIO > 3:
                    acc2 += v * (tl.load(tap + (j0 + 2) * swdj, mask=c_ok, other=0.0).to(tl.float32) * s22)[None, :]
        _store_ghost(o_pix, acc0, j0, c_ok, keep, soc, M, OUP, ACT, g_pix, sgc, GATE)
        if RATIO > 2:
            _store_ghost(o_pix, acc1, j0 + 1, c_ok, keep, soc, M, OUP, ACT, g_pix, sgc, GATE)
        if RATIO > 3:
            _store_ghost(o_pix, acc2, j0 + 2, c_ok, keep, soc, M, OUP, ACT, g_pix, sgc, GATE)

    @triton.jit
    def _bn_both(c, j0, c_ok, g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2,
                 cb2_ptr, BN1: tl.constexpr, BN2: tl.constexpr, RATIO: tl.constexpr):
        """BN1 of channels c and BN2 of their ghost channels j0 + k, k < r - 1 (unused ones: BN2 of j0)."""
        scale1, shift1 = tc.folded_bn(c, c_ok, g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr, BN1)
        s20, b20 = tc.folded_bn(j0, c_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr, BN2)
        s21, b21 = s20, b20
        s22, b22 = s20, b20
        if RATIO > 2:
            s21, b21 = tc.folded_bn(j0 + 1, c_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr, BN2)
        if RATIO > 3:
            s22, b22 = tc.folded_bn(j0 + 2, c_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr, BN2)
        return scale1, shift1, s20, b20, s21, b21, s22, b22

    @triton.jit
    def _store_ghost(o_pix, acc, j, c_ok, keep, soc, M: tl.constexpr, OUP: tl.constexpr, ACT: tl.constexpr,
                     g_pix, sgc, GATE: tl.constexpr):
        """act, round, (GATE) times the gate, store ghost channels j < oup - m into out[:, m + j] (the slice
        drops the rest)."""
        ok = c_ok & (j < OUP - M)
        y = _gated(tc.act(acc, ACT).to(o_pix.dtype.element_ty), g_pix, M + j, keep, ok, sgc, GATE)
        tl.store(o_pix[:, None] + (M + j).to(tl.int64)[None, :] * soc, y, mask=keep[:, None] & ok[None, :])

    @triton.jit
    def _gated(y, g_pix, ch, keep, ok, sgc, GATE: tl.constexpr):
        """``y`` (the output dtype, rounded as eager rounds the concatenation) times the gate of channels
        ``ch`` at each lane's pixel, rounded again: eager's ``out * gate``."""
        if GATE:
            g = tl.load(g_pix[:, None] + ch.to(tl.int64)[None, :] * sgc, mask=keep[:, None] & ok[None, :], other=0.0)
            y = (y.to(tl.float32) * g.to(tl.float32)).to(y.dtype)
        return y
