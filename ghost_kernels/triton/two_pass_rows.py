"""Pass 2's rows in training (``two_pass_stencil._dw_kernel``'s STATS and GRAD variants): a complete
output row of z2 reduced into the program's batch moments (STATS), into BN2's backward sums (GRAD 1),
or turned into BN2's input gradient g_z2 and stored (GRAD 2, 3); and the program's reductions stored at
its end. Design note: ``train_kernels.py``."""
from __future__ import annotations

from . import common as tc
from .common import tl, triton

if triton is not None:

    @triton.jit
    def _stats_row(accs, stats, col_ok, first, PAD: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr):
        """STATS: one complete output row's accumulators into the program's running moments, per group
        t a (shift, sum, sum of squares) triple of [BLOCK_G, BV] tiles: the sums are of z2 - shift over
        the lane's valid pixels, the shift is the lane's first value (row h0, pixel 0), so that the
        squares do not cancel however far the mean is from 0."""
        new = ()
        for t in tl.static_range(NG):
            sh = tl.where(first, accs[t * PIXR], stats[3 * t])
            s = stats[3 * t + 1]
            q = stats[3 * t + 2]
            for r in tl.static_range(PIXR):
                v = tl.where(col_ok[PAD + r][:, None], accs[t * PIXR + r] - sh, 0.0)
                s += v
                q += v * v
            new = new + (sh, s, q)
        return new

    @triton.jit
    def _stats_store(stats, col_ok, rows, jj, jok, row_ptr, plane,
                     PAD: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr):
        """STATS: the program's moments per ghost channel ``jj[t]``: the sum over its pixels and their
        squared deviations about the program's mean (Chan's merge of the lanes), at ``row_ptr + j`` and
        ``plane`` elements further."""
        cnt = col_ok[PAD].to(tl.float32)
        for r in tl.static_range(1, PIXR):
            cnt += col_ok[PAD + r].to(tl.float32)
        n_l = (cnt * rows)[:, None]                        # values per lane
        has = n_l > 0
        inv = 1.0 / tl.maximum(n_l, 1.0)
        n_all = tl.maximum(tl.sum(cnt, axis=0) * rows, 1.0)
        for t in tl.static_range(NG):
            sh = stats[3 * t]
            s = stats[3 * t + 1]
            q = stats[3 * t + 2]
            total = tl.sum(tl.where(has, s + n_l * sh, 0.0), axis=0)
            dev = sh + s * inv - (total / n_all)[None, :]
            m2 = tl.sum(tl.where(has, q - s * s * inv + n_l * dev * dev, 0.0), axis=0)
            tl.store(row_ptr + jj[t], total, mask=jok[t])
            tl.store(row_ptr + plane + jj[t], m2, mask=jok[t])

    @triton.jit
    def _g_row(g_row, gcs, col_ok, jok, cc_ok, gcol, PAD: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr,
               PAIRS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
        """GRAD: dL/dy2 of one output row as fp32 [BLOCK_G, BV] tiles, [r * NG + t]; PAIRS: one load of
        the block's interleaved channels (``gcs[0]``) per pixel, split into the even and odd groups. All
        of the row's loads come before any of its stores (the compiler cannot tell g_z2 from dL/dout)."""
        gs = ()
        for r in tl.static_range(PIXR):
            if PAIRS:
                v = tl.load((g_row + r * gcol)[:, None] + gcs[0][None, :],
                            mask=col_ok[PAD + r][:, None] & cc_ok[None, :], other=0.0)
                even, odd = tl.split(tl.reshape(v, [BLOCK_G, BLOCK_C // 2, 2]))
                gs = gs + (even.to(tl.float32), odd.to(tl.float32))
            else:
                for t in tl.static_range(NG):
                    ok = col_ok[PAD + r][:, None] & jok[t][None, :]
                    gs = gs + (tl.load((g_row + r * gcol)[:, None] + gcs[t][None, :], mask=ok,
                                       other=0.0).to(tl.float32),)
        return gs

    @triton.jit
    def _grad_row(accs, sums, g_row, gcs, col_ok, ss, bs, mus, jok, cc_ok, gcol,
                  PAD: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr, ACT: tl.constexpr, PAIRS: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
        """GRAD 1: one complete output row of z2 (``accs``) into the program's BN2 backward sums, per group
        t a (sum of g_u2, sum of g_u2 (z2 - mean2)) pair of [BLOCK_G, BV] tiles; u2 = z2 * scale2 + shift2
        as the forward's writing pass computes it, g_u2 = act'(u2) dL/dy2 (``common.act_grad``)."""
        gs = _g_row(g_row, gcs, col_ok, jok, cc_ok, gcol, PAD, NG, PIXR, PAIRS, BLOCK_G, BLOCK_C)
        new = ()
        for t in tl.static_range(NG):
            s1 = sums[2 * t]
            s2 = sums[2 * t + 1]
            for r in tl.static_range(PIXR):
                ok = col_ok[PAD + r][:, None] & jok[t][None, :]
                z = accs[t * PIXR + r]
                u = z * ss[t][None, :] + bs[t][None, :]
                gu = tl.where(ok, tc.act_grad(gs[r * NG + t], u, tc.act(u, ACT), ACT), 0.0)
                s1 += gu
                s2 += gu * (z - mus[t][None, :])
            new = new + (s1, s2)
        return new

    @triton.jit
    def _gz_row(accs, sums, g_row, gcs, col_ok, ss, bs, mus, coefs, jok, cc_ok, gcol, z_row, zcs, zcol,
                PAD: tl.constexpr, NG: tl.constexpr, PIXR: tl.constexpr, PAIRS: tl.constexpr, ACT: tl.constexpr,
                BATCH: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
        """GRAD 2 (3: BN2 on running statistics, g_z2 = a2 g_u2): one complete output row of z2 into BN2's
        input gradient g_z2 = a2 g_u2 + b2 + c2 (z2 - mean2) (``coefs[t]`` = (a2, b2, c2), from B1's sums
        over the batch), stored at ``z_row`` (channel offsets ``zcs``, pixel stride ``zcol``; PAIRS: the
        two groups interleaved back, one store), and into the program's sum of g_z2 (dL/dbias2)."""
        gs = _g_row(g_row, gcs, col_ok, jok, cc_ok, gcol, PAD, NG, PIXR, PAIRS, BLOCK_G, BLOCK_C)
        s1s = ()
        for t in tl.static_range(NG):
            s1s = s1s + (sums[2 * t],)
        for r in tl.static_range(PIXR):
            gzs = ()
            new = ()
            for t in tl.static_range(NG):
                ok = col_ok[PAD + r][:, None] & jok[t][None, :]
                z = accs[t * PIXR + r]
                u = z * ss[t][None, :] + bs[t][None, :]
                gu = tl.where(ok, tc.act_grad(gs[r * NG + t], u, tc.act(u, ACT), ACT), 0.0)
                ca, cb, cc = coefs[t]
                gz = ca[None, :] * gu
                if BATCH:   # (running statistics: b2 = c2 = 0, and z2 may be NaN: 0 * NaN is NaN)
                    gz += cb[None, :] + cc[None, :] * (z - mus[t][None, :])
                gz = tl.where(ok, gz, 0.0)
                new = new + (s1s[t] + gz,)
                gzs = gzs + (gz,)
                if not PAIRS:
                    tl.store((z_row + r * zcol)[:, None] + zcs[t][None, :], gz.to(z_row.dtype.element_ty), mask=ok)
            if PAIRS:
                v = tl.reshape(tl.join(gzs[0], gzs[1]), [BLOCK_G, BLOCK_C])
                tl.store((z_row + r * zcol)[:, None] + zcs[0][None, :], v.to(z_row.dtype.element_ty),
                         mask=col_ok[PAD + r][:, None] & cc_ok[None, :])
            s1s = new
        out = ()
        for t in tl.static_range(NG):
            out = out + (s1s[t], sums[2 * t + 1])
        return out

    @triton.jit
    def _grad_store(sums, jj, jok, row_ptr, plane, NG: tl.constexpr, TWO: tl.constexpr):
        """GRAD: the program's sums per kept ghost channel ``jj[t]``, at ``row_ptr + j`` and (``TWO``)
        ``plane`` elements further."""
        for t in tl.static_range(NG):
            tl.store(row_ptr + jj[t], tl.sum(sums[2 * t], axis=0), mask=jok[t])
            if TWO:
                tl.store(row_ptr + plane + jj[t], tl.sum(sums[2 * t + 1], axis=0), mask=jok[t])
