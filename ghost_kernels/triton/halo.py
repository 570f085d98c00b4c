"""``triton_halo``: the v1 single-pass Triton kernel (halo tiles, y1 through a per-program scratch slot).

One launch, x read once, output written once.

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

from typing import Optional

import torch
from torch import Tensor

from ..core.fold import FoldedGhost, fold_ghost
from ..core.params import GhostParams
from ..core.spec import GhostSpec
from . import common as tc
from .common import tl, triton
from .family import INFERENCE_SUPPORT, TritonFamily, prepare_output

if triton is not None:

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
            acc = tc.dot_acc(wt, xt, acc, IEEE, DOT_F32)
        return acc

    @triton.jit
    def bn_act_tile(z, scale_ptr, shift_ptr, c, c_ok, in_img, ACT: tl.constexpr):
        """act(z * scale[c] + shift[c]) in fp32 (``act``: code ACT; a bool: ReLU or none), zero outside the
        image (the depthwise conv zero-pads y1)."""
        y = z * tl.load(scale_ptr + c, mask=c_ok, other=0.0)[:, None] + tl.load(shift_ptr + c, mask=c_ok, other=0.0)[:, None]
        y = tc.act(y, ACT)
        return tl.where(in_img[None, :], y, 0.0)

    @triton.jit(do_not_specialize=["C_IN", "HO", "WO", "M", "OUP", "sxn", "sxh", "son", "soh",
                                   "n_tiles_h", "n_tiles_w", "n_mblocks", "total_tiles"])
    def _ghost_fwd_kernel(
        x_ptr, out_ptr, w1_ptr, scale1_ptr, shift1_ptr, wd_ptr, shift2_ptr, scratch_ptr,
        C_IN, HO, WO, M, OUP,
        sxn, sxc, sxh, sxw,
        son, soc, soh, sow,
        n_tiles_h, n_tiles_w, n_mblocks, total_tiles,
        STRIDE: tl.constexpr, RATIO: tl.constexpr, DW: tl.constexpr, ACT: tl.constexpr,
        HALO_H: tl.constexpr, HALO_W: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
    ):
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
            y1 = bn_act_tile(acc, scale1_ptr, shift1_ptr, c, c_ok, in_img, ACT).to(out_ptr.dtype.element_ty)
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
                j_ok = c_ok & (j < OUP - M)         # ghost channels that survive the slice
                acc2 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
                for dy in range(DW):  # runtime loops: unrolling 49 taps x 3 multipliers costs minutes of compile
                    for dx in range(DW):
                        wv = tl.load(wd_ptr + j * (DW * DW) + (dy * DW + dx), mask=c_ok, other=0.0)
                        v = tl.load(slot + ((dy - PAD) * HALO_W + (dx - PAD)), mask=interior[None, :], other=0.0)
                        acc2 += wv[:, None] * v.to(tl.float32)
                b2 = tl.load(shift2_ptr + j, mask=c_ok, other=0.0)
                y2 = acc2 + b2[:, None]
                y2 = tc.act(y2, ACT)
                tl.store(out_ptr + (M + j).to(tl.int64)[:, None] * soc + o_pix[None, :],
                         y2.to(out_ptr.dtype.element_ty), mask=j_ok[:, None] & keep[None, :])


def forward(x: Tensor, params: GhostParams, dtype: torch.dtype, out: Optional[Tensor] = None, config=None) -> Tensor:
    """The family's launcher (``family.py`` contract): BN folded here, on every call (this kernel
    takes folded parameters; the newer families fold inside the kernel)."""
    return forward_folded(x, fold_ghost(params, dtype), params.spec, out=out)


def forward_folded(x: Tensor, folded: FoldedGhost, spec: GhostSpec, out: Optional[Tensor] = None) -> Tensor:
    """Launch the fused kernel on folded parameters. ``x``: N x inp x H x W, any strides.

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
    out = prepare_output(x, spec, dtype, out)
    if out.numel() == 0:
        return out
    launch_forward(x, out, folded, spec)
    return out


def launch_forward(x: Tensor, out: Tensor, folded: FoldedGhost, spec: GhostSpec) -> None:
    """Launch ``_ghost_fwd_kernel`` into ``out``."""
    n, _, ho, wo = out.shape
    dtype = out.dtype
    cfg = tc.pick_config(spec, ho, wo, dtype)
    n_th, n_tw, n_mb, total = tc.tile_grid(spec, n, ho, wo, cfg, spec.dw_size // 2)
    variant = ("fwd", x.device.index, x.dtype, dtype, spec.stride, spec.ratio, spec.dw_size, spec.act, cfg)
    programs = tc.persistent_programs(variant, x, total)
    scratch = torch.empty(programs * cfg.BLOCK_M * cfg.HALO_H * cfg.HALO_W, dtype=dtype, device=x.device)
    taps = float(spec.dw_size)
    with tc.device_ctx(x):
        compiled = tc.launch(
            _ghost_fwd_kernel, (programs,),
            x, out, folded.w1, folded.scale1, folded.shift1, folded.wd, folded.shift2, scratch,
            spec.inp, ho, wo, spec.m, spec.oup,
            *x.stride(), *out.stride(),
            n_th, n_tw, n_mb, total,
            # the tile loop, the K loop, and a dy/dx loop pair per ghost multiplier (static_range copies)
            loops=(total / programs, triton.cdiv(spec.inp, cfg.BLOCK_K)) + (taps, taps) * (spec.ratio - 1),
            STRIDE=spec.stride, RATIO=spec.ratio, DW=spec.dw_size, ACT=tc.act_code(spec.act),
            HALO_H=cfg.HALO_H, HALO_W=cfg.HALO_W, BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K,
            IEEE=dtype == torch.float32, DOT_F32=tc.interpreting() and dtype == torch.bfloat16,
            num_warps=cfg.num_warps,
        )
    tc.remember_occupancy(variant, compiled, x, cfg.num_warps)


BACKEND = TritonFamily(
    "triton_halo", "v1 single pass: 16x16 halo tiles, y1 through a per-program scratch slot in L2", support=INFERENCE_SUPPORT, launcher=forward)
