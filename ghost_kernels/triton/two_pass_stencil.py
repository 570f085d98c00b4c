"""``triton_two_pass``'s pass 2 for channels_last and any other strides (the depthwise stencil reading
y1 from ``out[:, :m]`` and writing ``out[:, m:oup]``). Design note: the top of ``triton_two_pass.py``."""
from __future__ import annotations

from . import common as tc
from .common import tl, triton

if triton is not None:
    from .two_pass_gemm import _act, _band_program, _tap_weights, _udiv
    from .two_pass_rows import _grad_row, _grad_store, _gz_row, _stats_row, _stats_store

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
    def _cl_load_row(y_ptr, pix, r, row_step, cy, col_step, HO_U, col_ok, c_ok,
                     PAD: tl.constexpr, NCOL: tl.constexpr, PAIRS: tl.constexpr, C_FULL: tl.constexpr):
        """The NCOL y1 columns of row ``r`` (a scalar, any integer: rows outside the image read 0), one
        predicated 16-byte vector each, in fp32: (lo, hi) tuples (PAIRS: even, odd channels; else hi = ())."""
        r = tl.cast(r, tl.int32)                           # (the interpreter's loop index is a Python int)
        r_ok = r.to(tl.uint32, bitcast=True) < HO_U
        r_ptr = y_ptr + (pix + r.to(tl.int64) * row_step)
        lo = ()
        hi = ()
        for k in tl.static_range(NCOL):
            ptrs = r_ptr[:, None] + ((k - PAD) * col_step + cy)[None, :]
            ok = r_ok & col_ok[k]
            if C_FULL:
                v = tl.load(ptrs, mask=ok[:, None], other=0)
            else:
                v = tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0)
            if PAIRS:  # bf16 -> fp32 is a shift (low half) or an AND (high half)
                lo = lo + ((v << 16).to(tl.float32, bitcast=True),)
                hi = hi + (((v >> 16) << 16).to(tl.float32, bitcast=True),)
            else:
                lo = lo + (v.to(tl.float32),)
        return lo, hi

    @triton.jit
    def _row_taps(accs, lo, hi, wrow, DW: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr, PAIRS: tl.constexpr):
        """``accs`` (NG x PIXR [BLOCK_G, BV] fp32 tiles, [t * PIXR + r]) plus one tap row (weights ``wrow``)
        of the input columns ``lo``/``hi``: output pixel r, tap dx reads column r + dx."""
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

    @triton.jit
    def _ring_taps(ring, lo, hi, wts, J_END: tl.constexpr, DY_J: tl.constexpr,
                   DW: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr, PAIRS: tl.constexpr):
        """Add one input row (columns ``lo``/``hi``) into the accumulators of the output rows it feeds:
        ring entry j < J_END (output row o + j) takes tap row dy = DY_J - j (hoisted weights ``wts``).
        ``ring``: DW entries of NG x PIXR tiles, entry j at [j * NG * PIXR + t * PIXR + r]."""
        new = ()
        for j in tl.static_range(DW):
            entry = ()
            for i in tl.static_range(NG * PIXR):
                entry = entry + (ring[j * NG * PIXR + i],)
            if j < J_END:
                entry = _row_taps(entry, lo, hi, _hoisted_row(wts, DY_J - j, DW, NG), DW, NG, PIXR, PAIRS)
            for i in tl.static_range(NG * PIXR):
                new = new + (entry[i],)
        return new

    @triton.jit
    def _cl_store_row(accs, orow, ocol, cgs, col_ok, ss, bs, jok, cc_ok, out_ptr,
                      PAD: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr, PAIRS: tl.constexpr,
                      ACT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
        """BN2 + act of one output row's accumulators (the first NG * PIXR tiles of ``accs``), stored."""
        dt = out_ptr.dtype.element_ty
        for r in tl.static_range(PIXR):
            p_ok = col_ok[PAD + r]
            if PAIRS:
                y_even = _act(accs[r] * ss[0][None, :] + bs[0][None, :], ACT)
                y_odd = _act(accs[PIXR + r] * ss[1][None, :] + bs[1][None, :], ACT)
                y = tl.reshape(tl.join(y_even, y_odd), [BLOCK_G, BLOCK_C])
                tl.store(out_ptr + (orow + r * ocol)[:, None] + cgs[0][None, :], y.to(dt),
                         mask=p_ok[:, None] & cc_ok[None, :])
            else:
                for t in tl.static_range(NG):
                    y = _act(accs[t * PIXR + r] * ss[t][None, :] + bs[t][None, :], ACT)
                    tl.store(out_ptr + (orow + r * ocol)[:, None] + cgs[t][None, :], y.to(dt),
                             mask=p_ok[:, None] & jok[t][None, :])

    @triton.jit
    def _finish_row(accs, stats, o, h0, g_ptr, g_pix, sgh, gcs, sgw, gz_ptr, z_pix, szh, zcs, szw, mus, coefs,
                    o_pix, o_row, ocol, cgs, col_ok, ss, bs, jok, cc_ok, out_ptr,
                    PAD: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr, PAIRS: tl.constexpr, ACT: tl.constexpr,
                    STATS: tl.constexpr, GRAD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
        """Output row ``o`` is complete in ``accs``: BN2 + act and the store, or the row's part of the
        program's reductions (STATS, GRAD 1), or its g_z2 (GRAD 2). Returns the reductions."""
        o64 = tl.cast(o, tl.int64)
        if GRAD == 1:
            stats = _grad_row(accs, stats, g_ptr + (g_pix + o64 * sgh), gcs, col_ok, ss, bs, mus, jok, cc_ok, sgw,
                              PAD, NG, PIXR, ACT, PAIRS, BLOCK_G, BLOCK_C)
        elif GRAD >= 2:
            stats = _gz_row(accs, stats, g_ptr + (g_pix + o64 * sgh), gcs, col_ok, ss, bs, mus, coefs, jok, cc_ok,
                            sgw, gz_ptr + (z_pix + o64 * szh), zcs, szw, PAD, NG, PIXR, PAIRS, ACT, GRAD == 2,
                            BLOCK_G, BLOCK_C)
        elif STATS:
            stats = _stats_row(accs, stats, col_ok, o == h0, PAD, NG, PIXR)
        else:
            _cl_store_row(accs, o_pix + o64 * o_row, ocol, cgs, col_ok, ss, bs, jok, cc_ok, out_ptr,
                          PAD, NG, PIXR, PAIRS, ACT, BLOCK_G, BLOCK_C)
        return stats

    @triton.jit(do_not_specialize=["U_TOTAL", "HO", "WO", "HWO", "WG", "mg_wg", "sh_wg", "n_bands", "band_rows",
                                   "part_plane"])
    def _dw_kernel(
        out_ptr, wd_ptr, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr, part_ptr, g_ptr, mu_ptr, coef_ptr, gz_ptr,
        U_TOTAL, HO, WO, HWO, WG, mg_wg, sh_wg,
        son, soc, soh, sow, sgn, sgc, sgh, sgw, szn, szc, szh, szw,
        n_bands, band_rows, part_plane,
        M: tl.constexpr, OUP: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, ACT: tl.constexpr,
        BN: tl.constexpr, O_MODE: tl.constexpr, STATS: tl.constexpr, GRAD: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, PIXR: tl.constexpr,
        W_HOIST: tl.constexpr, PAIRS: tl.constexpr, OVERREAD: tl.constexpr, STAGES: tl.constexpr,
    ):
        """Pass 2: ``out[p, M + j] = act(sum_taps y1[p + tap, j // (r-1)] * wd[j, tap] * scale2[j] + shift2[j])``
        for the kept ghost channels j < OUP - M, y1 = ``out[:, :M]``.

        A program = (channel block, band of ``band_rows`` output rows, block of BLOCK_G units). A unit is
        a column group of one image: PIXR horizontally adjacent pixels (w = wg * PIXR + i), units
        flattened over (image, wg), so a block spans several images of a small plane or part of a row
        of a wide one. Lanes: [BLOCK_G units, BV channel (pair) vectors]; a thread holds PIXR pixels of
        its 16-byte channel vector.

        The program walks its band top-down, one output row per step. Step o loads ONE input row,
        o + d//2 (PIXR + d - 1 predicated vectors per thread: each y1 column serves up to d taps), and
        adds it into the accumulators of the d output rows it feeds (a ring: output rows o..o+d-1); row
        o is then complete and stored, and the ring turns. The first d - 1 input rows of the band are
        loaded before the loop. The loop is software-pipelined (``tl.range(num_stages=STAGES)``): Triton
        turns each row's loads into 16-byte cp.async copies into a ring of STAGES - 1 shared-memory
        buffers, issued STAGES - 1 steps ahead, and reads them back with one LDS per vector (design
        note: "Pass 2's pipeline"). That is with hoisted weights (W_HOIST: up to 25 weight vectors; the
        launcher pipelines the ring, STAGES > 1, up to 9); with more taps a step reloads its d input rows
        instead (a window in a runtime loop, no ring, no pipeline).

        Accumulator groups: group t of channel vector c holds ghost channels ``j = c * (r-1) + t``, all
        reading y1 channel c. PAIRS (bf16, ratio 2, dense channels_last, even OUP): y1 is read as
        uint32 pairs of channels, c is a pair index, group 0 holds the even channel (low half: one shift
        to fp32) and group 1 the odd one (high half: one AND); the two are interleaved back for the store.
        OVERREAD (dense channels_last, N_CB * BLOCK_C <= OUP): the y1 reads of the last channel block run
        past M_NEED into the same pixel's ghost channels instead of masking per channel, so every read
        stays a 16-byte vector; what those lanes compute is never stored.

        STATS (the training forward's statistics pass, ``train_ops.py``): for every ghost channel, the
        sliced-off ones included (nn.BatchNorm2d tracks them), the raw z2 (no bias, no BN) is reduced
        instead of stored: per program and channel the sum and the squared deviations about the
        program's mean, at ``part[0 / 1, band block, j]`` (band block = unit block * n_bands + band,
        ``part_plane`` elements apart); Chan's merge of them is BN2's batch mean and variance.

        GRAD (the training backward's first pass, ``train_backward.py``): y1 is the forward's, recomputed
        into ``out[:, :M]`` by pass 1; for the kept ghost channels, u2 = z2 * scale2 + shift2 (BN given
        as AFFINE) and g_u2 = act'(u2) dL/dy2 (``g_ptr``, strides ``sg*``: dL/dout, its ghost channels)
        are reduced per program and channel into sum(g_u2) and sum(g_u2 (z2 - mean2)) (``mu_ptr``: BN2's
        mean of the bias-free z2), at ``part[0 / 1, band block, j]``: BN2's backward sums. GRAD 2 (the
        backward's second pass): with B1's sums over the batch as per-channel coefficients (``coef_ptr``:
        [3, OUP - M] fp32 a2, b2, c2), BN2's input gradient g_z2 = a2 g_u2 + b2 + c2 (z2 - mean2) is
        stored for the kept ghost channels (``gz_ptr``, strides ``sz*``, channel j at j) and summed per
        program into ``part[0, band block, j]`` (dL/dbias2); GRAD 3: a2 g_u2 (BN2 on running statistics)."""
        R1: tl.constexpr = RATIO - 1
        DD: tl.constexpr = DW * DW
        PAD: tl.constexpr = DW // 2
        NCOL: tl.constexpr = PIXR + 2 * PAD                # y1 columns per input row
        KEPT: tl.constexpr = M * R1 if STATS else OUP - M  # ghost channels computed (stored: OUP - M)
        M_NEED: tl.constexpr = (KEPT + R1 - 1) // R1       # intrinsic channels that feed them
        N_CB: tl.constexpr = (M_NEED + BLOCK_C - 1) // BLOCK_C
        C_FULL: tl.constexpr = (M_NEED % BLOCK_C == 0) or OVERREAD
        NG: tl.constexpr = 2 if PAIRS else R1              # accumulator groups
        BV: tl.constexpr = BLOCK_C // 2 if PAIRS else BLOCK_C
        ENTRY: tl.constexpr = NG * PIXR                    # accumulator tiles of one output row

        cb, band, ub = _band_program(N_CB, n_bands)
        cv = cb * BV + tl.arange(0, BV)                    # channel (pair) vector
        if PAIRS:
            c_ok = 2 * cv < M_NEED
            j0 = 2 * cv
        else:
            c_ok = cv < M_NEED
            j0 = cv * R1
        j0_ok = c_ok & (j0 < KEPT)
        s0, b0 = tc.folded_bn(j0, j0_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr, BN)
        ss = (s0,)
        bs = (b0,)
        jj = (j0,)
        jok = (j0_ok,)
        for t in tl.static_range(1, NG):
            jt = j0 + t
            jt_ok = c_ok & (jt < KEPT)
            st, bt = tc.folded_bn(jt, jt_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr, BN)
            ss = ss + (st,)
            bs = bs + (bt,)
            jj = jj + (jt,)
            jok = jok + (jt_ok,)
        wts = ()
        if W_HOIST:  # d*d*(r-1) <= 25 vectors of fp32 weights stay in registers for the whole program
            for t in tl.static_range(NG):
                wts = wts + (_tap_weights(wd_ptr, jj[t], jok[t], DD),)

        # the program's units: image n, first pixel column w0 (both fixed while it walks the rows)
        u = ub * BLOCK_G + tl.arange(0, BLOCK_G)
        u_ok = u < U_TOTAL
        n = _udiv(u, mg_wg, sh_wg)
        w0 = (u - n * WG) * PIXR
        n64 = n.to(tl.int64)
        # addressing at row 0: y1 reads (in elements, or uint32 pairs for PAIRS) and ghost stores
        if O_MODE == 2:
            o_pix = (n64 * HWO + w0) * OUP
            o_row = tl.cast(WO, tl.int64) * OUP
            if PAIRS:
                y_ptr = out_ptr.to(tl.pointer_type(tl.uint32))
                PS: tl.constexpr = OUP // 2                # pixel stride in pairs
                pix = (n64 * HWO + w0) * PS
                row_step = tl.cast(WO, tl.int64) * PS
                col_step: tl.constexpr = PS
            else:
                y_ptr = out_ptr
                pix = o_pix
                row_step = o_row
                col_step: tl.constexpr = OUP
            cy = cv
        else:
            y_ptr = out_ptr
            o_pix = n64 * son + w0.to(tl.int64) * sow
            pix = o_pix
            if O_MODE == 1:
                row_step = tl.cast(WO, tl.int64) * sow
            else:
                row_step = tl.cast(soh, tl.int64)
            o_row = row_step
            col_step = sow
            cy = cv.to(tl.int64) * soc
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
        # column masks, shared by every row: 0 <= w0 + k - PAD < WO (one unsigned compare)
        col_ok = ()
        for k in tl.static_range(NCOL):
            if (PIXR == 1) and (k == PAD):
                col_ok = col_ok + (u_ok,)
            else:
                col_ok = col_ok + (u_ok & ((w0 + (k - PAD)).to(tl.uint32, bitcast=True) < WO_U),)

        h0 = band * band_rows
        h1 = tl.minimum(h0 + band_rows, HO)
        if not PAIRS:
            cc_ok = c_ok                                   # (unused without PAIRS)
        stats = ()
        mus = ()
        gcs = ()
        coefs = ()
        zcs = ()
        g_pix = n64
        z_pix = n64
        if GRAD:
            zero = tl.zeros([BLOCK_G, BV], dtype=tl.float32)
            for t in tl.static_range(NG):
                stats = stats + (zero, zero)
                mus = mus + (tl.load(mu_ptr + jj[t], mask=jok[t], other=0.0),)
                if PAIRS:   # one load of the block's interleaved channels
                    gcs = ((M + cc).to(tl.int64) * sgc,)
                else:
                    gcs = gcs + ((M + jj[t]).to(tl.int64) * sgc,)
            g_pix = n64 * sgn + w0.to(tl.int64) * sgw
        if GRAD >= 2:
            for t in tl.static_range(NG):
                coefs = coefs + ((tl.load(coef_ptr + jj[t], mask=jok[t], other=0.0),
                                  tl.load(coef_ptr + KEPT + jj[t], mask=jok[t], other=0.0),
                                  tl.load(coef_ptr + 2 * KEPT + jj[t], mask=jok[t], other=0.0)),)
                if PAIRS:   # one interleaved store of the block's channels
                    zcs = (cc.to(tl.int64) * szc,)
                else:
                    zcs = zcs + (jj[t].to(tl.int64) * szc,)
            z_pix = n64 * szn + w0.to(tl.int64) * szw
        if STATS:
            for t in tl.static_range(NG):
                zero = tl.zeros([BLOCK_G, BV], dtype=tl.float32)
                stats = stats + (zero, zero, zero)
        if W_HOIST:
            # the ring: each input row loaded once, added into the d output rows it feeds
            ring = ()
            for i in tl.static_range(DW * ENTRY):
                ring = ring + (tl.zeros([BLOCK_G, BV], dtype=tl.float32),)
            # the band's first d - 1 input rows (h0 - PAD .. h0 + PAD - 1) into output rows h0 .. h0 + 2 PAD - 1
            for i in tl.static_range(2 * PAD):
                lo, hi = _cl_load_row(y_ptr, pix, h0 + (i - PAD), row_step, cy, col_step, HO_U, col_ok, c_ok,
                                      PAD, NCOL, PAIRS, C_FULL)
                ring = _ring_taps(ring, lo, hi, wts, i + 1, i, DW, NG, PIXR, PAIRS)
            for o in tl.range(h0, h1, num_stages=STAGES):
                lo, hi = _cl_load_row(y_ptr, pix, o + PAD, row_step, cy, col_step, HO_U, col_ok, c_ok,
                                      PAD, NCOL, PAIRS, C_FULL)
                ring = _ring_taps(ring, lo, hi, wts, DW, 2 * PAD, DW, NG, PIXR, PAIRS)
                # output row o is complete (stored, or reduced); the ring turns
                stats = _finish_row(ring, stats, o, h0, g_ptr, g_pix, sgh, gcs, sgw, gz_ptr, z_pix, szh, zcs, szw,
                                    mus, coefs, o_pix, o_row, ocol, cgs, col_ok, ss, bs, jok, cc_ok, out_ptr,
                                    PAD, NG, PIXR, PAIRS, ACT, STATS, GRAD, BLOCK_G, BLOCK_C)
                turned = ()
                for i in tl.static_range(ENTRY, DW * ENTRY):
                    turned = turned + (ring[i],)
                for i in tl.static_range(ENTRY):
                    turned = turned + (tl.zeros([BLOCK_G, BV], dtype=tl.float32),)
                ring = turned
        else:
            # many taps (d*d*(r-1) > 25, the paper's ablations): a window, no ring -- each output row
            # reloads its d input rows (L1 hits) in a runtime loop with that row's weights (bounded code
            # size and live registers); the launcher runs it with STAGES = 1
            for o in tl.range(h0, h1, num_stages=STAGES):
                accs = ()
                for i in tl.static_range(ENTRY):
                    accs = accs + (tl.zeros([BLOCK_G, BV], dtype=tl.float32),)
                for dy in range(DW):
                    lo, hi = _cl_load_row(y_ptr, pix, o + dy - PAD, row_step, cy, col_step, HO_U, col_ok, c_ok,
                                          PAD, NCOL, PAIRS, C_FULL)
                    accs = _row_taps(accs, lo, hi, _row_weights(wd_ptr, jj, jok, dy, DW, NG), DW, NG, PIXR, PAIRS)
                stats = _finish_row(accs, stats, o, h0, g_ptr, g_pix, sgh, gcs, sgw, gz_ptr, z_pix, szh, zcs, szw,
                                    mus, coefs, o_pix, o_row, ocol, cgs, col_ok, ss, bs, jok, cc_ok, out_ptr,
                                    PAD, NG, PIXR, PAIRS, ACT, STATS, GRAD, BLOCK_G, BLOCK_C)
        if GRAD:
            _grad_store(stats, jj, jok, part_ptr + (ub * n_bands + band).to(tl.int64) * KEPT, part_plane, NG, GRAD == 1)
        if STATS:
            _stats_store(stats, col_ok, (h1 - h0).to(tl.float32), jj, jok,
                         part_ptr + (ub * n_bands + band).to(tl.int64) * KEPT, part_plane, PAD, NG, PIXR)
