"""Fused Ghost-module forward (eval mode) in Triton: one launch, x read once, output written once.

Design note
===========
Computes, for BN folded as in ``fold.py`` (``act`` is ReLU or identity)::

    y1  = act(conv1x1(x, w1, stride) * scale1 + shift1)             # intrinsic channels, fp32 math
    y2  = act(dwconv(y1, wd, pad=d//2) + shift2)                    # ghost channel j reads y1[j // (r-1)]
    out = cat([y1, y2], 1)[:, :oup]                                  # written in place, no cat

Tiling. The output plane of one image is cut into tiles of TH x TW pixels. A program owns one tile and
one block of BLOCK_M intrinsic channels (plus their BLOCK_M * (r-1) ghost channels), and works on the
tile *with its halo*: HALO_H x HALO_W = (TH + 2p) x (TW + 2p) pixels, p = d // 2, flattened into
BLOCK_P = HALO_H * HALO_W lanes (both powers of two, so the lane -> (row, col) split is a shift).

1. Primary conv as a GEMM on the halo tile: ``acc[BLOCK_M, BLOCK_P] = w1[BLOCK_M, Cin] @ x[Cin, BLOCK_P]``
   with ``tl.dot`` (tensor cores for fp16/bf16; exact fp32 "ieee" for fp32), K-loop over Cin.
2. Epilogue: scale, shift, act in fp32. **Halo pixels outside the image are set to 0 after the
   activation**: the depthwise conv zero-pads y1, not x, so the halo must not hold act(shift1).
   The interior pixels of y1 are stored straight into output channels [0, m).
3. The y1 halo tile is stored, rounded to the output dtype exactly like eager PyTorch's y1, to this
   program's private scratch slot, and read back after a CTA barrier at d*d shifted offsets
   (one per tap) for the depthwise conv. Ghost channels are stored into output channels [m, oup);
   those past ``oup`` are never computed.

Where the scratch lives. The grid is persistent: as many programs as fit on the GPU at once
(resident programs per SM, from the compiled kernel's registers and shared memory, times #SMs) loop
over the tiles, and each owns one fixed slot of BLOCK_M * BLOCK_P elements (16 x 256: 8 KiB in
bf16/fp16, 16 KiB in fp32), rewritten for every tile. All slots together are a few MiB (132 SMs x 4
x 8 KiB = 4.2 MiB), well inside the 50 MiB L2 of an H100, and a slot is read back right after it is
written, so the scratch traffic stays in L1/L2 and does not reach HBM as a tensor round trip. Two
barriers per tile order the slot's accesses: write-after-read against the previous tile, and
read-after-write.

Bytes per output pixel (ratio 2, b bytes per element, Cin input and oup = 2m output channels):
the floor is ``(Cin + oup) * b`` -- read x once, write out once (a 1x1 conv with stride s needs only
every s-th row and column of x; GhostNet's Ghost modules all have s = 1). This kernel reads x from HBM
once; the halo rows/cols overlapping the neighbour tile (BLOCK_P / (TH * TW) - 1, 30% for a 16x16
halo of a 3x3 dw) and the re-reads of the x tile by the other channel blocks of the same tile come
from L2, since neighbouring tiles and channel blocks run on the GPU at the same time. y1 and y2 never
exist in HBM, so HBM traffic is the floor plus the weights.

Indexing: image, channel and pixel offsets are 64-bit; within-tile indices are 32-bit.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor

from .fold import FoldedGhost, is_compiling
from .layout import empty_output
from .spec import GhostSpec

try:  # triton is optional: without it the backend reports why it cannot run.
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton, tl = None, None
    TRITON_IMPORT_ERROR = exc

# What this kernel supports; dispatch.py turns these into reasons.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_STRIDES = (1, 2)
SUPPORTED_RATIOS = (2, 3, 4)
SUPPORTED_DW_SIZES = (1, 3, 5, 7)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


class TileConfig(NamedTuple):
    HALO_H: int
    HALO_W: int
    BLOCK_M: int
    BLOCK_K: int
    num_warps: int


def pick_config(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype = torch.bfloat16,
                max_lanes: int = 256, pad: Optional[int] = None) -> TileConfig:
    """Tile shape for an ``ho`` x ``wo`` output: the halo tile covers the image when it is small,
    else 16 x 16 (``max_lanes`` = 256 pixels per program). A square halo tile wastes the fewest lanes
    on the halo (14 x 14 useful of 16 x 16 for a 3x3 cheap op, 77 %, against 70 % for 32 x 8), and
    GhostNet's resolutions (112, 56, 28, 14) are multiples of 14. ``pad``: halo width (default d // 2;
    the backward kernel needs 2 * (d // 2))."""
    pad = spec.dw_size // 2 if pad is None else pad
    halo_w = min(max(_next_pow2(wo + 2 * pad), _next_pow2(2 * pad + 1)), 16)
    halo_h = min(_next_pow2(ho + 2 * pad), max(max_lanes // halo_w, 1))
    halo_h = max(halo_h, _next_pow2(2 * pad + 1), 16 // halo_w if halo_w < 16 else 1)  # tl.dot: N >= 16
    # 16 channels x 256 lanes x 4 warps: ~100-130 registers (ptxas, sm_90), so 4-5 programs per SM
    # stay resident; 32 channels or 512 lanes need ~250 and halve the warps in flight.
    block_m = 16
    block_k = 16 if spec.inp <= 16 or dtype == torch.float32 else 32  # fp32 (FMA dot): 16 avoids ~180 regs
    return TileConfig(halo_h, halo_w, block_m, block_k, 4)


if triton is not None:

    # Pieces shared with the training kernels (triton_train.py): the backward recomputes y1 with the
    # very same code as the forward, so its activation masks match the forward's bit for bit.

    @triton.jit
    def tile_coords(tile, n_mblocks, n_tiles_w, n_tiles_h):
        """(channel block, tile column, tile row, image) of a tile index; channel block fastest, so that
        programs running together share the x tile through L2."""
        mb = tile % n_mblocks
        t = tile // n_mblocks
        tw = t % n_tiles_w
        t = t // n_tiles_w
        th = t % n_tiles_h
        return mb, tw, th, (t // n_tiles_h).to(tl.int64)

    @triton.jit
    def pointwise_conv_tile(x_ptr, w1_ptr, x_pix, pix_ok, c, c_ok, C_IN, sxc,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                            IEEE: tl.constexpr, DOT_F32: tl.constexpr):
        """z1[c, p] = sum_k w1[c, k] x[k, p] in fp32 for BLOCK_M channels and BLOCK_P pixels (64-bit pixel
        offsets ``x_pix``; masked pixels give 0) with tl.dot, K-loop over the input channels."""
        ck = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
        for k0 in range(0, C_IN, BLOCK_K):
            k = k0 + ck
            k_ok = k < C_IN
            xt = tl.load(x_ptr + k.to(tl.int64)[:, None] * sxc + x_pix[None, :],
                         mask=k_ok[:, None] & pix_ok[None, :], other=0.0)
            xt = xt.to(w1_ptr.dtype.element_ty)  # autocast: fp32 x, half weights (a no-op otherwise)
            wt = tl.load(w1_ptr + c[:, None] * C_IN + k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:  # interpreter only: its bf16 tl.dot multiplies raw bits (triton#11584)
                acc = tl.dot(wt.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(wt, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(wt, xt, acc)
        return acc

    @triton.jit
    def bn_act_tile(z, scale_ptr, shift_ptr, c, c_ok, in_img, RELU: tl.constexpr):
        """act(z * scale[c] + shift[c]) in fp32, zero outside the image (the depthwise conv zero-pads y1)."""
        y = z * tl.load(scale_ptr + c, mask=c_ok, other=0.0)[:, None] + tl.load(shift_ptr + c, mask=c_ok, other=0.0)[:, None]
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)    # not max(): NaN must propagate as in eager
        return tl.where(in_img[None, :], y, 0.0)

    # Sizes and counts are not specialized on (==1, %16): every new activation size would otherwise
    # compile a new variant. The channel and column strides are, so that stride 1 is known statically.
    @triton.jit(do_not_specialize=["C_IN", "HO", "WO", "M", "OUP", "sxn", "sxh", "son", "soh",
                                   "n_tiles_h", "n_tiles_w", "n_mblocks", "total_tiles"])
    def _ghost_fwd_kernel(
        x_ptr, out_ptr, w1_ptr, scale1_ptr, shift1_ptr, wd_ptr, shift2_ptr, scratch_ptr, stats_ptr,
        C_IN, HO, WO, M, OUP,
        sxn, sxc, sxh, sxw,
        son, soc, soh, sow,
        n_tiles_h, n_tiles_w, n_mblocks, total_tiles,
        STRIDE: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, RELU: tl.constexpr, RELU2: tl.constexpr,
        STATS: tl.constexpr,
        HALO_H: tl.constexpr, HALO_W: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # RELU2 is the cheap branch's activation (RELU in eval mode). STATS (train mode, see
        # triton_train.py): the cheap branch runs with raw weights, no shift and no activation, its
        # output z2 is stored as is, and each tile also stores, per ghost channel, the sum and the
        # tile-centred sum of squares of z2 over its interior pixels (plus its pixel count), so that
        # BN2's batch statistics follow without another pass and without E[z^2] - E[z]^2 cancellation.
        PAD: tl.constexpr = DW // 2
        TH: tl.constexpr = HALO_H - 2 * PAD
        TW: tl.constexpr = HALO_W - 2 * PAD
        BLOCK_P: tl.constexpr = HALO_H * HALO_W
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)

        q = tl.arange(0, BLOCK_P)                   # lane = pixel of the halo tile
        hh = q // HALO_W
        ww = q % HALO_W
        interior = (hh >= PAD) & (hh < HALO_H - PAD) & (ww >= PAD) & (ww < HALO_W - PAD)
        cm = tl.arange(0, BLOCK_M)
        slot = scratch_ptr + pid.to(tl.int64) * BLOCK_P * BLOCK_M + cm[:, None] * BLOCK_P + q[None, :]

        for tile in range(pid, total_tiles, nprog):
            mb, tw, th, n = tile_coords(tile, n_mblocks, n_tiles_w, n_tiles_h)
            oh = th * TH - PAD + hh                 # output row/col of each lane (halo may be outside)
            ow = tw * TW - PAD + ww
            in_img = (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
            c = mb * BLOCK_M + cm                   # intrinsic channels of this block
            c_ok = c < M

            # 1. primary 1x1 conv on the halo tile
            x_pix = n * sxn + (oh * STRIDE).to(tl.int64) * sxh + (ow * STRIDE).to(tl.int64) * sxw
            acc = pointwise_conv_tile(x_ptr, w1_ptr, x_pix, in_img, c, c_ok, C_IN, sxc,
                                      BLOCK_M, BLOCK_K, BLOCK_P, IEEE, DOT_F32)

            # 2. BN1 + act; zero outside the image (dw padding is on y1); interior -> out[:, :m]
            y1 = bn_act_tile(acc, scale1_ptr, shift1_ptr, c, c_ok, in_img, RELU).to(out_ptr.dtype.element_ty)
            o_pix = n * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
            keep = interior & in_img
            tl.store(out_ptr + c.to(tl.int64)[:, None] * soc + o_pix[None, :], y1,
                     mask=c_ok[:, None] & keep[None, :])

            # 3. y1 halo tile -> private scratch slot; depthwise conv from shifted reads
            tl.debug_barrier()                      # previous tile's reads of the slot are done
            tl.store(slot, y1)
            tl.debug_barrier()                      # this tile's writes are visible to the CTA
            for r in tl.static_range(RATIO - 1):
                j = c * (RATIO - 1) + r             # ghost channel, reads intrinsic channel c
                j_ok = c_ok & (j < OUP - M)         # stored; all m * (r - 1) are computed (BN2 stats)
                acc2 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
                for dy in range(DW):  # runtime loops: unrolling 49 taps x 3 multipliers costs minutes of compile
                    for dx in range(DW):
                        wv = tl.load(wd_ptr + j * (DW * DW) + (dy * DW + dx), mask=c_ok, other=0.0)
                        v = tl.load(slot + ((dy - PAD) * HALO_W + (dx - PAD)), mask=interior[None, :], other=0.0)
                        acc2 += wv[:, None] * v.to(tl.float32)
                if STATS:
                    cnt = tl.sum(keep.to(tl.float32), axis=0)
                    s = tl.sum(tl.where(keep[None, :], acc2, 0.0), axis=1)
                    dev = tl.where(keep[None, :], acc2 - (s / cnt)[:, None], 0.0)
                    srow = stats_ptr + (tl.cast(tile, tl.int64) * (RATIO - 1) + r) * BLOCK_M + cm
                    tl.store(srow, s)
                    tl.store(srow + total_tiles.to(tl.int64) * (RATIO - 1) * BLOCK_M, tl.sum(dev * dev, axis=1))
                    if r == 0:
                        tl.store(stats_ptr + 2 * total_tiles.to(tl.int64) * (RATIO - 1) * BLOCK_M + tile, cnt)
                b2 = tl.load(shift2_ptr + j, mask=c_ok, other=0.0)
                y2 = acc2 + b2[:, None]
                if RELU2:
                    y2 = tl.where(y2 < 0.0, 0.0, y2)
                tl.store(out_ptr + (M + j).to(tl.int64)[:, None] * soc + o_pix[None, :],
                         y2.to(out_ptr.dtype.element_ty), mask=j_ok[:, None] & keep[None, :])


INTERPRETER_PROGRAMS = 3  # few programs, so the interpreter also runs several tiles per program
# Resident programs per SM for each compiled variant, learned from its first launch (which runs
# one program per SM). A persistent grid larger than what fits would serialize whole programs.
_RESIDENT: Dict[tuple, int] = {}


def _resident_programs(compiled, device_index: int, num_warps: int) -> int:
    """How many programs of ``compiled`` fit on one SM at once (registers, shared memory, warps)."""
    try:
        compiled._init_handles()
        regs, smem = compiled.n_regs, compiled.metadata.shared
    except Exception:  # a Triton without these internals: a safe middle
        return 2
    props = torch.cuda.get_device_properties(device_index)
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    warps_sm = getattr(props, "max_threads_per_multi_processor", 2048) // 32
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated in units of 256 registers per warp
    fit = min(regs_sm // max(regs_per_warp * num_warps, 1), warps_sm // num_warps,
              smem_sm // (smem + 1024) if smem else 32)
    return max(1, min(fit, 8))


# Triton decides interpreter or compiler when @triton.jit runs, i.e. when this module is imported:
# read the variable then, not on every launch.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when this module's Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


def ghost_forward_triton(x: Tensor, folded: FoldedGhost, spec: GhostSpec, out: Optional[Tensor] = None) -> Tensor:
    """Launch the fused kernel. ``x``: N x inp x H x W, any strides; legality is checked by dispatch.py.

    The output dtype is ``folded.w1``'s (the compute dtype): under autocast, an fp32 ``x`` is cast
    to it as it is loaded. ``out``, if given, receives the result (N x oup x H' x W', that dtype, x's
    device, any strides); the tests pass a NaN-filled ``out`` so that unwritten elements show.

    Equivalent PyTorch (eval mode; see ``reference.ghost_reference``)::

        y1 = act(F.conv2d(x, w1[:, :, None, None], stride=s) * scale1[:, None, None] + shift1[:, None, None])
        y2 = act(F.conv2d(y1, wd.view(-1, 1, d, d), padding=d // 2, groups=m) + shift2[:, None, None])
        out = torch.cat([y1, y2], 1)[:, :oup]
    """
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    dtype = folded.w1.dtype
    if out is None:
        out = empty_output(x, spec.oup, spec.stride, dtype)
    elif out.shape != (n, spec.oup, ho, wo) or out.dtype != dtype or out.device != x.device:
        raise ValueError(f"out must be a {dtype} tensor of shape {(n, spec.oup, ho, wo)} on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.numel() == 0:
        return out
    launch_forward(x, out, folded, spec, relu2=spec.act == "relu")
    return out


def tile_grid(spec: GhostSpec, n: int, ho: int, wo: int, cfg: TileConfig, pad: int):
    """(tiles along H, tiles along W, channel blocks, total tiles) for halo tiles with ``pad`` rows/cols
    of halo on each side."""
    th, tw = cfg.HALO_H - 2 * pad, cfg.HALO_W - 2 * pad
    n_th, n_tw = triton.cdiv(ho, th), triton.cdiv(wo, tw)
    n_mb = triton.cdiv(spec.m, cfg.BLOCK_M)
    return n_th, n_tw, n_mb, n * n_th * n_tw * n_mb


def persistent_programs(variant: tuple, x: Tensor, total: int) -> int:
    """Programs of a persistent grid: what fits on the GPU at once (learned from the first launch)."""
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(total, _RESIDENT.get(variant, 1) * sms))
    return max(1, min(total, INTERPRETER_PROGRAMS))


def remember_occupancy(variant: tuple, compiled, x: Tensor, num_warps: int) -> None:
    if x.is_cuda and variant not in _RESIDENT:
        _RESIDENT[variant] = _resident_programs(compiled, x.device.index, num_warps)


def launch_forward(x: Tensor, out: Tensor, folded: FoldedGhost, spec: GhostSpec, relu2: bool,
                   stats: bool = False) -> Optional[Tensor]:
    """Launch ``_ghost_fwd_kernel`` into ``out``. With ``stats`` (train mode) return the per-tile
    statistics of the cheap branch, a float32 tensor of ``2 * T * (r - 1) * BLOCK_M + T`` elements
    for T tiles (sums, centred sums of squares, pixel counts), decoded by ``triton_train``."""
    n, _, ho, wo = out.shape
    dtype = out.dtype
    cfg = pick_config(spec, ho, wo, dtype)
    n_th, n_tw, n_mb, total = tile_grid(spec, n, ho, wo, cfg, spec.dw_size // 2)
    variant = ("fwd", x.device.index, x.dtype, dtype, spec.stride, spec.ratio, spec.dw_size, spec.act, relu2,
               stats, cfg)
    programs = persistent_programs(variant, x, total)
    scratch = torch.empty(programs * cfg.BLOCK_M * cfg.HALO_H * cfg.HALO_W, dtype=dtype, device=x.device)
    stats_buf = (torch.empty(total * (2 * (spec.ratio - 1) * cfg.BLOCK_M + 1), dtype=torch.float32,
                             device=x.device) if stats else scratch)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        compiled = _ghost_fwd_kernel[(programs,)](
            x, out, folded.w1, folded.scale1, folded.shift1, folded.wd, folded.shift2, scratch, stats_buf,
            spec.inp, ho, wo, spec.m, spec.oup,
            *x.stride(), *out.stride(),
            n_th, n_tw, n_mb, total,
            STRIDE=spec.stride, RATIO=spec.ratio, DW=spec.dw_size, RELU=spec.act == "relu", RELU2=relu2,
            STATS=stats,
            HALO_H=cfg.HALO_H, HALO_W=cfg.HALO_W, BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K,
            IEEE=dtype == torch.float32, DOT_F32=interpreting() and dtype == torch.bfloat16,
            num_warps=cfg.num_warps,
        )
    remember_occupancy(variant, compiled, x, cfg.num_warps)
    return stats_buf if stats else None


# The launcher as a torch.library op: torch.compile and torch.export see one opaque op (shape and
# memory format from the fake implementation) instead of tracing into the Triton launch.
@torch.library.custom_op("ghost_kernels::triton_forward_folded", mutates_args=())
def triton_forward_op(x: Tensor, w1: Tensor, scale1: Tensor, shift1: Tensor, wd: Tensor, shift2: Tensor,
                      oup: int, stride: int, ratio: int, dw_size: int, relu: bool) -> Tensor:
    spec = GhostSpec(x.shape[1], oup, 1, ratio, dw_size, stride, "relu" if relu else "none")
    return ghost_forward_triton(x, FoldedGhost(w1, scale1, shift1, wd, shift2), spec)


@triton_forward_op.register_fake
def _(x, w1, scale1, shift1, wd, shift2, oup, stride, ratio, dw_size, relu):
    return empty_output(x, oup, stride, w1.dtype)


def run_triton(x: Tensor, folded: FoldedGhost, spec: GhostSpec) -> Tensor:
    """dispatch.py's entry: the op under torch.compile, the launcher directly in eager mode (no op
    dispatch overhead on the hot path)."""
    if is_compiling():
        return triton_forward_op(x, *folded, spec.oup, spec.stride, spec.ratio, spec.dw_size, spec.act == "relu")
    return ghost_forward_triton(x, folded, spec)
