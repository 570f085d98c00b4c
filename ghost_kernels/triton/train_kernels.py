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
here: a k x k primary conv (the 1x1 GEMM tiles of F1/F2/B4/B5) and a conv without a BatchNorm (a deployed
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
GhostNet's bottleneck adds the shortcut into it in place. y1, z1 and z2 are recomputed (from x, and
from B0's y1) with the forward's kernels and tiles, so every activation decision is the forward's bit
for bit. (The first design's B1 recomputed u2 from z2 rounded to the output dtype, as its F3 did; with
F4's fp32 z2 that mismatch flipped ReLU's mask at ~0.5% of the elements of a ratio-4 bf16 module and
put dL/dx at 3e-2 against eager's 5e-3: caught by test_gradients_option_sweep.)

Backward: six launches of three kernels -- ``triton_two_pass``'s GEMM and stencil (GRAD variants) and
the transposed stencil here -- then cuBLAS. g = dL/dout; BN's backward is dL/dz = a g_u + b + c (z -
mean) with a = gamma/std and, with batch statistics, b = -a sum(g_u)/P, c = -a/var sum(g_u (z -
mean))/P: two sums over the batch before any input gradient exists, hence the passes in pairs.

  B0  ``_pw_kernel`` (``two_pass_train.train_pass1``): y1 into a scratch tensor shaped like out, with
      F2's kernel, scale and shift (``out`` itself may have been modified in place since).
  B1  ``_dw_kernel`` GRAD 1 (``grad_sums2``): the row walk over B0's y1 recomputes z2 and u2 = z2 scale2
      + shift2 as F4 did (same code, same tap order); g_u2 = act'(u2) g[:, m:] (``common.act_grad``,
      eager's derivative and conventions: ReLU zero where y <= 0, NaN passes; Hardswish 0 at u <= -3,
      1 at u >= 3); per program and kept ghost channel sum(g_u2) and sum(g_u2 (z2 - mean2)): dgamma2,
      dbeta2 and BN2's coefficients. Half the forward's channel block (the sums ride on the ring).
  B2  ``_dw_kernel`` GRAD 2 (``grad_z2``): the same walk again, now storing g_z2 = a2 g_u2 + b2 + c2 (z2 -
      mean2) (compute dtype, N x (oup - m) x H' x W') and summing it per program (dL/dbias2).
  B3  ``_dw_bwd_kernel`` (below; ``train_backward._depthwise_grads``): dL/dy1 = g[:, :m] + dwconv^T(g_z2),
      the transposed stencil (a window of d g_z2 rows per output row), written in the compute dtype;
      dL/dwd = sum_p y1(p + tap) g_z2(p) as per-lane sums in registers where d*d*(r-1) <= 9 (GhostNet's
      3x3 at ratio 2), else by torch (the depthwise conv's weight gradient, as eager computes it).
  B4  ``_pw_kernel`` GRAD 1 (``grad_bn1``): z1 recomputed from x with F2's tiles, u1, y1 = act(u1) (ReLU
      decides on it, bit for bit the forward's), g_u1 = act'(u1) dL/dy1; per tile sum(g_u1) and sum(g_u1
      (z1 - mean1)): dgamma1, dbeta1 and BN1's coefficients. Nothing written.
  B5  ``_pw_kernel`` GRAD 2 (3 on running statistics): the same tile again, g_z1 = a1 g_u1 + b1 + c1 (z1
      - mean1) written over dL/dy1 in place (each tile reads its own pixels before writing them).
  B6  two GEMMs (cuBLAS): dL/dx = g_z1 w1, dL/dw1 = g_z1^T x (stride 2: x sampled, dL/dx zero between);
      with a conv bias, dL/dbias1 = sum_p g_z1(p) (torch). With batch statistics both bias gradients are
      0 up to rounding, as eager's: the mean absorbs a bias.
  Bytes per pixel (ratio 2, k = oup - m kept ghost channels, e the element size): B0 Cin + m, B1 m + k,
  B2 m + 2k, B3 k + 3m, B4 Cin + m, B5 Cin + 2m, B6 3m + 2Cin, against the floor oup + 2 Cin: z1 is
  recomputed twice from x and every intermediate map is written once and read back (NOTES.md,
  "The backward on the two-pass kernels"). The first design (one halo kernel recomputing z1 -> y1 -> z2
  on overlapping tiles, 9 cross-thread reductions a tile for dL/dwd) moved fewer bytes but was
  latency-bound at 214-255 registers: 46 of a 51 ms predicted step. No per-element atomics anywhere:
  every reduction is a per-program partial summed by torch, so the backward is deterministic whatever
  ``torch.are_deterministic_algorithms_enabled()`` says.

SyncBatchNorm: with a process group, the statistics (count, mean, M2) of both BNs are all-gathered
between F1 and F2 and between F3 and F4, and the backward sums all-reduced between B1 and B2 and between
B4 and B5: the same communication as ``nn.SyncBatchNorm``, on statistics the kernels compute anyway.
"""
from __future__ import annotations

from .common import tl, triton

if triton is not None:
    from .two_pass_gemm import _band_program, _tap_weights, _udiv

    @triton.jit
    def _load_cols(ptr, pix, r, sh, cs, sw, HO_U, col_ok, c_ok, PAD: tl.constexpr, NCOL: tl.constexpr):
        """The NCOL columns (pixel stride ``sw``, first at -PAD) of row ``r`` (rows outside the image: 0) of
        channels ``cs`` (element offsets), fp32 [units, channels] tiles."""
        r = tl.cast(r, tl.int32)                           # (the interpreter's loop index is a Python int)
        r_ok = r.to(tl.uint32, bitcast=True) < HO_U
        r_ptr = ptr + (pix + r.to(tl.int64) * sh)
        out = ()
        for k in tl.static_range(NCOL):
            ok = (r_ok & col_ok[k])[:, None] & c_ok[None, :]
            out = out + (tl.load(r_ptr[:, None] + ((k - PAD) * sw + cs)[None, :], mask=ok, other=0.0).to(tl.float32),)
        return out

    @triton.jit(do_not_specialize=["U_TOTAL", "HO", "WO", "WG", "mg_wg", "sh_wg", "n_bands", "band_rows"])
    def _dw_bwd_kernel(
        gz_ptr, y_ptr, g_ptr, dy_ptr, wd_ptr, part_ptr,
        U_TOTAL, HO, WO, WG, mg_wg, sh_wg,
        szn, szc, szh, szw, syn, syc, syh, syw, sgn, sgc, sgh, sgw, sdn, sdc, sdh, sdw,
        n_bands, band_rows,
        M: tl.constexpr, OUP: tl.constexpr, KEPT: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr,
        WGRAD: tl.constexpr, DENSE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, PIXR: tl.constexpr, STAGES: tl.constexpr,
    ):
        """B3, the depthwise conv's backward: ``dL/dy1[p, c] = g1[p, c] + sum_{t, tap} wd[j, tap] g_z2[p -
        tap, j]`` over the kept ghost channels j = c (r-1) + t < KEPT that read y1 channel c (the transposed
        stencil), g1 = dL/dout[:, :M]; WGRAD: also the depthwise weights' gradient ``dL/dwd[j, tap] =
        sum_p y1[p, c] g_z2[p - tap, j]``, per lane in registers, one row per (unit block, band) at
        ``part[unit block * n_bands + band, j, tap]``.

        A program = (channel block of y1, band of ``band_rows`` rows, block of BLOCK_G units); a unit is
        PIXR horizontally adjacent pixels of one image, as in pass 2 (``two_pass_stencil._dw_kernel``).
        Per output row: g1 and (WGRAD) y1 of the unit's pixels, then per tap row dy the PIXR + d - 1
        columns of g_z2 row ``o + d//2 - dy`` (loaded once per row and tap row: a window, each g_z2
        element read d times, from L1), each feeding up to d taps of every pixel. Every tensor through
        its own strides (``sz*`` g_z2, ``sy*`` y1, ``sg*`` dL/dout, ``sd*`` dL/dy1), or (DENSE: all four dense
        channels_last) through their channel counts as constexprs, so that the vectors' alignment is
        provable (runtime strides gave 2-byte loads and a memory wait per load); weights hoisted
        (WGRAD: d*d*(r-1) <= 9 vectors) or loaded per tap row. The row loop is software-pipelined
        (``tl.range(num_stages=STAGES)``: the next rows' loads in flight as cp.async copies, as in pass 2)."""
        R1: tl.constexpr = RATIO - 1
        DD: tl.constexpr = DW * DW
        PAD: tl.constexpr = DW // 2
        NCOL: tl.constexpr = PIXR + 2 * PAD
        N_CB: tl.constexpr = (M + BLOCK_C - 1) // BLOCK_C
        if DENSE:
            zc: tl.constexpr = 1
            yc_: tl.constexpr = 1
            gc_: tl.constexpr = 1
            dc_: tl.constexpr = 1
            zw: tl.constexpr = KEPT
            yw: tl.constexpr = OUP
            gw: tl.constexpr = OUP
            dw: tl.constexpr = M
            plane = tl.cast(HO, tl.int64) * WO
            zh = tl.cast(WO, tl.int64) * KEPT
            yh = tl.cast(WO, tl.int64) * OUP
            gh = yh
            dh = tl.cast(WO, tl.int64) * M
            zn = plane * KEPT
            yn = plane * OUP
            gn = yn
            dn = plane * M
        else:
            zc, yc_, gc_, dc_ = szc, syc, sgc, sdc
            zw, yw, gw, dw = szw, syw, sgw, sdw
            zh, yh, gh, dh = szh, syh, sgh, sdh
            zn, yn, gn, dn = szn, syn, sgn, sdn
        cb, band, ub = _band_program(N_CB, n_bands)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < M
        jj = ()
        jok = ()
        zcs = ()
        wts = ()
        for t in tl.static_range(R1):
            jt = c * R1 + t
            jt_ok = c_ok & (jt < KEPT)
            jj = jj + (jt,)
            jok = jok + (jt_ok,)
            zcs = zcs + (jt.to(tl.int64) * zc,)
            if WGRAD:
                wts = wts + (_tap_weights(wd_ptr, jt, jt_ok, DD),)
        u = ub * BLOCK_G + tl.arange(0, BLOCK_G)
        u_ok = u < U_TOTAL
        n = _udiv(u, mg_wg, sh_wg)
        w0 = (u - n * WG) * PIXR
        n64 = n.to(tl.int64)
        w64 = w0.to(tl.int64)
        z_pix = n64 * zn + w64 * zw
        y_pix = n64 * yn + w64 * yw
        g_pix = n64 * gn + w64 * gw
        d_pix = n64 * dn + w64 * dw
        yc = c.to(tl.int64) * yc_
        gc = c.to(tl.int64) * gc_
        dc = c.to(tl.int64) * dc_
        HO_U = tl.cast(HO, tl.uint32)
        WO_U = tl.cast(WO, tl.uint32)
        col_ok = ()
        for k in tl.static_range(NCOL):
            col_ok = col_ok + (u_ok & ((w0 + (k - PAD)).to(tl.uint32, bitcast=True) < WO_U),)
        dwd = ()
        if WGRAD:
            for i in tl.static_range(R1 * DD):
                dwd = dwd + (tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32),)
        h0 = band * band_rows
        h1 = tl.minimum(h0 + band_rows, HO)
        for o in tl.range(h0, h1, num_stages=STAGES):
            o64 = tl.cast(o, tl.int64)
            acc = ()
            ys = ()
            for r in tl.static_range(PIXR):
                ok = col_ok[PAD + r][:, None] & c_ok[None, :]
                acc = acc + (tl.load(g_ptr + (g_pix + o64 * gh + r * gw)[:, None] + gc[None, :], mask=ok,
                                     other=0.0).to(tl.float32),)
                if WGRAD:
                    ys = ys + (tl.load(y_ptr + (y_pix + o64 * yh + r * yw)[:, None] + yc[None, :], mask=ok,
                                       other=0.0).to(tl.float32),)
            if WGRAD:
                for dy in tl.static_range(DW):
                    acc, dwd = _bwd_tap_row(acc, dwd, ys, wts, gz_ptr, z_pix, o + PAD - dy, zh, zcs, zw, HO_U,
                                            col_ok, jok, dy, PAD, DW, R1, PIXR, NCOL, True)
            else:
                for dy in range(DW):
                    w_row = ()
                    for t in tl.static_range(R1):
                        ws = ()
                        for dx in tl.static_range(DW):
                            ws = ws + (tl.load(wd_ptr + jj[t] * DD + (dy * DW + dx), mask=jok[t],
                                               other=0.0).to(tl.float32),)
                        w_row = w_row + (ws,)
                    acc, dwd = _bwd_tap_row(acc, dwd, ys, w_row, gz_ptr, z_pix, o + PAD - dy, zh, zcs, zw,
                                            HO_U, col_ok, jok, 0, PAD, DW, R1, PIXR, NCOL, False)
            for r in tl.static_range(PIXR):
                tl.store(dy_ptr + (d_pix + o64 * dh + r * dw)[:, None] + dc[None, :],
                         acc[r].to(dy_ptr.dtype.element_ty), mask=col_ok[PAD + r][:, None] & c_ok[None, :])
        if WGRAD:
            row = part_ptr + (ub * n_bands + band).to(tl.int64) * (KEPT * DD)
            for t in tl.static_range(R1):
                for tap in tl.static_range(DD):
                    tl.store(row + jj[t] * DD + tap, tl.sum(dwd[t * DD + tap], axis=0), mask=jok[t])

    @triton.jit
    def _bwd_tap_row(acc, dwd, ys, ws, gz_ptr, z_pix, p, szh, zcs, szw, HO_U, col_ok, jok, dy: tl.constexpr,
                     PAD: tl.constexpr, DW: tl.constexpr, R1: tl.constexpr, PIXR: tl.constexpr, NCOL: tl.constexpr,
                     WGRAD: tl.constexpr):
        """Tap row ``dy`` of every pixel's transposed stencil: g_z2 row ``p`` (= o + d//2 - dy), column k
        feeds pixel r through tap dx = r + 2 PAD - k. ``ws[t]``: the hoisted weights (WGRAD: all d*d, tap
        row dy) or this tap row's d (runtime dy)."""
        for t in tl.static_range(R1):
            cols = _load_cols(gz_ptr, z_pix, p, szh, zcs[t], szw, HO_U, col_ok, jok[t], PAD, NCOL)
            new = ()
            for r in tl.static_range(PIXR):
                a = acc[r]
                for dx in tl.static_range(DW):
                    if WGRAD:
                        a += ws[t][dy * DW + dx][None, :] * cols[r + 2 * PAD - dx]
                    else:
                        a += ws[t][dx][None, :] * cols[r + 2 * PAD - dx]
                new = new + (a,)
            acc = new
            if WGRAD:   # taps (t, dy, dx) of this tap row take y1 x column r + 2 PAD - dx
                upd = ()
                for tt in tl.static_range(R1):
                    for ty in tl.static_range(DW):
                        for dx in tl.static_range(DW):
                            v = dwd[(tt * DW + ty) * DW + dx]
                            if tt == t:
                                if ty == dy:
                                    for r in tl.static_range(PIXR):
                                        v += ys[r] * cols[r + 2 * PAD - dx]
                            upd = upd + (v,)
                dwd = upd
        return acc, dwd
