"""``triton_two_pass``'s pass 1 (the pixel-major GEMM with the BN1 + act epilogue into ``out[:, :m]``)
and the jit helpers both passes share. Design note: the top of ``triton_two_pass.py``."""
from __future__ import annotations

from . import common as tc
from .common import tl, triton

if triton is not None:

    @triton.jit
    def _udiv(p, magic, shift):
        """``p // d`` for int32 ``0 <= p < 2**30`` and ``(magic, shift) = _magic(d)``."""
        q = tl.umulhi((p << 2).to(tl.uint32, bitcast=True), magic.to(tl.uint32)) >> shift
        return q.to(tl.int32, bitcast=True)

    @triton.jit
    def _band_program(N_CB: tl.constexpr, n_bands):
        """(channel block, band, unit block) of this program of a stencil grid: channel block fastest, then
        band (programs running together share their rows through L2)."""
        pid = tl.program_id(0)
        t = pid // N_CB
        return pid % N_CB, t % n_bands, t // n_bands

    @triton.jit
    def _tap_weights(wd_ptr, j, j_ok, DD: tl.constexpr):
        """The DD tap weights of ghost channels ``j`` in fp32, as a tuple of [BLOCK_C] vectors."""
        ws = ()
        for t in tl.static_range(DD):
            ws = ws + (tl.load(wd_ptr + j * DD + t, mask=j_ok, other=0.0).to(tl.float32),)
        return ws

    @triton.jit
    def _tile_moments(z, p_ok, c, c_ok, row_ptr, plane):
        """Per channel c of the [pixels, channels] fp32 tile ``z``: the sum over the valid pixels
        (``p_ok``) and their squared deviations about that tile's mean, stored at ``row_ptr + c`` and
        ``plane`` elements further."""
        zv = tl.where(p_ok[:, None], z, 0.0)
        total = tl.sum(zv, axis=0)
        mean = total / tl.maximum(tl.sum(p_ok.to(tl.float32), axis=0), 1.0)
        dev = tl.where(p_ok[:, None], z - mean[None, :], 0.0)
        tl.store(row_ptr + c, total, mask=c_ok)
        tl.store(row_ptr + plane + c, tl.sum(dev * dev, axis=0), mask=c_ok)

    @triton.jit
    def _o_ptrs(out_ptr, n64, q, p, oh, ow, c, o_plane, son, soc, soh, sow, HWO, OUP: tl.constexpr,
                O_MODE: tl.constexpr, PER_IMAGE: tl.constexpr):
        """Pointers of the [pixels, channels] tile of ``out`` (its layout mode)."""
        if O_MODE == 2:
            if PER_IMAGE:
                o_ptrs = out_ptr + ((n64 * HWO + q) * OUP)[:, None] + c[None, :]
            else:
                o_ptrs = out_ptr + (p.to(tl.int64) * OUP)[:, None] + c[None, :]
        elif O_MODE == 3:
            o_ptrs = out_ptr + ((n64 * OUP + c) * o_plane)[None, :] + q[:, None]
        elif O_MODE == 1:
            o_ptrs = out_ptr + (n64 * son + q.to(tl.int64) * sow)[:, None] + c.to(tl.int64)[None, :] * soc
        else:
            o_ptrs = (out_ptr + (n64 * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[:, None]
                      + c.to(tl.int64)[None, :] * soc)
        return o_ptrs

    @triton.jit
    def _bn1_grad(z, u, y, g, p_ok, c, c_ok, coef_ptr, row_ptr, plane, M: tl.constexpr, ACT: tl.constexpr,
                  GRAD: tl.constexpr):
        """GRAD: g_u1 = act'(u1) dL/dy1 (the tile ``g``) on the tile; GRAD 1: its two BN1 backward
        sums per channel stored at ``row_ptr + c`` and ``plane`` further (returns the tile unchanged);
        GRAD 2: returns g_z1 = a1 g_u1 + b1 + c1 (z1 - mean1) (coefficients at ``coef_ptr``, M apart);
        GRAD 3 (BN1 on running statistics): g_z1 = a1 g_u1."""
        ok = p_ok[:, None] & c_ok[None, :]
        gu = tl.where(ok, tc.act_grad(g.to(tl.float32), u, y, ACT), 0.0)
        zc = z - tl.load(coef_ptr + c, mask=c_ok, other=0.0)[None, :]
        if GRAD == 1:
            tl.store(row_ptr + c, tl.sum(gu, axis=0), mask=c_ok)
            tl.store(row_ptr + plane + c, tl.sum(gu * zc, axis=0), mask=c_ok)
            return y
        else:
            gz = tl.load(coef_ptr + M + c, mask=c_ok, other=0.0)[None, :] * gu
            if GRAD == 2:   # batch statistics (3: running statistics, where zc may be NaN and 0 * NaN is NaN)
                cb = tl.load(coef_ptr + 2 * M + c, mask=c_ok, other=0.0)
                cc = tl.load(coef_ptr + 3 * M + c, mask=c_ok, other=0.0)
                gz += cb[None, :] + cc[None, :] * zc
            return gz

    @triton.jit
    def _act(y, ACT: tl.constexpr):
        """The activation of code ``ACT`` (``common.act``)."""
        return tc.act(y, ACT)

    @triton.jit
    def _conv_taps(x_ptr, w1_ptr, acc, n64, oh, ow, p_ok, c, c_ok, rk, xk, x_kstep, HW_IN, W_IN, sxn, sxh, sxw,
                   C_IN: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, X_MODE: tl.constexpr,
                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr, dt: tl.constexpr):
        """``acc += x_taps @ w1`` of a KS x KS conv (zero padding KS // 2) for output pixels (oh, ow) of
        image n64 and channels c: tap by tap, a K loop over the input pixels the tap shifts to (out of
        the image: masked to zero). w1 is dense M x C_IN x KS x KS."""
        KK: tl.constexpr = KS * KS
        PAD: tl.constexpr = KS // 2
        h_in = HW_IN // W_IN
        for tap in range(KK):
            kh = tap // KS
            ih = oh * STRIDE - PAD + kh
            iw = ow * STRIDE - PAD + (tap - kh * KS)
            t_ok = p_ok & (ih >= 0) & (ih < h_in) & (iw >= 0) & (iw < W_IN)
            if X_MODE == 2:
                x_tap = (n64 * HW_IN + ih * W_IN + iw) * C_IN
            else:
                x_tap = n64 * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            x_ptrs = x_ptr + x_tap[:, None] + xk[None, :]
            w_ptrs = w1_ptr + c[None, :] * (C_IN * KK) + rk[:, None] * KK + tap
            for k0 in range(0, C_IN, BLOCK_K):
                k_ok = k0 + rk < C_IN
                xt = tl.load(x_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(dt)
                wt = tl.load(w_ptrs, mask=c_ok[None, :] & k_ok[:, None], other=0.0).to(dt)
                acc = tc.dot_acc(xt, wt, acc, IEEE, DOT_F32)
                x_ptrs += x_kstep
                w_ptrs += BLOCK_K * KK
        return acc

    # Sizes and counts are not specialized on (== 1, % 16): a new batch or resolution would otherwise
    # compile a new variant; the alignment the vectors need comes from constexprs (C_IN, OUP, VPX/VPO,
    # VW) instead. Strides are specialized (== 1 and % 16 are what make 16-byte vectors provable).
    @triton.jit(do_not_specialize=["P_TOTAL", "HW_IN", "W_IN", "HWO", "WO", "QB", "HWV_X", "HWV_O",
                                   "mg_hw", "sh_hw", "mg_w", "sh_w", "n_tiles", "tiles_per_prog",
                                   "part_plane"])
    def _pw_kernel(
        x_ptr, w1_ptr, out_ptr, g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr, part_ptr, coef_ptr,
        P_TOTAL, HW_IN, W_IN, HWO, WO, QB, HWV_X, HWV_O, mg_hw, sh_hw, mg_w, sh_w,
        sxn, sxc, sxh, sxw, son, soc, soh, sow,
        n_tiles, tiles_per_prog, part_plane,
        C_IN: tl.constexpr, M: tl.constexpr, OUP: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
        ACT: tl.constexpr, STATS: tl.constexpr, GRAD: tl.constexpr,
        BN: tl.constexpr, X_MODE: tl.constexpr, O_MODE: tl.constexpr,
        VPX: tl.constexpr, VPO: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """Pass 1: ``out[pixel, c] = act((x[pixel, :] @ w1[c, :]) * scale1[c] + shift1[c])`` for c < M;
        with a KS x KS primary conv (KS > 1, zero padding KS // 2) an implicit GEMM: a K loop per tap over
        the tile's input pixels shifted by the tap (x dense channels_last or any strides: X_MODE 2 or 0).

        Tiles: both tensors dense channels_last -> BLOCK_P consecutive pixels of the flattened batch
        (offsets p * C, no division at stride 1); otherwise BLOCK_P consecutive pixels of one image
        (QB tiles per image), so that NCHW planes stay contiguous along the tile. Dense NCHW (mode 3)
        takes its plane size as HWV * VP with VP a constexpr power of two dividing it: the compiler
        then knows every vector's alignment.

        STATS (the training forward's statistics pass, ``train_ops.py``): nothing is stored in ``out``;
        each tile stores, per channel, the sum of its raw z1 = x @ w1 (no bias, no BN) over its valid
        pixels and their squared deviations about the tile's own mean, at ``part[0 / 1, pixel tile, c]``
        (``part_plane`` elements apart): Chan's merge of them is BN1's batch mean and variance.

        GRAD (the training backward's last passes, ``train_backward.py``): ``out`` holds dL/dy1 (M
        channels); u1 = z1 * scale1 + shift1 and y1 = act(u1) as the forward's writing pass computes
        them, g_u1 = act'(u1) dL/dy1. GRAD 1 stores per tile sum(g_u1) and sum(g_u1 (z1 - mean1)) as
        STATS stores its moments (BN1's backward sums; ``coef_ptr``: mean1 of the bias-free z1); GRAD 2
        overwrites dL/dy1 in place with BN1's input gradient g_z1 = a1 g_u1 + b1 + c1 (z1 - mean1)
        (``coef_ptr``: [4, M] fp32 mean1, a1, b1, c1); GRAD 3 with a1 g_u1 (BN1 on running statistics)."""
        N_CB: tl.constexpr = (M + BLOCK_N - 1) // BLOCK_N
        ONE_K: tl.constexpr = C_IN <= BLOCK_K
        K_MASK: tl.constexpr = C_IN % BLOCK_K != 0
        PER_IMAGE: tl.constexpr = (X_MODE != 2) or (O_MODE != 2)
        SPATIAL: tl.constexpr = (STRIDE != 1) or (KS != 1)     # input pixel != output pixel
        NEED_HW: tl.constexpr = (X_MODE == 0) or (O_MODE == 0) or SPATIAL
        dt = out_ptr.dtype.element_ty
        pid = tl.program_id(0)
        t_begin = pid * tiles_per_prog
        t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
        rp = tl.arange(0, BLOCK_P)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # x's channel stride (a constexpr 1 for dense channels_last: 16-byte vectors along K)
        if X_MODE == 2:
            xk = rk
            x_kstep: tl.constexpr = BLOCK_K
        elif X_MODE == 3:
            x_plane = tl.cast(HWV_X, tl.int64) * VPX
            xk = rk.to(tl.int64) * x_plane
            x_kstep = BLOCK_K * x_plane
        else:
            xk = rk.to(tl.int64) * sxc
            x_kstep = BLOCK_K * tl.cast(sxc, tl.int64)
        o_plane = 0
        if O_MODE == 3:
            o_plane = tl.cast(HWV_O, tl.int64) * VPO
        if N_CB == 1:  # one channel block: BN1 (and w1, if one K step) once per program
            c = rn
            c_ok = c < M
            scale, shift = tc.folded_bn(c, c_ok, g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr, BN)
            if ONE_K and KS == 1:
                wt = tl.load(w1_ptr + c[None, :] * C_IN + rk[:, None],
                             mask=c_ok[None, :] & (rk[:, None] < C_IN), other=0.0).to(dt)
        for tile in range(t_begin, t_end):
            if N_CB == 1:
                pb = tile
            else:  # channel block fastest: a program reuses its x tile from L1/L2
                cb = tile % N_CB
                pb = tile // N_CB
                c = cb * BLOCK_N + rn
                c_ok = c < M
                scale, shift = tc.folded_bn(c, c_ok, g1_ptr, b1_ptr, m1_ptr, v1_ptr, eps1, cb1_ptr, BN)
            q = rp          # (placeholders of the coordinates a layout mode does not use)
            p = rp
            oh = rp
            ow = rp
            n64 = tl.cast(0, tl.int64)
            # pixel coordinates: image n (scalar per tile, or per pixel), q = oh * W' + ow, (oh, ow)
            if PER_IMAGE:
                n = pb // QB
                q = (pb - n * QB) * BLOCK_P + rp
                if O_MODE == 3:      # H'W' as HWV * VP: the mask is constant over VP pixels (vectors)
                    p_ok = q < HWV_O * VPO
                elif X_MODE == 3:
                    p_ok = q < HWV_X * VPX
                else:
                    p_ok = q < HWO
            else:
                p = pb * BLOCK_P + rp
                p_ok = p < P_TOTAL
                if SPATIAL:
                    n = _udiv(p, mg_hw, sh_hw)
                    q = p - n * HWO
            if NEED_HW:
                oh = _udiv(q, mg_w, sh_w)
                ow = q - oh * WO
            if PER_IMAGE or SPATIAL:
                n64 = tl.cast(n, tl.int64)
            if GRAD:   # dL/dy1's tile, issued before the K loop: its latency hides behind the GEMM's
                o_ptrs = _o_ptrs(out_ptr, n64, q, p, oh, ow, c, o_plane, son, soc, soh, sow, HWO, OUP, O_MODE,
                                 PER_IMAGE)
                g_tile = tl.load(o_ptrs, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
            if KS != 1:
                acc = _conv_taps(x_ptr, w1_ptr, acc, n64, oh, ow, p_ok, c, c_ok, rk, xk, x_kstep, HW_IN, W_IN,
                                 sxn, sxh, sxw, C_IN, KS, STRIDE, X_MODE, BLOCK_K, IEEE, DOT_F32, dt)
            else:
                if X_MODE == 2:        # dense channels_last
                    if STRIDE == 1:
                        if PER_IMAGE:
                            x_pix = (n64 * HW_IN + q) * C_IN
                        else:
                            x_pix = p.to(tl.int64) * C_IN
                    else:
                        x_pix = (n64 * HW_IN + (oh * STRIDE * W_IN + ow * STRIDE)) * C_IN
                elif X_MODE == 3:      # dense NCHW, stride 1
                    x_pix = n64 * C_IN * x_plane + q
                elif X_MODE == 1:      # plane of x dense (sxh == W * sxw), stride 1
                    x_pix = n64 * sxn + q.to(tl.int64) * sxw
                else:
                    x_pix = n64 * sxn + (oh * STRIDE).to(tl.int64) * sxh + (ow * STRIDE).to(tl.int64) * sxw

                x_ptrs = x_ptr + x_pix[:, None] + xk[None, :]
                for k0 in range(0, C_IN, BLOCK_K):
                    if K_MASK:
                        xt = tl.load(x_ptrs, mask=p_ok[:, None] & (k0 + rk[None, :] < C_IN), other=0.0)
                    else:
                        xt = tl.load(x_ptrs, mask=p_ok[:, None], other=0.0)
                    xt = xt.to(dt)  # autocast: fp32 x, half compute (a no-op otherwise)
                    if (N_CB != 1) or (not ONE_K):
                        wt = tl.load(w1_ptr + c[None, :] * C_IN + (k0 + rk[:, None]),
                                     mask=c_ok[None, :] & (k0 + rk[:, None] < C_IN), other=0.0).to(dt)
                    acc = tc.dot_acc(xt, wt, acc, IEEE, DOT_F32)
                    x_ptrs += x_kstep

            if STATS:
                _tile_moments(acc, p_ok, c, c_ok, part_ptr + tl.cast(pb, tl.int64) * M, part_plane)
            else:
                u = acc * scale[None, :] + shift[None, :]
                y = _act(u, ACT)
                if not GRAD:
                    o_ptrs = _o_ptrs(out_ptr, n64, q, p, oh, ow, c, o_plane, son, soc, soh, sow, HWO, OUP, O_MODE,
                                     PER_IMAGE)
                if GRAD:
                    y = _bn1_grad(acc, u, y, g_tile, p_ok, c, c_ok, coef_ptr, part_ptr + tl.cast(pb, tl.int64) * M,
                                  part_plane, M, ACT, GRAD)
                if GRAD != 1:
                    if M % BLOCK_N == 0:
                        tl.store(o_ptrs, y.to(dt), mask=p_ok[:, None])
                    else:
                        tl.store(o_ptrs, y.to(dt), mask=p_ok[:, None] & c_ok[None, :])
