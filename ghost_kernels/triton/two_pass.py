"""``triton_two_pass``: the eval-mode Ghost module in two launches -- a pixel-major GEMM that writes
y1 into ``out[:, :m]``, then a depthwise stencil that reads it back and writes ``out[:, m:oup]``.

Design note
===========
Both BatchNorms are folded inside the kernels from the module's own tensors
(``common.folded_bn``: ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``, fp32)::

    pass 1:  y1 = act(x[P, Cin] @ w1^T[Cin, m] * scale1 + shift1)   -> out[:, :m]       (P = N*H'*W')
    pass 2:  y2 = act(dwconv(y1, wd) * scale2 + shift2)               -> out[:, m:oup]
             ghost channel j reads y1 channel j // (r-1); ghosts past oup are never computed

``scale2`` multiplies the fp32 accumulator instead of each weight: the same function as
``dwconv(y1, wd * scale2)`` (and eager's order: conv, then BN), one FMA per output instead of
d*d*(r-1) multiplies per channel and program. ``act`` is ``max.NaN(y, 0)``: one instruction, NaN
propagates as in eager. x, w1 and wd are cast to the compute dtype (or fp32) as they are loaded
(autocast: fp32 x and weights, half compute).

Pass 1 (``_pw_kernel``): a flash-style tile GEMM. M = pixels, so the tile is wgmma-shaped
(``BLOCK_P`` = 128 pixels, 64 for fp32 whose "ieee" dot is FMAs, 64 when the grid would leave SMs
idle); N = m rounded up to a power of two >= 16 and <= 128, so x is read once per pixel tile
whenever m <= 128 (all GhostNet modules but m = 240, 336 and 480, which read their x tile 2-4 times
from L1/L2: a program walks the channel blocks of one pixel tile in turn); K = Cin in ``BLOCK_K`` steps.
C_IN is a constexpr, so the K loop has a static trip count and Triton pipelines its loads (16-byte
cp.async, ``num_stages``); when Cin fits one step, the loop over the program's tiles is the innermost
one and is pipelined instead, and w1 and BN1 stay in registers for the whole program. Tiles are
consecutive pixels of the flattened batch when x and out are both dense channels_last (offset
p * C, no division at stride 1) and consecutive pixels of one image otherwise (NCHW planes stay
contiguous along the tile; their size enters as HWV * VP with VP a constexpr power of two dividing
it, so the compiler can prove the vectors' alignment). The epilogue stores y1 straight into
``out[:, :m]``: any output strides, no cat.

Pass 2, channels_last (``_dw_kernel``): a row walk. Lanes are [units, channels]: a unit is PIXR (4
or 2) horizontally adjacent pixels of one row held by one thread, with a 16-byte vector of channels
(8 half or 4 fp32); units are flattened over (image, column group), so a program's BLOCK_G units
span several images of a small plane or part of a row of a wide one. The program walks a band of
output rows top-down. Step o loads ONE input row, o + d//2: PIXR + d - 1 predicated 16-byte vectors
per thread, each converted once and added into the accumulators of the d output rows it feeds (a
ring of d rows x PIXR pixels in fp32 registers: output rows o .. o + d - 1); row o is then
complete, gets BN2 + act and is stored, and the ring turns. Per output: (PIXR + d - 1) / PIXR vector
loads and conversions (1.5 at PIXR 4; the pixel-tile steps before 2026-12 loaded and converted each
row for each of its d tap rows: 4.5). The band's first d - 1 input rows are loaded before the loop. A
band reloads d - 1 halo rows (L2 hits) and computes d - 1 partial rows past its end, so bands are as
long as the grid allows (``_bands``: the fewest that give PROGS2 programs per SM, >= MIN_ROWS rows
each). bf16 with ratio 2 reads y1 as uint32 channel pairs, so bf16 -> fp32 is one shift (even
channel) or one AND (odd channel); the two halves are interleaved back (tl.join) for a packed
conversion and a 16-byte store. Channel blocks that do not fill their vectors read past M_NEED into
the same pixel's ghost channels (OVERREAD) instead of masking per channel.

Pass 2's pipeline (both layouts): the row loop is ``tl.range(num_stages=STAGES2)``. Triton turns each
row's loads into 16-byte cp.async copies (``LDGSTS.E.BYPASS.128``: L2 -> shared memory, no registers
held) into a ring of STAGES2 - 1 row buffers, issued STAGES2 - 1 steps ahead, and reads a row back
(one LDS.128 per vector, after the step's cp.async wait and a barrier) in the step that uses it.
STAGES2 = 4: three rows in flight per program while a step computes (12 KiB of unique y1 each for a
4-warp program at PIXR 4; 36 KiB of buffers); before, step i+1's loads were issued only after step
i had computed (two dependent round trips per step, at most ~16 KiB in flight per SM, where Little's
law asks 16-20 KiB all the time for 70% of copy bandwidth: review of 2026-12-02). Registers: the
ring (d x PIXR x 8 fp32) and the hoisted weights (9 x 8 fp32) hold most of 168-238 (Triton 3.6 and
3.8): 2 programs of 4 warps or 4-5 of 2 warps per SM; planes of <= 256 pixels run 2-warp programs
so that the grid still has >= 2 per SM. STAGES2 = 1: no ring (the lab times it beside the default).

Pass 2, dense NCHW (``_dw_nchw_kernel``): vectors of VW pixels along W (VW a power of two dividing
W', so a vector never leaves its row); units are (image, row-vector column); the same row walk, ring
and pipeline. Per input row a thread loads its vector and ceil(PAD / VW) vectors on each side -- all
in one register layout, so no shuffles or shared memory -- splits them into columns (tl.split:
register renames) and adds each column into up to d taps of each ring row. cp.async needs vectors
of >= 4 bytes: 7x7 planes (VW = 1) load in the step. Other output strides take ``_dw_kernel`` with
one pixel per group (correct, not fast).
Both: zero padding is the load mask (y1 is padded after BN1 + act, as in eager; rows outside the
image by one unsigned compare per row, columns by one per column and program, shared by the
channels of a vector); y1 is read back as stored, i.e. rounded to the output dtype exactly like
eager's y1; the tap weights live in fp32 registers for the whole program when d*d*(r-1) <= 25
(past 9: 8-byte channel blocks, the ring not pipelined; dw 5 at ratio 2 is Ultralytics' GhostConv),
otherwise (the paper's ablation options only) there is no ring: each output row reloads its d input
rows in a runtime loop with that row's weights (L1 hits; bounded code size and registers).

Coordinates: flattened indices (< 2^30 per launch; the launcher splits larger batches) are split
into (n, h, w) -- pass 2: units into (n, column group) -- by multiply-high + shift with host-computed magic numbers (``_udiv``: 3 instructions
instead of ~8 for a runtime division). Offsets are 64-bit, in-tile indices 32-bit.

Bytes (b per element; floor = x read once + out written once = (Cin + oup) * b per pixel at stride
1): pass 1 reads x and writes m channels, pass 2 reads y1 (m channels) and writes oup - m, so the
total is floor + m * b per pixel: x 1.5 for 16->16 (the 112x112 modules), x 1.07-1.15 for the
high-Cin projections; channels_last pass 2 reads whole 32-byte sectors, so where m * b < 32 (m = 8
at 112x112) the ghost half of the sector comes along.

Instruction budget (memory-bound: <= ~0.2 warp-instructions per floor byte at 70% of an H200's copy
bandwidth). Offline sm_90 model (``bench/offline/``: Triton 3.8, batch 256, SASS loops weighted
by their trip counts), warp-instructions per floor byte, bf16 channels_last: 16->16@112 0.14,
48->24@56 0.13, 240->80@14 0.12, 160->960@7 0.22, 960->160@7 0.07; all 22 shapes <= 0.25
(80->184@14), 0.164 over the 32 modules; no spills (Triton 3.6 too); pass 1 LDGSTS.128 + wgmma + STG.128 (STG.64
where m % 8 != 0), pass 2 LDG.128/STG.128. Pass 1 costs 0.03-0.08, pass 2 about 19
thread-instructions per ghost output at PIXR = 4 (9 FFMA, 4.5 conversions, 1.5 vector loads, zero
fill and masks, epilogue). fp16 is the same (0.155 overall). fp32 pass 1 is an FMA GEMM (up to 1.0
at Cin = 960). NCHW: 0.11-0.37, 0.22 overall; 7x7 planes have no aligned vectors at all (160->960:
0.98, scalar stores and loads).

Compiled variants: C_IN, M, OUP, DW, RATIO, STRIDE, layout modes and tile shapes are constexprs;
strides are specialized by Triton (== 1, % 16), sizes and counts are not. GhostNet 1.0x's 22
distinct shapes at one batch size, dtype and layout compile 38 variants (22 pass 1 + 16 pass 2,
shared by modules with equal (m, oup, act, tiles)); every batch size from 1 to 256 together: 58 (pass 1 switches
to 64-pixel tiles for small grids).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.params import GhostParams
from ..core.spec import GhostSpec
from . import common as tc
from .family import INFERENCE_SUPPORT, TritonFamily, prepare_output
from .two_pass_config import (  # noqa: F401
    HALF,
    TwoPassConfig,
    _check_config,
    default_config,
    lab_configs,
)

triton, tl = tc.triton, tc.tl

MAX_PIXELS = 1 << 30          # flattened pixels per launch (the magic-number division's range)
INTERPRETER_SMS = 2           # "SMs" for the grid size under the interpreter: few programs, several steps each
CAPTURE_SMS = 132             # H100 / H200 SXM, for launches recorded offline (no GPU)
INTERPRETER_TILES = True      # default tiles shaped for the interpreter's cost (_interpreter_tiles)
MIN_ROWS = 4                  # pass 2 (channels_last): output rows per band, at least (where the plane has them)

# Layout modes of x (pass 1) and out (both passes), constexprs of the kernels: any strides; the
# (h, w) plane dense (stride-1 x only); dense channels_last; dense NCHW (stride-1 x only).
GENERIC, FLAT, DENSE_CL, DENSE_NCHW = 0, 1, 2, 3


if triton is not None:
    from .two_pass_gemm import _pw_kernel
    from .two_pass_nchw import _dw_nchw_kernel
    from .two_pass_stencil import _dw_kernel

# --------------------------------------------------------------------------------------------------
# Host side

def _magic(d: int) -> Tuple[int, int]:
    """(magic, shift) with ``p // d == umulhi(4 * p, magic) >> shift`` for ``0 <= p < 2**30``
    (Granlund-Montgomery: magic = ceil(2^(30 + s) / d), s = ceil(log2 d); magic < 2^31)."""
    s = (d - 1).bit_length()
    return ((1 << (30 + s)) + d - 1) // d, s


def _dense(t: Tensor, order) -> bool:
    """``t`` is dense with its dims nested in ``order`` (innermost first); size-1 dims may have any stride."""
    expect = 1
    for d in order:
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def _mode(t: Tensor, stride: int) -> int:
    """The layout mode of x (``stride``: the conv's) or of out (stride 1)."""
    if _dense(t, (1, 3, 2, 0)):
        return DENSE_CL
    if stride == 1 and _dense(t, (3, 2, 1, 0)):
        return DENSE_NCHW
    if stride == 1 and (t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)):
        return FLAT
    return GENERIC


