"""``triton_two_pass``'s pass 2 for dense NCHW outputs (vectors along W, split into columns in
registers). Design note: the top of ``triton_two_pass.py``."""
from __future__ import annotations

from . import common as tc
from .common import tl, triton

if triton is not None:
    from .two_pass_gemm import _act, _image_row_col, _run_of_blocks, _tap_weights
    from .two_pass_stencil import _hoisted_row, _row_weights

    @triton.jit
    def _split_cols(v, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, VW: tl.constexpr):
        """[BLOCK_C, BLOCK_R, VW] -> tuple of its VW columns ([BLOCK_C, BLOCK_R] each), in order. The VW
        elements are one thread's vector: the splits only rename registers."""
        if VW == 1:
            return (tl.reshape(v, [BLOCK_C, BLOCK_R]),)
        elif VW == 2:
            a, b = tl.split(v)
            return (a, b)
        elif VW == 4:
            e, o = tl.split(tl.reshape(v, [BLOCK_C, BLOCK_R, 2, 2]))   # columns (0, 2), (1, 3)
            c0, c2 = tl.split(e)
            c1, c3 = tl.split(o)
            return (c0, c1, c2, c3)
        else:
            e, o = tl.split(tl.reshape(v, [BLOCK_C, BLOCK_R, 4, 2]))   # columns (0, 2, 4, 6), (1, 3, 5, 7)
            ee, eo = tl.split(tl.reshape(e, [BLOCK_C, BLOCK_R, 2, 2]))  # (0, 4), (2, 6)
            oe, oo = tl.split(tl.reshape(o, [BLOCK_C, BLOCK_R, 2, 2]))  # (1, 5), (3, 7)
            c0, c4 = tl.split(ee)
            c2, c6 = tl.split(eo)
            c1, c5 = tl.split(oe)
            c3, c7 = tl.split(oo)
            return (c0, c1, c2, c3, c4, c5, c6, c7)

    @triton.jit
    def _join_cols(cs, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, VW: tl.constexpr):
        """The inverse of ``_split_cols``: VW columns -> [BLOCK_C, BLOCK_R, VW]."""
        if VW == 1:
            return tl.reshape(cs[0], [BLOCK_C, BLOCK_R, 1])
        elif VW == 2:
            return tl.join(cs[0], cs[1])
        elif VW == 4:
            e = tl.join(cs[0], cs[2])
            o = tl.join(cs[1], cs[3])
            return tl.reshape(tl.join(e, o), [BLOCK_C, BLOCK_R, 4])
        else:
            e = tl.reshape(tl.join(tl.join(cs[0], cs[4]), tl.join(cs[2], cs[6])), [BLOCK_C, BLOCK_R, 4])
            o = tl.reshape(tl.join(tl.join(cs[1], cs[5]), tl.join(cs[3], cs[7])), [BLOCK_C, BLOCK_R, 4])
            return tl.reshape(tl.join(e, o), [BLOCK_C, BLOCK_R, 8])

    @triton.jit
    def _nchw_row(accs, wrow, out_ptr, cy, rv, WV, h, HO, side_ok, c_ok, e, dy,
                  PAD: tl.constexpr, DW: tl.constexpr, NV: tl.constexpr, VW: tl.constexpr, R1: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, C_FULL: tl.constexpr, CENTER: tl.constexpr):
        """One tap row of ``_dw_nchw_kernel``: the 2 NV + 1 vectors of row h + dy - PAD, split into
        columns, each column added into the (up to d) outputs that read it."""
        if CENTER:
            base = (cy[:, None] + rv[None, :]) * VW
        else:
            r_ok = (h + (dy - PAD)).to(tl.uint32, bitcast=True) < tl.cast(HO, tl.uint32)
            base = (cy[:, None] + (rv + (dy - PAD) * WV)[None, :]) * VW   # [C, R] element offsets
        cols = ()
        for k in tl.static_range(2 * NV + 1):
            if CENTER:
                ok = side_ok[k]
            else:
                ok = r_ok & side_ok[k]
            mask = ok[None, :, None]
            if not C_FULL:
                mask = mask & c_ok[:, None, None]
            v = tl.load(out_ptr + (base + (k - NV) * VW)[:, :, None] + e[None, None, :], mask=mask, other=0)
            cols = cols + _split_cols(v.to(tl.float32), BLOCK_C, BLOCK_R, VW)   # unused columns: dead code
        new = ()
        for t in tl.static_range(R1):
            for r in tl.static_range(VW):
                a = accs[t * VW + r]
                for dx in tl.static_range(DW):
                    # output column r, tap dx reads column r + dx - PAD: index NV * VW + r + dx - PAD
                    a += cols[NV * VW + r + dx - PAD] * wrow[t][dx][:, None]
                new = new + (a,)
        return new

    @triton.jit(do_not_specialize=["G_TOTAL", "HO", "WV", "HWV", "mg_g", "sh_g", "mg_v", "sh_v",
                                   "n_blocks", "blocks_per_prog"])
    def _dw_nchw_kernel(
        out_ptr, wd_ptr, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2,
        G_TOTAL, HO, WV, HWV, mg_g, sh_g, mg_v, sh_v,
        n_blocks, blocks_per_prog,
        M: tl.constexpr, OUP: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, RELU: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, VW: tl.constexpr, W_HOIST: tl.constexpr,
    ):
        """Pass 2 for a dense NCHW output: vectors of VW pixels along W (VW divides W', so a vector
        never leaves its row and its alignment is known). Per tap row a thread loads its vector and
        the ceil(PAD / VW) vectors on each side (all the same layout: no shuffles, no shared
        memory), splits them into columns in registers and reuses each column for up to d taps.
        Lanes: [BLOCK_C channels, BLOCK_R row vectors, VW]; row vectors flattened over (n, h', w' / VW)."""
        R1: tl.constexpr = RATIO - 1
        DD: tl.constexpr = DW * DW
        PAD: tl.constexpr = DW // 2
        NV: tl.constexpr = (PAD + VW - 1) // VW               # neighbour vectors on each side
        KEPT: tl.constexpr = OUP - M
        M_NEED: tl.constexpr = (KEPT + R1 - 1) // R1
        N_CB: tl.constexpr = (M_NEED + BLOCK_C - 1) // BLOCK_C
        C_FULL: tl.constexpr = M_NEED % BLOCK_C == 0
        dt = out_ptr.dtype.element_ty

        pid = tl.program_id(0)
        cb = pid % N_CB
        grp = pid // N_CB
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < M_NEED
        ss = ()
        bs = ()
        jj = ()
        jok = ()
        cg = ()      # ghost planes, in row vectors
        for t in tl.static_range(R1):
            jt = c * R1 + t
            jt_ok = c_ok & (jt < KEPT)
            st, bt = tc.folded_bn(jt, jt_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, HAS_W, HAS_B)
            ss = ss + (st[:, None],)
            bs = bs + (bt[:, None],)
            jj = jj + (jt,)
            jok = jok + (jt_ok,)
            cg = cg + ((M + jt).to(tl.int64) * HWV,)
        if W_HOIST:
            wts = ()
            for t in tl.static_range(R1):
                wts = wts + (_tap_weights(wd_ptr, c * R1 + t, jok[t], DD),)
        cy = c.to(tl.int64) * HWV                              # intrinsic planes, in row vectors
        e = tl.arange(0, VW)

        blk_begin, blk_end = _run_of_blocks(grp, blocks_per_prog, n_blocks)
        for blk in range(blk_begin, blk_end):
            g = blk * BLOCK_R + tl.arange(0, BLOCK_R)
            g_ok = g < G_TOTAL
            n, q, h, wv = _image_row_col(g, HWV, WV, mg_g, sh_g, mg_v, sh_v)
            rv = n.to(tl.int64) * OUP * HWV + q                 # row-vector index within channel 0
            # validity of the neighbour vectors (column side), shared by the tap rows
            side_ok = ()
            for k in tl.static_range(2 * NV + 1):
                if k == NV:
                    side_ok = side_ok + (g_ok,)
                else:
                    side_ok = side_ok + (g_ok & ((wv + (k - NV)).to(tl.uint32, bitcast=True) < tl.cast(WV, tl.uint32)),)

            accs = ()
            for i in tl.static_range(R1 * VW):
                accs = accs + (tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32),)
            if W_HOIST:
                for dy in tl.static_range(DW):
                    accs = _nchw_row(accs, _hoisted_row(wts, dy, DW, R1), out_ptr, cy, rv, WV, h, HO, side_ok, c_ok, e,
                                     dy, PAD, DW, NV, VW, R1, BLOCK_C, BLOCK_R, C_FULL, dy == PAD)
            else:  # many taps: a runtime loop over the tap rows keeps code size and live weights small
                for dy in range(DW):
                    accs = _nchw_row(accs, _row_weights(wd_ptr, jj, jok, dy, DW, R1), out_ptr, cy, rv, WV, h, HO,
                                     side_ok, c_ok, e, dy, PAD, DW, NV, VW, R1, BLOCK_C, BLOCK_R, C_FULL, False)

            for t in tl.static_range(R1):
                ys = ()
                for r in tl.static_range(VW):
                    ys = ys + (_act(accs[t * VW + r] * ss[t] + bs[t], RELU).to(dt),)
                y = _join_cols(ys, BLOCK_C, BLOCK_R, VW)
                o_ptrs = out_ptr + ((cg[t][:, None] + rv[None, :]) * VW)[:, :, None] + e[None, None, :]
                tl.store(o_ptrs, y, mask=(g_ok[None, :] & jok[t][:, None])[:, :, None])



