"""``triton_band``: single pass, one program = a band of full-width output rows of one image (or a few
whole small images) x a block of channels; the depthwise stencil by in-register shifts (``tl.gather``);
no scratch memory, no global round trip of y1.

Design note
===========
Math, for BN folded in fp32 inside the kernel (``common.folded_bn``: a conv's bias and BatchNorm, either
absent; ``act`` = ReLU, SiLU, Hardswish or identity, ``common.act``)::

    y1  = act(conv1x1(x, w1, stride) * scale1 + shift1)        # m intrinsic channels
    y2  = act(dwconv(y1, wd * scale2, pad=d//2) + shift2)      # ghost channel j reads y1[j // (r-1)]
    out = cat([y1, y2], 1)[:, :oup]                             # written in place

Tiling (flash-attention style: one tile lives in registers from the GEMM to the last store).
A program owns ``T_ROWS`` rows of ``W_PAD`` lanes each (``W_PAD`` = next power of two >= W' + d//2; a
lane is a pixel, the spare columns hold zeros) of ``IMGS`` images, i.e. ``BLOCK_P = IMGS*T_ROWS*W_PAD``
pixels, and ``BLOCK_M`` intrinsic channels with their ``BLOCK_M*(r-1)`` ghost channels:

1. GEMM, pixel-major: ``acc[BLOCK_P, BLOCK_M] = x[BLOCK_P, Cin] @ w1^T`` with ``tl.dot`` (wgmma, M = 64-1024
   pixels); K loop over Cin (no loop when x fits one <= 64 KiB stage). x arrives by TMA when its channels
   are contiguous (channels_last, 16-byte aligned strides, stride-1 conv): a 4-D box IMGS x T_ROWS x W_PAD
   x BLOCK_K whose out-of-image rows/columns/images/channels come back as zeros -- no per-lane address or
   mask arithmetic; otherwise per-lane pointers with masks (NCHW, other strides, stride 2).
   **K-loop pipeline.** Triton's software pipeliner (``num_stages``) gives the TMA box of x
   ``num_stages - 1`` shared-memory buffers and w1 ``num_stages``: the 4-D box is reshaped for
   ``tl.dot``, so the dot takes x from registers (one ``local_load`` per step) and a buffer is free once
   read, while a tile the dot reads from shared memory (w1; a 2-D box) stays busy until the async wgmma
   retires, hence one buffer more (``x_buffers``; ``shared/repro/tma_buffers.py``; Triton 3.6 and 3.8
   alike). With 2 stages x had ONE buffer: the load of step k+1 could only start after step k had read
   its box, so every K step paid a full DRAM latency -- worst at the 14x14 and 7x7 projections (11-15
   steps, 256-384 programs, 1-2 per SM). The K loop now runs up to ``X_BUFFERS + 1`` = 4 stages: the
   prologue issues boxes 0-2, step k waits for box k, reads it and issues box k + 3, so three boxes
   (96 KiB at 672->112 @14) are in flight per program while it computes; Little's law asks 16-20 KiB per SM at 70% of copy
   bandwidth. ``stages_for`` keeps 2 buffers (3 stages) where three would cost resident programs: the
   4-warp kernels (3-4 programs per SM by registers; 240->80 @14: 320 programs in one round of 3 per
   SM at 2 buffers, two rounds at 3 -- 10.3 against 12.7 us in the offline model's latency term); the
   8-warp 14x14 projections (1 program per SM) take 3. w1 arrives by TMA too (a
   2-D box [BLOCK_M, BLOCK_K] of w1 as m x Cin, transposed in shared memory for the dot): a w1 tile
   of <= 4 bytes per thread (BLOCK_K 16 x BLOCK_M 8 at the 14x14 projections) is no cp.async, so its
   pointer load was a synchronous round trip in every K step. Where the channel block is small
   (BLOCK_M <= 16) BN1's and BN2's folds are loaded before the K loop, so their round trips overlap it
   instead of following it (wide blocks fold after it: their vectors, live across the loop, spilled
   under Triton 3.6). ``lab_configs`` times the old
   2 stages beside the default.
2. Epilogue in fp32: BN1, act, rounded to the output dtype exactly like eager's y1 (``.to(dtype)``),
   stored into ``out[:, :m]`` for the band's own rows.
3. Stencil: y1 (as fp32, lanes outside the image set to 0 -- the depthwise conv zero-pads y1, not x)
   is shifted along the lane axis: neighbour (dy, dx) of lane q is lane ``(q + dy*W_PAD + dx) mod BLOCK_P``,
   one ``tl.gather`` per tap with a compile-time shift. The spare columns (>= d//2) make the row wrap read
   zeros; rows outside the image are zero lanes, and a whole-image tile has >= d//2 spare rows so the
   wrap between images (or around the tile) reads zeros too. BN2's scale multiplies the tap weights in
   fp32 once per program; the accumulator starts at shift2. Ghost channels < oup are stored.

Two regimes, one kernel: **whole image** (T_ROWS >= H' + d//2, TOP = 0; small planes: 7x7 and 14x14
at GhostNet's 224, IMGS packs several images up to ~1024 lanes) -- no halo, no recompute; **bands**
(TOP = d//2 halo rows above and below a band of R = T_ROWS - d rows; 28x28 and up) -- the halo rows' GEMM
and epilogue are recomputed (T_ROWS/R: 8/6 at 112, 16/14 at 56 and 28). The geometry is picked by lane
efficiency = output pixels / lanes computed (halo and spare lanes included): 0.766 for every GhostNet
plane except 112x112 (0.645: 128 lanes per 112-pixel row, 6 of 8 rows kept).

Bytes vs the floor (x read once + out written once): HBM traffic is the floor plus the weights. x is
read from HBM once per band; the halo rows (2/R of x) and the re-reads by the other channel blocks of
the same band (n_mb = ceil(m / BLOCK_M)) come from L2 -- programs are ordered channel block fastest, so
the programs that share an x tile run together. The L2 re-read is n_mb * Cin / (Cin + oup) of the floor:
0.5-2 for most modules; the projections at 7x7/14x14 trade it (BLOCK_M 16-32) against registers.

Instruction budget (the limit, see shared/forward-performance.md: ~0.15-0.25 warp-instructions per HBM
byte for 70% of copy bandwidth). Per (y1, ghost) element pair the floor is ~25 thread-instructions:
9 FFMA + 2-4 SHFL for a 3x3 tap set, ~5 for BN1/act/round/mask, ~3 for the y2 act/round/store, plus
per-channel work (the BN folds, 9 tap weights) amortized over the pixels a thread holds -- hence ~64
tile elements per thread (32 pixels x 2 channels), which costs 170-255 registers. Measured offline
(sm_90 SASS of the real launches, bf16 channels_last, batch 256, default configs, each instruction
weighted by its loop's trip count; x read once + out written once as the floor): 0.11-0.27 warp-
instructions per floor byte for the projections (Cin > oup; 0.11-0.15 at the 14x14 ones), 0.17-0.26 at
112x112, 0.32-0.45 for the expansions at 14-56 (ghost work per byte is highest there), 0.259 for the
32 modules of GhostNet 1.0x together (the v1 halo kernel: 0.6-7.5 per module). Triton 3.6 agrees
within 7.5%; no spills under either.

Why shifts, and how ``tl.gather`` lowers (Triton 3.8, sm_90): the gather gets Triton's "efficient"
warp-local layout (a warp spans the whole pixel axis, BLOCK_P/32 consecutive pixels per thread, channels
across warps), reached from the wgmma layout by one shared-memory conversion. LLVM IR holds the generic
form (BLOCK_P/32 shuffles + selects per element); with a constant shift the selects fold, and ptxas
drops the dead shuffles and, in some configurations, merges the identical ones across taps: 2-3.75 SHFL
per ghost element for a 3x3 stencil (16->16@112, 48->24@56, 112->672@14, 160->960@7 at their defaults),
otherwise 9 (one per tap: 24->72@56, 72->40@28, the 14x14 projections). That merge is ptxas's choice,
not visible in the IR; with 4+ channels per thread it never happened in these tests, hence BLOCK_M <=
2 * num_warps where the stencil dominates. Recomputing y1 per tap instead (design (c)) costs 9x the epilogue
(~5 instructions) per ghost element plus 9x the x loads: ~54 against 12-18 for the shifts, so it is not
used. The alternative without any shuffle (y1 through shared memory, d*d LDS per element) is not
expressible in Triton; ``tl.gather`` outside a warp-local layout lowers to exactly that (store + barrier
+ one LDS per element per tap), which the layout above avoids.

Variants: the channel counts, the tile, d, r, stride and act are constexprs (one compiled variant per
distinct module and dtype/layout: 22 for GhostNet 1.0x in bf16 channels_last); the batch is not
specialized; H', W' and the strides get Triton's own "== 1" / "% 16" specialization, the strides with
their power-of-two factors made explicit (``_aligned_strides``) so that, e.g., a channels_last tensor
with 72 channels still gets 16-byte vectors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from ..core.backend import Request
from ..core.params import GhostParams
from ..core.spec import GhostSpec
from . import common as tc
from .family import INFERENCE_SUPPORT, TritonFamily, prepare_output

triton, tl = tc.triton, tc.tl
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - a Triton without host-side TMA descriptors: the pointer path
    TensorDescriptor = None

MAX_LANES = 1024          # lanes (pixels) of one program's y1 tile, at most
MIN_LANES = 64            # wgmma's M
SMS = 132                 # SMs of an H100/H200 (the program-count floor of default_config)
X_BUFFERS = 3             # x tiles in flight in the K loop (TMA boxes in shared memory), where they fit
SMEM_PER_SM = 227 * 1024  # shared memory of an sm_90 SM that one or more programs can use


class BandConfig(NamedTuple):
    """One program's tile: IMGS images x T_ROWS rows x W_PAD lanes of y1 (TOP halo rows above the band,
    d // 2 below), BLOCK_M intrinsic channels (with their ghost channels), K step BLOCK_K; ``num_stages``
    of the K loop's software pipeline: x (TMA) gets ``num_stages - 1`` shared-memory buffers, w1
    ``num_stages`` (``x_buffers``); 1 when there is no K loop."""

    W_PAD: int
    T_ROWS: int
    TOP: int
    IMGS: int
    BLOCK_M: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

if triton is not None:
    from .band_kernel import _band_kernel


def _pad(spec: GhostSpec) -> int:
    return spec.dw_size // 2


def geometries(spec: GhostSpec, ho: int, wo: int, max_lanes: int = MAX_LANES):
    """Every tile geometry (W_PAD, T_ROWS, TOP, IMGS) that fits ``max_lanes`` lanes, with its lane
    efficiency (output pixels / lanes computed, halo rows included)."""
    p = _pad(spec)
    w_pad = tc.next_pow2(wo + p)              # >= d // 2 spare zero columns: the row-wrap of a shift reads 0
    out = []
    t_whole = tc.next_pow2(ho + p)            # >= d // 2 spare zero rows: the image-wrap reads 0
    if t_whole * w_pad <= max_lanes:
        imgs = 1
        while t_whole * w_pad * imgs < MIN_LANES:
            imgs *= 2
        out.append(((w_pad, t_whole, 0, imgs), ho * wo / (t_whole * w_pad)))
    t = tc.next_pow2(2 * p + 1)
    while t * w_pad <= max_lanes:
        if t * w_pad >= MIN_LANES and t - 2 * p < ho:
            bands = -(-ho // (t - 2 * p))
            out.append(((w_pad, t, p, 1), ho * wo / (bands * t * w_pad)))
        t *= 2
    return out


def _policy(spec: GhostSpec, dtype: torch.dtype, channels_last: bool = True):
    """(BLOCK_M, num_warps, lanes x BLOCK_M) from the shape's balance of bytes and work (design note)."""
    m = spec.m
    pad = lambda bm: -(-m // bm) * bm / m      # noqa: E731  (channel padding of the last block)
    if spec.inp >= 1.5 * spec.oup:      # projection: x is most of the bytes -> wider channel blocks
        # (fewer re-reads of x through L2). 4 warps x 8192 elements sits at 255 registers and spilled
        # 168-304 bytes under Triton 3.6 for the 14x14 projections (not under 3.8): m in (48, 64] gets
        # one 64-channel block on 8 warps (x read once, 178 registers under both), and m <= 48 the
        # smaller block of two that pad alike (m = 40: 8, 155 registers, fewer instructions).
        if 48 < m <= 64:
            bm, nw, elems = 64, 8, 16384
        else:
            bm, nw, elems = (8 if m <= 48 and pad(8) + 0.05 < pad(16) else 16 if m <= 48 else 32), 4, 8192
    elif m <= 8 or pad(8) + 0.05 < pad(16):
        bm, nw, elems = 8, 4, 8192      # 2 channels x 32 pixels per thread
    else:                                # expansion: the stencil dominates -> 2 channels per thread
        bm, nw, elems = 16, 8, 16384
    if dtype == torch.float32:           # fp32 tiles and the CUDA-core dot: half the elements
        elems //= 2
    elems //= spec.ratio - 1             # one accumulator per ghost multiplier
    if not channels_last:                # per-lane pointers and masks for x (no TMA box)
        elems //= 2
    if spec.dw_size > 3:
        elems //= 2
    return bm, nw, elems


def make_config(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype, geometry=None,
                block_m: Optional[int] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                block_k: Optional[int] = None, n: Optional[int] = None, min_programs: int = 0,
                channels_last: bool = True) -> BandConfig:
    """A config for geometry ``(W_PAD, T_ROWS, TOP, IMGS)``; what is not given comes from the policy:
    the most lane-efficient geometry whose tile fits the policy's elements per program (whole images
    packed IMGS to a program up to that), then BLOCK_K for a <= 32 KiB x stage."""
    bm_p, nw_p, elems = _policy(spec, dtype, channels_last)
    if geometry is None:
        cands = geometries(spec, ho, wo)
        if not cands:
            raise ValueError(f"triton_band: no tile geometry for {ho}x{wo} with dw_size {spec.dw_size}")
        bm0 = block_m or bm_p
        lanes_max = max(MIN_LANES, min(MAX_LANES, elems // bm0))
        fits = [c for c in cands if c[0][0] * c[0][1] <= lanes_max] or [min(cands, key=lambda c: c[0][1])]
        geometry = max(fits, key=lambda g: (round(g[1], 3), -g[0][1]))[0]
        if geometry[1] - _pad(spec) >= ho:    # whole images: pack several
            img_lanes = geometry[0] * geometry[1]
            imgs = 1
            while img_lanes * imgs * 2 <= lanes_max:
                imgs *= 2
            geometry = geometry[:3] + (imgs,)
            if n is not None:           # no more images per program than there are, nor too few programs
                while imgs > 1 and (imgs >= 2 * n or -(-n // imgs) * -(-spec.m // bm0) < min_programs):
                    imgs //= 2
                geometry = geometry[:3] + (imgs,)
    w_pad, t_rows, top, imgs = geometry
    lanes = w_pad * t_rows * imgs
    if block_m is None:
        block_m = max(8, min(bm_p, tc.next_pow2(max(1, elems // lanes) + 1) // 2))
    if num_warps is None:
        num_warps = nw_p if lanes * block_m > 2048 else 4
    if block_k is None:   # no K loop if x fits one stage of <= 64 KiB, else stages of <= 32 KiB;
        esize = torch.empty((), dtype=dtype).element_size()     # a TMA box row of <= 128 bytes
        k_all = max(16, tc.next_pow2(spec.inp))
        kmax = 16 if dtype == torch.float32 else max(16, min(128 // esize, tc.next_pow2(32768 // (lanes * esize) + 1) // 2))
        block_k = k_all if k_all * esize <= 128 and lanes * k_all * esize <= 65536 else min(k_all, kmax)
    if num_stages is None:
        esize = torch.empty((), dtype=dtype).element_size()
        num_stages = stages_for(spec, lanes, block_m, block_k, num_warps, esize,
                                tma=channels_last and spec.stride == 1 and TensorDescriptor is not None)
    return BandConfig(w_pad, t_rows, top, imgs, block_m, block_k, num_warps, num_stages)


def x_buffers(num_stages: int, tma: bool) -> int:
    """Shared-memory buffers Triton's software pipeliner gives x for ``num_stages`` (sm_90, Triton 3.6-3.8):
    a TMA box (4-D, reshaped for ``tl.dot`` through registers) gets ``num_stages - 1``, a pointer load
    feeding ``tl.dot`` from shared memory ``num_stages`` (``shared/repro/tma_buffers.py``)."""
    return max(1, num_stages - 1) if tma else num_stages


def stages_for(spec: GhostSpec, lanes: int, block_m: int, block_k: int, num_warps: int, esize: int,
               tma: bool = True) -> int:
    """``num_stages`` of the K loop: 1 without a loop; x by TMA: X_BUFFERS (3) boxes in flight where the
    programs that the registers let share an SM still fit in its shared memory, else 2 (design note,
    "K-loop pipeline"); x by pointers: 2 (two buffers already). Residency is estimated from the tile
    elements per thread (sm_90 SASS, Triton 3.6 and 3.8): about 64 -> 167-191 registers on 4 warps (2-3
    programs per SM), 183-239 on 8 (1); about 32 -> 128-160 registers, 3-4 programs of 4 warps."""
    if spec.inp <= block_k:
        return 1
    if not tma:   # pointer loads feeding tl.dot from shared memory: 2 stages are 2 buffers already
        return 2
    per_thread = lanes * block_m // (32 * num_warps)
    if num_warps <= 4:
        resident = 4 if per_thread <= 32 else 3
    else:
        resident = 2 if per_thread <= 32 else 1
    box, w1 = lanes * block_k * esize, block_k * block_m * esize
    bufs = X_BUFFERS
    while bufs > 2 and resident * (bufs * box + (bufs + 1) * w1 + 1024) > SMEM_PER_SM:
        bufs -= 1
    return bufs + 1


@functools.lru_cache(maxsize=4096)   # a pure function of the shape, called on every launch
def default_config(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype = torch.bfloat16,
                   channels_last: bool = True, n: Optional[int] = None) -> BandConfig:
    """The config ``forward`` uses for a batch of ``n`` (None: 256, the lab's batch). Whole-image tiles
    pack no more images than keep about 2 programs per SM of an H100/H200 busy."""
    return make_config(spec, ho, wo, dtype, n=256 if n is None else n, min_programs=2 * SMS,
                       channels_last=channels_last)


def lab_configs(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype = torch.bfloat16,
                channels_last: bool = True) -> List[BandConfig]:
    """At most 6 configs for the GPU lab to time: the default; with a K loop, the old buffering (2 stages:
    one x box in shared memory, the load of step k+1 issued after step k has read its box) against the
    default's X_BUFFERS; the other warp count (registers and occupancy against instructions); half and
    double BLOCK_M (x re-reads through L2 against registers); half the images per program (more
    programs) or the next most lane-efficient geometry."""
    base = default_config(spec, ho, wo, dtype, channels_last)
    out = [base]
    if base.num_stages > 2:
        out.append(base._replace(num_stages=2))

    def add(cfg):
        elems = cfg.W_PAD * cfg.T_ROWS * cfg.IMGS * cfg.BLOCK_M
        if cfg not in out and len(out) < 6 and elems <= 32 * 64 * cfg.num_warps:  # <= 64 elements per thread
            out.append(cfg)

    add(base._replace(num_warps=4 if base.num_warps == 8 else 8))
    for bm in (base.BLOCK_M * 2, base.BLOCK_M // 2):
        if 8 <= bm <= 128:
            lanes = base.W_PAD * base.T_ROWS * base.IMGS
            add(base._replace(BLOCK_M=bm, num_warps=4 if lanes * bm <= 8192 else 8))
    if base.IMGS > 1:
        add(base._replace(IMGS=base.IMGS // 2))
    for g, _ in sorted(geometries(spec, ho, wo), key=lambda g: -g[1]):
        if g[:3] != (base.W_PAD, base.T_ROWS, base.TOP) and len(out) < 6:
            lanes = g[0] * g[1] * g[3]
            add(make_config(spec, ho, wo, dtype, geometry=g, block_m=base.BLOCK_M, channels_last=channels_last,
                            num_warps=4 if lanes * base.BLOCK_M <= 8192 else 8))
            break
    return out


def use_tma(x: Tensor, spec: GhostSpec, cfg: BandConfig) -> bool:
    """x through a TMA descriptor (N x H x W x C, box IMGS x T_ROWS x W_PAD x BLOCK_K): channels
    contiguous, the other strides and the base 16-byte aligned, a stride-1 conv, a box TMA can hold."""
    if TensorDescriptor is None or spec.stride != 1 or x.stride(1) != 1 or (x.is_cuda and not _HOPPER(x)):
        return False
    es = x.element_size()
    return (x.data_ptr() % 16 == 0 and all(st * es % 16 == 0 for st in (x.stride(0), x.stride(2), x.stride(3)))
            and cfg.BLOCK_K * es <= 128 and max(cfg.IMGS, cfg.T_ROWS, cfg.W_PAD) <= 256)


def use_tma_w1(w1: Tensor, x: Tensor, cfg: BandConfig) -> bool:
    """w1 through a TMA descriptor (m x Cin, box BLOCK_M x BLOCK_K): a contiguous 16-byte aligned w1 whose
    rows are whole 16-byte units, a K step of 16-128 bytes, and a K loop. Pipelined like x: the load of a
    tiny w1 tile by pointers (< 4 bytes per thread) is no cp.async, so each K step would wait for it;
    without a K loop the one tile is loaded once, and a descriptor's barrier costs more than it hides
    (16->48 @112, fp16: 0.251 warp-instructions per byte with it, over the budget)."""
    es = w1.element_size()
    return (w1.shape[1] > cfg.BLOCK_K and TensorDescriptor is not None and not (x.is_cuda and not _HOPPER(x)) and w1.is_contiguous()
            and w1.data_ptr() % 16 == 0 and w1.shape[1] * es % 16 == 0 and 16 <= cfg.BLOCK_K * es <= 128
            and cfg.BLOCK_M <= 256)


def _HOPPER(x: Tensor) -> bool:
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def _x_descriptor(x: Tensor, cfg: BandConfig, spec: GhostSpec):
    xv = x.permute(0, 2, 3, 1)   # N x H x W x C view, C contiguous
    return TensorDescriptor(xv, list(xv.shape), list(xv.stride()), [cfg.IMGS, cfg.T_ROWS, cfg.W_PAD, cfg.BLOCK_K])


def _aligned_strides(t: Tensor):
    """``(strides // 2**a, code)``: each stride divided by its largest power-of-two factor 2**a (a <= 4),
    and the a's packed in octal digits (n, c, h, w) for the kernel to multiply back as constants."""
    out, code = [], 0
    for i, st in enumerate(t.stride()):
        a = 4 if st == 0 else min(4, (st & -st).bit_length() - 1)
        if st >= 2**27:     # the kernel multiplies back in the argument's width: keep >= 2**31 strides 64-bit
            a = 0
        out.append(st >> a)
        code += a << (3 * i)
    return out, code


def n_bands_of(cfg: BandConfig, spec: GhostSpec, ho: int) -> int:
    r_out = cfg.T_ROWS - cfg.TOP - _pad(spec)
    return -(-ho // r_out)


def gate_reasons(req: Request) -> List[str]:
    """What the kernel needs of GhostNetV2's gate: N x oup x GH x GW (GH, GW >= 1), the compute dtype,
    x's device."""
    g = req.gate
    n, oup = req.x.shape[0], req.spec.oup
    if g.dim() != 4 or g.shape[0] != n or g.shape[1] != oup or g.shape[2] < 1 or g.shape[3] < 1:
        return [f"gate of shape {tuple(g.shape)} (expected ({n}, {oup}, GH >= 1, GW >= 1))"]
    if g.dtype != req.compute_dtype or g.device != req.x.device:
        return [f"gate of dtype {g.dtype} on {g.device} (expected {req.compute_dtype} on {req.x.device})"]
    return []


def extra_reasons(req: Request) -> List[str]:
    spec = req.spec
    ho, wo = req.out_hw
    reasons = gate_reasons(req) if req.gate is not None else []
    if reasons:
        return reasons
    if ho == 0 or wo == 0:
        return []
    if not geometries(spec, ho, wo):
        p = _pad(spec)
        return [f"output {ho}x{wo} with dw_size {spec.dw_size}: a band of {tc.next_pow2(2 * p + 1)} rows of "
                f"{tc.next_pow2(wo + p)} lanes exceeds {MAX_LANES} lanes (triton_band keeps whole rows)"]
    return []


def forward(x: Tensor, params: GhostParams, dtype: torch.dtype, out: Optional[Tensor] = None,
            config: Optional[BandConfig] = None, gate: Optional[Tensor] = None) -> Tensor:
    """The family's launcher; ``gate``: GhostNetV2's attention (N x oup x GH x GW, the compute dtype),
    multiplied into the output as it is stored (``reference.apply_gate``)."""
    spec = params.spec
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    out = prepare_output(x, spec, dtype, out)
    if out.numel() == 0:
        return out
    cfg = config or default_config(spec, ho, wo, dtype, x.is_contiguous(memory_format=torch.channels_last), n=n)
    n_bands = n_bands_of(cfg, spec, ho)
    n_mb = -(-spec.m // cfg.BLOCK_M)
    n_groups = -(-n // cfg.IMGS)
    xs, xal = _aligned_strides(x)
    os_, oal = _aligned_strides(out)
    w1, wd = params.w1, params.wd
    bn1, flags1 = tc.bn_args(params.bn1, params.b1, w1)
    bn2, flags2 = tc.bn_args(params.bn2, params.b2, w1)
    x_src = _x_descriptor(x, cfg, spec) if use_tma(x, spec, cfg) else x
    w1_src = (TensorDescriptor(w1.view(w1.shape[0], w1.shape[1]), [w1.shape[0], w1.shape[1]], [w1.shape[1], 1],
                               [cfg.BLOCK_M, cfg.BLOCK_K]) if use_tma_w1(w1, x, cfg) else w1)
    k_steps = -(-spec.inp // cfg.BLOCK_K)
    with (torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()):
        tc.launch(
            _band_kernel, (n_groups * n_bands * n_mb,),
            x_src, out, w1_src, wd, *bn1, *bn2,
            n, ho, wo, n_bands,
            *((gate, *gate.stride(), *gate.shape[2:]) if gate is not None else (out, 0, 0, 0, 0, 1, 1)),
            *xs, *os_,
            w1.stride(0), w1.stride(1), wd.stride(0), wd.stride(2), wd.stride(3),
            loops=(k_steps,) if k_steps > 1 else (),     # a one-step K loop folds away
            C_IN=spec.inp, M=spec.m, OUP=spec.oup, STRIDE=spec.stride, RATIO=spec.ratio, DW=spec.dw_size,
            ACT=tc.act_code(spec.act), BN1=flags1, BN2=flags2,
            W_PAD=cfg.W_PAD, T_ROWS=cfg.T_ROWS, TOP=cfg.TOP, IMGS=cfg.IMGS, BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K,
            XAL=xal, OAL=oal, X_TMA=x_src is not x, W1_TMA=w1_src is not w1, GATE=gate is not None,
            IEEE=dtype == torch.float32, DOT_F32=tc.interpreting() and dtype == torch.bfloat16,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


BACKEND = TritonFamily(
    "triton_band", "single pass, full-width row bands (or whole small images) per program, depthwise stencil by "
    "in-register shifts (tl.gather), no scratch", support=dataclasses.replace(INFERENCE_SUPPORT, gate=True), launcher=forward, extra_reasons=extra_reasons,
    default_config=default_config, lab_configs=lab_configs,
    min_triton=((3, 3), "tl.gather, and tl.dot with 8 output channels"), replayable=True)