def _pow2_divisor(v: int, cap: int) -> int:
    """The largest power of two <= cap dividing v."""
    d = 1
    while d < cap and v % (2 * d) == 0:
        d *= 2
    return d


def _sms(x: Tensor) -> int:
    if tc.capturing() or not x.is_cuda:
        return CAPTURE_SMS if tc.capturing() else INTERPRETER_SMS
    return torch.cuda.get_device_properties(x.device).multi_processor_count


def _config(x: Tensor, out: Tensor, spec: GhostSpec, dtype: torch.dtype,
            config: Optional[TwoPassConfig] = None, channels_last: Optional[bool] = None) -> TwoPassConfig:
    """The tile configuration of a call: ``config`` as given (checked), else the shape's default, with
    64-pixel tiles in pass 1 where 128 would leave SMs idle. ``channels_last``: the layout of the output
    the tiles are for (default: ``out``'s)."""
    n, _, ho, wo = out.shape
    cl = out.stride(1) == 1 and spec.oup > 1 if channels_last is None else channels_last
    cfg = config or default_config(spec, ho, wo, dtype, cl)
    if config is None and INTERPRETER_TILES and tc.interpreting() and not x.is_cuda and not tc.capturing():
        cfg = _interpreter_tiles(cfg, spec)
    _check_config(cfg)
    if config is None and cfg.BLOCK_P > 64 and n * ho * wo // cfg.BLOCK_P * -(-spec.m // cfg.BLOCK_N) < 2 * _sms(x):
        cfg = cfg._replace(BLOCK_P=64)   # small problems: 64-pixel tiles keep every SM busy (a given config is literal)
    return cfg


