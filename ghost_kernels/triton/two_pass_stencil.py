"""``triton_two_pass``'s pass 2 for channels_last and any other strides (the depthwise stencil reading
y1 from ``out[:, :m]`` and writing ``out[:, m:oup]``). Design note: the top of ``triton_two_pass.py``."""
from __future__ import annotations

from . import common as tc
from .common import tl, triton

if triton is not None:
    from .two_pass_gemm import _act, _image_row_col, _run_of_blocks, _tap_weights

    @triton.jit
    def _row_weights(wd_ptr, jj, jok, dy, DW: tl.constexpr, NG: tl.constexpr):
        """Weights of tap row ``dy`` (may be a runtime value): tuple over groups t of tuples over dx of
        [channels] fp32 vectors, for ghost channels ``jj[t]``."""
        out = ()
        for t in tl.static_range(NG):
            row = ()
            for dx in tl.static_range(DW):
                w = tl.load(wd_ptr + jj[t] * (DW * DW) + (dy * DW + dx), mask=jok[t], other=0.0)
                row = row + (w.to(tl.float32),)
            out = out + (row,)
        return out

    @triton.jit
    def _hoisted_row(wts, dy: tl.constexpr, DW: tl.constexpr, NG: tl.constexpr):
        """Tap row ``dy`` of the program's hoisted weights (``wts[t][dy * DW + dx]``), as ``_row_weights``."""
        out = ()
        for t in tl.static_range(NG):
            row = ()
            for dx in tl.static_range(DW):
                row = row + (wts[t][dy * DW + dx],)
            out = out + (row,)
        return out

    @triton.jit
    def _cl_row(accs, wrow, y_ptr, pix, row_step, cy, col_step, h, HO_U, col_ok, c_ok, dy,
                PAD: tl.constexpr, DW: tl.constexpr, NCOL: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr,
                PAIRS: tl.constexpr, C_FULL: tl.constexpr, CENTER: tl.constexpr):
        """One tap row of ``_dw_kernel``: load the NCOL y1 columns of row h + dy - PAD (one predicated
        vector each), convert, and add their d taps into the PIXR accumulators of each group.
        CENTER: dy is the compile-time centre row (no row test)."""
        if not CENTER:
            r_ok = (h + (dy - PAD)).to(tl.uint32, bitcast=True) < HO_U
        r_ptr = y_ptr + (pix + (dy - PAD) * row_step)
        lo = ()   # the NCOL columns of this tap row in fp32 (PAIRS: even channels)
        hi = ()   # PAIRS: odd channels
        for k in tl.static_range(NCOL):
            if CENTER:
                ok = col_ok[k]
            else:
                ok = r_ok & col_ok[k]
            ptrs = r_ptr[:, None] + ((k - PAD) * col_step + cy)[None, :]
            if C_FULL:
                v = tl.load(ptrs, mask=ok[:, None], other=0)
            else:
                v = tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0)
            if PAIRS:  # bf16 -> fp32 is a shift (low half) or an AND (high half)
                lo = lo + ((v << 16).to(tl.float32, bitcast=True),)
                hi = hi + (((v >> 16) << 16).to(tl.float32, bitcast=True),)
            else:
                lo = lo + (v.to(tl.float32),)
        new = ()
        for t in tl.static_range(NG):
            for r in tl.static_range(PIXR):
                a = accs[t * PIXR + r]
                for dx in tl.static_range(DW):
                    if PAIRS and t == 1:
                        a += hi[r + dx] * wrow[t][dx][None, :]
                    else:
                        a += lo[r + dx] * wrow[t][dx][None, :]
                new = new + (a,)
        return new

    @triton.jit(do_not_specialize=["G_TOTAL", "HO", "WO", "HWG", "WG", "mg_hw", "sh_hw", "mg_w", "sh_w",
                                   "n_blocks", "blocks_per_prog"])
    def _dw_kernel(
        out_ptr, wd_ptr, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2,
        G_TOTAL, HO, WO, HWG, WG, mg_hw, sh_hw, mg_w, sh_w,
        son, soc, soh, sow,
        n_blocks, blocks_per_prog,
        M: tl.constexpr, OUP: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, RELU: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, O_MODE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, PIXR: tl.constexpr,
        W_HOIST: tl.constexpr, PAIRS: tl.constexpr, OVERREAD: tl.constexpr,
    ):
        """Pass 2: ``out[p, M + j] = act(sum_taps y1[p + tap, j // (r-1)] * wd[j, tap] * scale2[j] + shift2[j])``
        for the kept ghost channels j < OUP - M, y1 = ``out[:, :M]``.

        Lanes: a [BLOCK_G, BLOCK_C] tile of (pixel group, channel); a pixel group is PIXR horizontally
        adjacent pixels of one row (w = wg * PIXR + r), so each thread holds PIXR pixels of its channel
        vector and each y1 column it loads (PIXR + d - 1 per tap row, not PIXR * d) serves up to d taps.
        Groups are flattened over (image, row, wg); a program walks BLOCK_G of them at a time.

        Accumulator groups: group t of channel vector c holds ghost channels ``j = c * (r-1) + t``, all
        reading y1 channel c. PAIRS (bf16, ratio 2, dense channels_last, even OUP): y1 is read as
        uint32 pairs of channels, c is a pair index, group 0 holds the even channel (low half: one shift
        to fp32) and group 1 the odd one (high half: one AND); the two are interleaved back for the store.
        OVERREAD (dense channels_last, N_CB * BLOCK_C <= OUP): the y1 reads of the last channel block run
        past M_NEED into the same pixel's ghost channels instead of masking per channel, so every read
        stays a 16-byte vector; what those lanes compute is never stored."""
        R1: tl.constexpr = RATIO - 1
        DD: tl.constexpr = DW * DW
        PAD: tl.constexpr = DW // 2
        NCOL: tl.constexpr = PIXR + 2 * PAD                # y1 columns per tap row
        KEPT: tl.constexpr = OUP - M                       # ghost channels that survive the slice
        M_NEED: tl.constexpr = (KEPT + R1 - 1) // R1       # intrinsic channels that feed them
        N_CB: tl.constexpr = (M_NEED + BLOCK_C - 1) // BLOCK_C
        C_FULL: tl.constexpr = (M_NEED % BLOCK_C == 0) or OVERREAD
        NG: tl.constexpr = 2 if PAIRS else R1              # accumulator groups
        BV: tl.constexpr = BLOCK_C // 2 if PAIRS else BLOCK_C
        dt = out_ptr.dtype.element_ty

        pid = tl.program_id(0)
        cb = pid % N_CB                                    # channel block fastest
        grp = pid // N_CB
        cv = cb * BV + tl.arange(0, BV)                    # channel (pair) vector
        if PAIRS:
            c_ok = 2 * cv < M_NEED
            j0 = 2 * cv
        else:
            c_ok = cv < M_NEED
            j0 = cv * R1
        j0_ok = c_ok & (j0 < KEPT)
        s0, b0 = tc.folded_bn(j0, j0_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, HAS_W, HAS_B)
        ss = (s0,)
        bs = (b0,)
        jj = (j0,)
        jok = (j0_ok,)
        for t in tl.static_range(1, NG):
            jt = j0 + t
            jt_ok = c_ok & (jt < KEPT)
            st, bt = tc.folded_bn(jt, jt_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, HAS_W, HAS_B)
            ss = ss + (st,)
            bs = bs + (bt,)
            jj = jj + (jt,)
            jok = jok + (jt_ok,)
        if W_HOIST:  # d*d*(r-1) <= 9 vectors of fp32 weights stay in registers for the whole program
            wts = ()
            for t in tl.static_range(NG):
                wts = wts + (_tap_weights(wd_ptr, jj[t], jok[t], DD),)

        # addressing: y1 reads (in elements, or uint32 pairs for PAIRS) and ghost stores
        if PAIRS:
            y_ptr = out_ptr.to(tl.pointer_type(tl.uint32))
            PS: tl.constexpr = OUP // 2                   # pixel stride in pairs
            cy = cv
            row_step = tl.cast(WO, tl.int64) * PS
            col_step: tl.constexpr = PS
        elif O_MODE == 2:
            y_ptr = out_ptr
            cy = cv
            row_step = tl.cast(WO, tl.int64) * OUP
            col_step: tl.constexpr = OUP
        else:
            y_ptr = out_ptr
            cy = cv.to(tl.int64) * soc
            if O_MODE == 1:
                row_step = tl.cast(WO, tl.int64) * sow
            else:
                row_step = soh
            col_step = sow
        if PAIRS:
            cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)      # the channels of the interleaved store
            cgs = (M + cc,)
            cc_ok = cc < KEPT
        elif O_MODE == 2:
            cgs = ()
            for t in tl.static_range(NG):
                cgs = cgs + (M + jj[t],)
        else:
            cgs = ()
            for t in tl.static_range(NG):
                cgs = cgs + ((M + jj[t]).to(tl.int64) * soc,)
        if O_MODE == 2:
            ocol: tl.constexpr = OUP
        else:
            ocol = sow
        HO_U = tl.cast(HO, tl.uint32)
        WO_U = tl.cast(WO, tl.uint32)

        blk_begin, blk_end = _run_of_blocks(grp, blocks_per_prog, n_blocks)
        for blk in range(blk_begin, blk_end):
            g = blk * BLOCK_G + tl.arange(0, BLOCK_G)
            g_ok = g < G_TOTAL
            n, q, h, wg = _image_row_col(g, HWG, WG, mg_hw, sh_hw, mg_w, sh_w)
            w0 = wg * PIXR                                  # first pixel column of the group
            if O_MODE == 2:
                if PIXR == 1:
                    p0 = g.to(tl.int64)
                else:
                    p0 = (n.to(tl.int64) * HO + h) * WO + w0
                o_pix = p0 * OUP
                if PAIRS:
                    pix = p0 * PS
                else:
                    pix = o_pix
            elif O_MODE == 1:
                pix = n.to(tl.int64) * son + (h * WO + w0).to(tl.int64) * sow
                o_pix = pix
            else:
                pix = n.to(tl.int64) * son + h.to(tl.int64) * soh + w0.to(tl.int64) * sow
                o_pix = pix
            # column masks, shared by the tap rows: 0 <= w0 + k - PAD < WO (one unsigned compare)
            col_ok = ()
            for k in tl.static_range(NCOL):
                if (PIXR == 1) and (k == PAD):
                    col_ok = col_ok + (g_ok,)
                else:
                    col_ok = col_ok + (g_ok & ((w0 + (k - PAD)).to(tl.uint32, bitcast=True) < WO_U),)

            accs = ()
            for i in tl.static_range(NG * PIXR):
                accs = accs + (tl.zeros([BLOCK_G, BV], dtype=tl.float32),)
            if W_HOIST:
                for dy in tl.static_range(DW):
                    accs = _cl_row(accs, _hoisted_row(wts, dy, DW, NG), y_ptr, pix, row_step, cy, col_step, h, HO_U,
                                   col_ok, c_ok, dy, PAD, DW, NCOL, NG, PIXR, PAIRS, C_FULL, dy == PAD)
            else:  # many taps: a runtime loop over the tap rows keeps code size and live weights small
                for dy in range(DW):
                    accs = _cl_row(accs, _row_weights(wd_ptr, jj, jok, dy, DW, NG), y_ptr, pix, row_step, cy, col_step,
                                   h, HO_U, col_ok, c_ok, dy, PAD, DW, NCOL, NG, PIXR, PAIRS, C_FULL, False)

            for r in tl.static_range(PIXR):
                if PIXR == 1:
                    p_ok = g_ok
                else:
                    p_ok = col_ok[PAD + r]
                if PAIRS:
                    y_even = _act(accs[r] * ss[0][None, :] + bs[0][None, :], RELU)
                    y_odd = _act(accs[PIXR + r] * ss[1][None, :] + bs[1][None, :], RELU)
                    y = tl.reshape(tl.join(y_even, y_odd), [BLOCK_G, BLOCK_C])
                    tl.store(out_ptr + (o_pix + r * ocol)[:, None] + cgs[0][None, :], y.to(dt),
                             mask=p_ok[:, None] & cc_ok[None, :])
                else:
                    for t in tl.static_range(NG):
                        y = _act(accs[t * PIXR + r] * ss[t][None, :] + bs[t][None, :], RELU)
                        tl.store(out_ptr + (o_pix + r * ocol)[:, None] + cgs[t][None, :], y.to(dt),
                                 mask=p_ok[:, None] & jok[t][None, :])


