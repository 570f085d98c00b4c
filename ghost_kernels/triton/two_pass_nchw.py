"""``triton_two_pass``'s pass 2 for dense NCHW outputs (vectors along W, split into columns in
registers). Design note: the top of ``triton_two_pass.py``."""
from __future__ import annotations

from . import common as tc
from .common import tl, triton

if triton is not None:
    from .two_pass_gemm import _act, _band_program, _tap_weights, _udiv
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
    def _nchw_load_row(out_ptr, base, r, WV, HO_U, side_ok, c_ok, e,
                       NV: tl.constexpr, VW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                       C_FULL: tl.constexpr):
        """The 2 NV + 1 vectors of row ``r`` (a scalar; rows outside the image read 0) around each
        lane's own, split into columns in fp32 (column NV * VW + i is the lane's pixel i)."""
        r = tl.cast(r, tl.int32)                           # (the interpreter's loop index is a Python int)
        r_ok = r.to(tl.uint32, bitcast=True) < HO_U
        row = base + r.to(tl.int64) * WV                   # [C, R] row-vector indices of row r
        cols = ()
        for k in tl.static_range(2 * NV + 1):
            mask = (r_ok & side_ok[k])[None, :, None]
            if not C_FULL:
                mask = mask & c_ok[:, None, None]
            v = tl.load(out_ptr + ((row + (k - NV)) * VW)[:, :, None] + e[None, None, :], mask=mask, other=0)
            cols = cols + _split_cols(v.to(tl.float32), BLOCK_C, BLOCK_R, VW)   # unused columns: dead code
        return cols

    @triton.jit
    def _nchw_row_taps(accs, cols, wrow, PAD: tl.constexpr, DW: tl.constexpr, NV: tl.constexpr,
                       VW: tl.constexpr, R1: tl.constexpr):
        """``accs`` (R1 x VW [BLOCK_C, BLOCK_R] tiles at [t * VW + i]) plus one tap row (weights ``wrow``) of
        the input columns ``cols``: output column i, tap dx reads column NV * VW + i + dx - PAD."""
        new = ()
        for t in tl.static_range(R1):
            for i in tl.static_range(VW):
                a = accs[t * VW + i]
                for dx in tl.static_range(DW):
                    a += cols[NV * VW + i + dx - PAD] * wrow[t][dx][:, None]
                new = new + (a,)
        return new

    @triton.jit
    def _nchw_ring_taps(ring, cols, wts, J_END: tl.constexpr, DY_J: tl.constexpr,
                        PAD: tl.constexpr, DW: tl.constexpr, NV: tl.constexpr, VW: tl.constexpr, R1: tl.constexpr):
        """Add one input row into the ring entries j < J_END (output row o + j, tap row DY_J - j, hoisted
        weights); entry j holds R1 x VW tiles at [j * R1 * VW + t * VW + i]."""
        new = ()
        for j in tl.static_range(DW):
            entry = ()
            for i in tl.static_range(R1 * VW):
                entry = entry + (ring[j * R1 * VW + i],)
            if j < J_END:
                entry = _nchw_row_taps(entry, cols, _hoisted_row(wts, DY_J - j, DW, R1), PAD, DW, NV, VW, R1)
            for i in tl.static_range(R1 * VW):
                new = new + (entry[i],)
        return new

    @triton.jit
    def _nchw_store_row(accs, orow, cg, ss, bs, jok, u_ok, e, out_ptr, R1: tl.constexpr, VW: tl.constexpr,
                        ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        """BN2 + act of one output row's accumulators (the first R1 * VW tiles of ``accs``), stored."""
        dt = out_ptr.dtype.element_ty
        for t in tl.static_range(R1):
            ys = ()
            for i in tl.static_range(VW):
                ys = ys + (_act(accs[t * VW + i] * ss[t] + bs[t], ACT).to(dt),)
            y = _join_cols(ys, BLOCK_C, BLOCK_R, VW)
            o_ptrs = out_ptr + ((cg[t][:, None] + orow[None, :]) * VW)[:, :, None] + e[None, None, :]
            tl.store(o_ptrs, y, mask=(u_ok[None, :] & jok[t][:, None])[:, :, None])

    @triton.jit(do_not_specialize=["U_TOTAL", "HO", "WV", "HWV", "mg_v", "sh_v", "n_bands", "band_rows"])
    def _dw_nchw_kernel(
        out_ptr, wd_ptr, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr,
        U_TOTAL, HO, WV, HWV, mg_v, sh_v,
        n_bands, band_rows,
        M: tl.constexpr, OUP: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, ACT: tl.constexpr,
        BN: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, VW: tl.constexpr, W_HOIST: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Pass 2 for a dense NCHW output: vectors of VW pixels along W (VW divides W', so a vector
        never leaves its row and its alignment is known). A program = (channel block, band of
        ``band_rows`` output rows, BLOCK_R units); a unit is one row-vector column (image n, vector wv),
        units flattened over (n, wv). Lanes: [BLOCK_C channels, BLOCK_R units, VW].

        The program walks its band top-down like ``_dw_kernel``: step o loads input row o + d//2 -- per
        lane its vector and ceil(PAD / VW) vectors on each side, all in one register layout (no
        shuffles, no shared memory), split into columns in registers -- adds each column into the
        accumulators of the d output rows it feeds (a ring), stores the completed row o, and turns the
        ring; the band's first d - 1 input rows are loaded before the loop; the loop is
        software-pipelined (``tl.range(num_stages=STAGES)``: cp.async into STAGES - 1 row buffers of
        shared memory, where the vectors are >= 4 bytes). With many taps (not W_HOIST) each output row
        reloads its d input rows instead (a window, no ring)."""
        R1: tl.constexpr = RATIO - 1
        DD: tl.constexpr = DW * DW
        PAD: tl.constexpr = DW // 2
        NV: tl.constexpr = (PAD + VW - 1) // VW               # neighbour vectors on each side
        KEPT: tl.constexpr = OUP - M
        M_NEED: tl.constexpr = (KEPT + R1 - 1) // R1
        N_CB: tl.constexpr = (M_NEED + BLOCK_C - 1) // BLOCK_C
        C_FULL: tl.constexpr = M_NEED % BLOCK_C == 0
        ENTRY: tl.constexpr = R1 * VW

        cb, band, ub = _band_program(N_CB, n_bands)
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
            st, bt = tc.folded_bn(jt, jt_ok, g2_ptr, b2_ptr, m2_ptr, v2_ptr, eps2, cb2_ptr, BN)
            ss = ss + (st[:, None],)
            bs = bs + (bt[:, None],)
            jj = jj + (jt,)
            jok = jok + (jt_ok,)
            cg = cg + ((M + jt).to(tl.int64) * HWV,)
        wts = ()
        if W_HOIST:
            for t in tl.static_range(R1):
                wts = wts + (_tap_weights(wd_ptr, c * R1 + t, jok[t], DD),)
        cy = c.to(tl.int64) * HWV                              # intrinsic planes, in row vectors
        e = tl.arange(0, VW)

        u = ub * BLOCK_R + tl.arange(0, BLOCK_R)
        u_ok = u < U_TOTAL
        n = _udiv(u, mg_v, sh_v)
        wv = u - n * WV
        rv0 = n.to(tl.int64) * OUP * HWV + wv                  # row-vector index of (n, row 0, wv) in channel 0
        base = cy[:, None] + rv0[None, :]
        # validity of the neighbour vectors (column side), shared by every row
        side_ok = ()
        for k in tl.static_range(2 * NV + 1):
            if k == NV:
                side_ok = side_ok + (u_ok,)
            else:
                side_ok = side_ok + (u_ok & ((wv + (k - NV)).to(tl.uint32, bitcast=True) < tl.cast(WV, tl.uint32)),)
        HO_U = tl.cast(HO, tl.uint32)

        h0 = band * band_rows
        h1 = tl.minimum(h0 + band_rows, HO)
        if W_HOIST:   # the ring (see _dw_kernel)
            ring = ()
            for i in tl.static_range(DW * ENTRY):
                ring = ring + (tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32),)
            for i in tl.static_range(2 * PAD):     # the band's first d - 1 input rows
                cols = _nchw_load_row(out_ptr, base, h0 + (i - PAD), WV, HO_U, side_ok, c_ok, e, NV, VW, BLOCK_C,
                                      BLOCK_R, C_FULL)
                ring = _nchw_ring_taps(ring, cols, wts, i + 1, i, PAD, DW, NV, VW, R1)
            for o in tl.range(h0, h1, num_stages=STAGES):
                cols = _nchw_load_row(out_ptr, base, o + PAD, WV, HO_U, side_ok, c_ok, e, NV, VW, BLOCK_C, BLOCK_R,
                                      C_FULL)
                ring = _nchw_ring_taps(ring, cols, wts, DW, 2 * PAD, PAD, DW, NV, VW, R1)
                _nchw_store_row(ring, rv0 + tl.cast(o, tl.int64) * WV, cg, ss, bs, jok, u_ok, e, out_ptr, R1, VW, ACT,
                                BLOCK_C, BLOCK_R)
                turned = ()
                for i in tl.static_range(ENTRY, DW * ENTRY):
                    turned = turned + (ring[i],)
                for i in tl.static_range(ENTRY):
                    turned = turned + (tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32),)
                ring = turned
        else:         # many taps: a window of d input rows per output row, in a runtime loop (see _dw_kernel)
            for o in tl.range(h0, h1, num_stages=STAGES):
                accs = ()
                for i in tl.static_range(ENTRY):
                    accs = accs + (tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32),)
                for dy in range(DW):
                    cols = _nchw_load_row(out_ptr, base, o + dy - PAD, WV, HO_U, side_ok, c_ok, e, NV, VW, BLOCK_C,
                                          BLOCK_R, C_FULL)
                    accs = _nchw_row_taps(accs, cols, _row_weights(wd_ptr, jj, jok, dy, DW, R1), PAD, DW, NV, VW, R1)
                _nchw_store_row(accs, rv0 + tl.cast(o, tl.int64) * WV, cg, ss, bs, jok, u_ok, e, out_ptr, R1, VW, ACT,
                                BLOCK_C, BLOCK_R)