def _interpreter_tiles(cfg: TwoPassConfig, spec: GhostSpec) -> TwoPassConfig:
    """Pass 2's default tiles under the interpreter, whose cost is per operation, not per element: one
    pixel per group (a row step's operations grow with PIXR), every channel in one block (up to 64) and
    64 units per program, on a grid of two bands per unit block where the plane has the rows for them.
    The GPU's tiles still run under the interpreter where a config is given (``test_family_two_pass``)
    and with INTERPRETER_TILES off (``test_training``'s GPU-tiles test)."""
    return cfg._replace(PIXR=1, BLOCK_C=min(64, max(cfg.BLOCK_C, tc.next_pow2(spec.m))), BLOCK_G=64, PROGS2=1)


def _batches(x: Tensor, out: Tensor, cfg: TwoPassConfig, *more: Tensor):
    """(x, out, *more) slices of at most MAX_PIXELS flattened pixels of ``out`` each (the magic-number
    division's range; ``more``: tensors of the same batch size, sliced alike): the whole tensors unless
    N * H' * W' >= 2^30."""
    n, _, ho, wo = out.shape
    per_launch = max(1, MAX_PIXELS // (ho * -(-wo // cfg.PIXR) * cfg.PIXR))
    for n0 in range(0, n, per_launch):
        n1 = min(n, n0 + per_launch)
        yield (x, out) + more if (n0, n1) == (0, n) else tuple(t[n0:n1] for t in (x, out) + more)


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def forward(x: Tensor, params: GhostParams, dtype: torch.dtype, out: Optional[Tensor] = None,
            config: Optional[TwoPassConfig] = None) -> Tensor:
    """Eval-mode Ghost module forward in ``dtype`` (the compute and output dtype; x, w1 and wd may be
    wider, as under autocast: they are cast as they are loaded). ``x``: N x inp x H x W, any strides.
    ``out``, if given, receives the result (N x oup x H' x W', ``dtype``, x's device, any strides)."""
    spec = params.spec
    out = prepare_output(x, spec, dtype, out)
    if out.numel() == 0:
        return out
    cfg = _config(x, out, spec, dtype, config)
    w1, wd = _contiguous(params.w1), _contiguous(params.wd)
    with tc.device_ctx(x):
        for xs, os_ in _batches(x, out, cfg):   # one launch pair unless N * H' * W' >= 2^30
            _pass1(xs, os_, w1, tc.bn_args(params.bn1, params.b1, params.w1), spec, dtype, cfg)
            if spec.oup != spec.m:   # oup = 1: no ghost channel survives the slice
                _pass2(os_, wd, tc.bn_args(params.bn2, params.b2, params.w1), spec, dtype, cfg)
    return out


def _pass1(x: Tensor, out: Tensor, w1: Tensor, bn, spec: GhostSpec, dtype: torch.dtype, cfg: TwoPassConfig,
           stats: bool = False, grad: Optional[Tuple[Tensor, int]] = None):
    """Launch pass 1 on (a batch slice of) x and out; ``bn``: ``(kernel args, flags)``. ``stats``: the
    STATS variant, returns (count per pixel tile, sums, M2s) of z1. ``grad`` = (coefficients, GRAD 1-3):
    the backward's variants on dL/dy1 in ``out`` (m channels); GRAD 1 returns the per-tile BN1 backward
    sums [2, tiles, m]."""
    n, _, h, w = x.shape
    _, _, ho, wo = out.shape
    p_total = n * ho * wo
    mg_hw, sh_hw = _magic(ho * wo)
    mg_w, sh_w = _magic(wo)
    sms = _sms(x)
    x_mode, o_mode = _mode(x, spec.stride), _mode(out, 1)
    if spec.kernel_size != 1 and x_mode != DENSE_CL:
        x_mode = GENERIC     # the taps of a k x k conv address x through its strides
    vec = 16 // out.element_size()
    n_cb = -(-spec.m // cfg.BLOCK_N)
    per_image = not (x_mode == DENSE_CL and o_mode == DENSE_CL)
    qb = -(-(ho * wo) // cfg.BLOCK_P)
    n_ptiles = n * qb if per_image else -(-p_total // cfg.BLOCK_P)
    n_tiles = n_ptiles * n_cb
    programs = min(n_tiles, sms * cfg.PROGS1)
    tiles_per_prog = -(-n_tiles // programs)
    programs = -(-n_tiles // tiles_per_prog)
    vpx = _pow2_divisor(h * w, 16 // x.element_size())
    vpo = _pow2_divisor(ho * wo, vec)
    bn_args, flags = bn
    reduce = stats or (grad is not None and grad[1] == 1)
    part = torch.empty(2, n_ptiles, spec.m, dtype=torch.float32, device=x.device) if reduce else w1
    coef, grad_mode = grad if grad is not None else (w1, 0)
    tc.launch(
        _pw_kernel, (programs,),
        x, w1, out, *bn_args, part, coef,
        p_total, h * w, w, ho * wo, wo, qb, h * w // vpx, ho * wo // vpo, mg_hw, sh_hw, mg_w, sh_w,
        *x.stride(), *out.stride(),
        n_tiles, tiles_per_prog, n_ptiles * spec.m,
        loops=(n_tiles / programs,) + ((spec.kernel_size ** 2,) if spec.kernel_size != 1 else ())
        + (-(-spec.inp // cfg.BLOCK_K),),   # tiles per program, (taps,) K steps
        C_IN=spec.inp, M=spec.m, OUP=out.shape[1], KS=spec.kernel_size, STRIDE=spec.stride, ACT=tc.act_code(spec.act),
        STATS=stats, GRAD=grad_mode, BN=flags, X_MODE=x_mode, O_MODE=o_mode, VPX=vpx, VPO=vpo,
        BLOCK_P=cfg.BLOCK_P, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        IEEE=dtype == torch.float32, DOT_F32=tc.interpreting() and dtype == torch.bfloat16,
        num_warps=cfg.WARPS1, num_stages=cfg.STAGES1,
    )
    if grad_mode == 1:
        return part
    if not stats:
        return None
    # valid pixels per tile: the last tile of each image (per_image) or of the batch is partial
    per = ho * wo if per_image else p_total
    count = torch.full((n_ptiles // n if per_image else n_ptiles,), float(cfg.BLOCK_P), dtype=torch.float64,
                       device=x.device)
    count[-1] = per - (count.numel() - 1) * cfg.BLOCK_P
    return (count.repeat(n) if per_image else count), part[0], part[1]


def _pass2(out: Tensor, wd: Tensor, bn, spec: GhostSpec, dtype: torch.dtype, cfg: TwoPassConfig,
           stats: bool = False, grad: Optional[Tuple[Tensor, Tensor]] = None,
           gz: Optional[Tuple[Tensor, Tensor]] = None):
    """Launch pass 2 on (a batch slice of) out; ``bn``: ``(kernel args, flags)``. ``stats``: the STATS
    variant (every ghost channel, channels_last or strided kernel), returns (count per program row,
    sums, M2s) of z2. ``grad`` = (dL/dout slice, BN2's bias-free mean): the GRAD variant, returns the
    per-program BN2 backward sums [2, programs, oup - m]; with ``gz`` = (g_z2 buffer N x (oup - m) x H' x
    W', coefficients [3, oup - m]) also: GRAD 2, g_z2 stored, returns the per-program sums of g_z2 [2,
    programs, oup - m] (plane 1 unwritten)."""
    n, _, ho, wo = out.shape
    sms = _sms(out)
    o_mode = _mode(out, 1)
    vec = 16 // out.element_size()
    r1, d = spec.ratio - 1, spec.dw_size
    kept = spec.m * r1 if stats else spec.oup - spec.m
    reduce = stats or grad is not None
    m_need = -(-kept // r1)
    bn_args, flags = bn
    # Weights hoisted into registers up to 25 vectors (dw 5 at ratio 2: Ultralytics' GhostConv; dw 3 at
    # ratio 3); past 9 with 8-byte channel blocks (default_config) and the row ring not pipelined (no
    # cp.async ring: STAGES = 1), else they spill. Not hoisted, every step loads d*d*(r-1) weight vectors inside the loop and waits on them (offline,
    # batch 16: 32->16 @80 dw 5 91 -> 8 us predicted, 240->80 @14 dw 5 126 -> 7 us) and the pipeliner
    # would ring them too (compile time of minutes at d = 7, ratio 4).
    hoist = r1 * d * d <= 25
    stages2 = cfg.STAGES2 if r1 * d * d <= 9 else 1
    if o_mode == DENSE_NCHW and not reduce:
        vw = _pow2_divisor(wo, vec)                      # vectors along W never cross a row
        wv = wo // vw
        block_c = min(cfg.BLOCK_C, tc.next_pow2(m_need))
        n_cb2 = -(-m_need // block_c)
        u_total = n * wv                                 # units: (image, row-vector column)
        mg_v, sh_v = _magic(wv)
        block_r = max(1, cfg.BLOCK_G // vw)
        n_ub = -(-u_total // block_r)
        n_bands, band_rows = _bands(ho, n_ub * n_cb2, sms, cfg.PROGS2)
        tc.launch(
            _dw_nchw_kernel, (n_ub * n_bands * n_cb2,),
            out, wd, *bn_args,
            u_total, ho, wv, ho * wv, mg_v, sh_v,
            n_bands, band_rows,
            loops=(ho / n_bands,) + (() if hoist else (d,)),
            M=spec.m, OUP=spec.oup, RATIO=spec.ratio, DW=d, ACT=tc.act_code(spec.act), BN=flags,
            BLOCK_C=block_c, BLOCK_R=block_r, VW=vw, W_HOIST=hoist, STAGES=stages2, num_warps=cfg.WARPS2,
        )
        return None
    if o_mode == DENSE_NCHW:
        o_mode = FLAT            # the reductions over an NCHW output: the strided kernel, one pixel per unit
    pixr = cfg.PIXR if o_mode == DENSE_CL else 1
    n_cb2 = -(-m_need // cfg.BLOCK_C)
    wg = -(-wo // pixr)                              # pixel groups per row
    u_total = n * wg                                 # units: (image, group column)
    mg_wg, sh_wg = _magic(wg)
    n_ub = -(-u_total // cfg.BLOCK_G)
    n_bands, band_rows = _bands(ho, n_ub * n_cb2, sms, cfg.PROGS2)
    pairs = (dtype == torch.bfloat16 and spec.ratio == 2 and o_mode == DENSE_CL and spec.oup % 2 == 0
             and cfg.BLOCK_C >= 2 and out.data_ptr() % 4 == 0)
    overread = o_mode == DENSE_CL and n_cb2 * cfg.BLOCK_C <= spec.oup
    part = torch.empty(2, n_ub * n_bands, kept, dtype=torch.float32, device=out.device) if reduce else wd
    g, mu = grad if grad is not None else (out, wd)
    zbuf, coef = gz[:2] if gz is not None else (out, wd)
    tc.launch(
        _dw_kernel, (n_ub * n_bands * n_cb2,),
        out, wd, *bn_args, part, g, mu, coef, zbuf,
        u_total, ho, wo, ho * wo, wg, mg_wg, sh_wg,
        *out.stride(), *g.stride(), *zbuf.stride(),
        n_bands, band_rows, n_ub * n_bands * kept,
        loops=(ho / n_bands,) + (() if hoist else (d,)),   # rows per program (the last band may be shorter); taps
        M=spec.m, OUP=spec.oup, RATIO=spec.ratio, DW=d, ACT=tc.act_code(spec.act),
        BN=flags, O_MODE=o_mode, STATS=stats, GRAD=0 if grad is None else 1 if gz is None else 2 if gz[2] else 3,
        BLOCK_G=cfg.BLOCK_G, BLOCK_C=cfg.BLOCK_C, PIXR=pixr, W_HOIST=hoist,
        PAIRS=pairs, OVERREAD=overread, STAGES=stages2, num_warps=cfg.WARPS2,
    )
    if grad is not None:
        return part
    if not stats:
        return None
    # values per program row: valid pixels of its unit block x rows of its band
    u = torch.arange(n_ub * cfg.BLOCK_G, device=out.device)
    pix = ((wo - (u % wg) * pixr).clamp(max=pixr) * (u < u_total)).reshape(n_ub, cfg.BLOCK_G).sum(1)
    rows = (ho - torch.arange(n_bands, device=out.device) * band_rows).clamp(max=band_rows)
    return (pix[:, None] * rows[None, :]).reshape(-1).double(), part[0], part[1]


def _bands(ho: int, programs_per_band: int, sms: int, progs_per_sm: int):
    """(bands, rows per band) of pass 2 (channels_last): the fewest bands that give the grid
    ``progs_per_sm`` programs per SM, with at least MIN_ROWS rows each (each band reloads d - 1 halo
    rows and computes d - 1 partial rows past its end: fewer, longer bands amortize them)."""
    want = -(-sms * progs_per_sm // max(1, programs_per_band))
    bands = max(1, min(want, ho // MIN_ROWS))
    rows = -(-ho // bands)
    return -(-ho // rows), rows


def extra_hbm_bytes(spec: GhostSpec, n: int, h: int, w: int, elem: int, channels_last: bool) -> int:
    """Pass 2 reads y1 back: m channels per output pixel, in whole 32-byte sectors for channels_last."""
    ho, wo = spec.out_hw(h, w)
    per_pixel = spec.m * elem
    if channels_last:
        per_pixel = -(-per_pixel // 32) * 32
    return n * ho * wo * per_pixel


BACKEND = TritonFamily(
    "triton_two_pass", "two passes: a pixel-major GEMM (BN1 + act) writing out[:, :m], then a depthwise "
    "stencil reading it back into out[:, m:oup]; BN folded in the kernels", support=dataclasses.replace(INFERENCE_SUPPORT, kernel_sizes=(1, 3, 5, 7)), launcher=forward,
    default_config=default_config, lab_configs=lab_configs, extra_hbm_bytes=extra_hbm_bytes, replayable=True)
