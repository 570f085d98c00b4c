"""Tile configurations of ``triton_two_pass`` (the family and its design note: ``two_pass.py``): the
default per shape, the lab's candidates around it, and their checks."""
import functools
from typing import List, NamedTuple

import torch

from ..core.spec import GhostSpec
from . import common as tc

HALF = (torch.float16, torch.bfloat16)
PASS2_PROGS = 3               # pass 2 (channels_last): programs per SM the grid aims at
PASS2_STAGES = 4              # pass 2 (channels_last): 3 input rows in flight per program (cp.async ring)


class TwoPassConfig(NamedTuple):
    """Tile shapes of the two passes."""

    BLOCK_P: int         # pass 1: pixels per tile (GEMM M)
    BLOCK_N: int         # pass 1: intrinsic channels per tile (GEMM N), power of two >= 16
    BLOCK_K: int         # pass 1: input channels per K step, power of two >= 16
    WARPS1: int
    STAGES1: int
    PROGS1: int          # pass 1: programs per SM (each walks a contiguous run of tiles)
    BLOCK_G: int         # pass 2: pixel groups (units) per program (channels_last; NCHW: row vectors per step)
    PIXR: int            # pass 2: pixels per group (horizontally adjacent, held by one thread)
    BLOCK_C: int         # pass 2: intrinsic channels per program (power of two)
    WARPS2: int
    PROGS2: int          # pass 2: programs per SM the grid aims at (channels_last: sets the bands of rows)
    STAGES2: int = 4     # pass 2 (channels_last): row pipeline depth, STAGES2 - 1 rows in flight (1: none)


def _block_c(m_need: int, vec: int, channels_last: bool) -> int:
    """Pass 2's channel block. channels_last: up to 4 thread vectors (16 bytes each) of channels, the
    largest with the least padding (whole 32-byte sectors per pixel; padded lanes over-read, see
    OVERREAD). NCHW (vectors along W): a few channels."""
    if not channels_last:
        return min(tc.next_pow2(m_need), 4)
    if m_need <= vec:
        return tc.next_pow2(m_need)
    best = None
    for b in (4 * vec, 2 * vec, vec):
        waste = -(-m_need // b) * b - m_need
        if best is None or waste < best[0]:
            best = (waste, b)
    return best[1]


def _pixels_per_group(spec: GhostSpec, wo: int) -> int:
    """PIXR for channels_last: the group width with the fewest instructions per output pixel, from
    (pixel lanes incl. padding of the last group) x (y1 columns loaded and converted per pixel, 2
    instructions + one LDS each, + taps + overhead), among the widths whose accumulator ring (d rows x
    PIXR pixels) stays within 12 pixel tiles (registers)."""
    d, p = spec.dw_size, spec.dw_size // 2
    cost = {r: -(-wo // r) * r * (3 * (r + 2 * p) / r + d * d + 4) for r in (4, 2, 1) if r == 1 or d * r <= 12}
    return min(cost, key=lambda r: (cost[r], -r))


def _block_k(cin: int, cap: int) -> int:
    """Pass 1's K step: the cap (64 for half types, 16 for fp32) from Cin = 128 up; below, the least
    zero padding of Cin (ties: the larger step) with at most 4 steps where a larger step allows it
    (offline sm_90 instruction counts: 16 for Cin 40 and 48, 32 for 24, 72 and 80, 64 for 112, 120)."""
    if cin >= 128:
        return cap
    best = None
    for bk in (16, 32, 64):
        if bk > cap:
            break
        steps = -(-cin // bk)
        key = (steps > 4, steps * bk - cin, -bk)
        if best is None or key < best[0]:
            best = (key, bk)
    return best[1]


@functools.lru_cache(maxsize=4096)   # a pure function of the shape, called on every launch
def default_config(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype = torch.bfloat16,
                   channels_last: bool = True) -> TwoPassConfig:
    half = dtype in HALF
    m = spec.m
    m_need = -(-(spec.oup - m) // (spec.ratio - 1)) if spec.oup > m else 1
    block_p = 128 if half else 64
    block_n = min(max(tc.next_pow2(m), 16), 128 if half else 64)
    block_k = _block_k(spec.inp, 64 if half else 16)   # fp32 (FMA dot): 16, else 128 regs and spills
    if half and 64 < m <= 128 and spec.inp <= 128:
        # a 128 x 128 tile over a short K loop sat at 255 registers (40->240 @28, 80->200 and 80->184
        # @14) and spilled under Triton 3.6; 64 pixels: 168-176 registers, 2-4% more instructions
        block_p = 64
    stages = 3 if half else 2
    if -(-spec.inp // block_k) >= 8:
        # long K loops (Cin >= 480): one step more in flight (the latency term of the offline model:
        # 672->160 @7's pass 1 waited ~0.5 DRAM latency per step with 2 ahead, 7.5 -> 3.8 us with 3)
        stages += 1
    vec = 16 // (2 if half else 4)
    block_c = _block_c(m_need, vec, channels_last)
    if channels_last and (spec.ratio - 1) * spec.dw_size ** 2 > 9:
        # 10-25 hoisted weight vectors (two_pass._launch_pair): 8-byte channel blocks, so that they fit
        # in registers (16 bytes: 200 registers of weights at dw 5, 300-650 bytes spilled)
        block_c = min(block_c, vec // 2)
    warps2 = 4
    if channels_last:
        tpc = max(1, block_c // vec)                    # threads sharing a pixel (16 bytes each)
        if ho * wo <= 256:   # small planes: 2-warp programs, so that the grid still has >= 2 per SM
            warps2 = 2
        block_g = (32 // tpc) * warps2                  # one group of PIXR pixels per thread
        pixr = _pixels_per_group(spec, wo)
    else:
        block_g, pixr = 256, 1                          # vectors along W
        if half:   # pass-1 tiles within one image: no wider than it (64 lanes for 7x7, not 128)
            block_p = max(64, min(block_p, tc.next_pow2(ho * wo)))
        if (ho * wo) % 8:
            # planes without 16-byte alignment: narrow pixel-major stores, one address each. With a
            # 128 x 128 tile ptxas spills (80->200 @14, 160->960 @7): 64 pixels, and 64 channels
            # where there are several channel blocks anyway
            block_p = 64 if block_n >= 128 else block_p
            block_n = min(block_n, 64) if m > block_n else block_n
    return TwoPassConfig(block_p, block_n, block_k, 4, stages, 8, block_g, pixr, block_c, warps2, PASS2_PROGS,
                         PASS2_STAGES)


def lab_configs(spec: GhostSpec, ho: int, wo: int, dtype: torch.dtype = torch.bfloat16,
                channels_last: bool = True) -> List[TwoPassConfig]:
    """A small grid around the default for the GPU lab: pass 1's pixel tile and pipeline depth; pass 2:
    the old buffering (STAGES2 = 1: no row ring, each row loaded in the step that uses it) against the
    default's ring, shorter bands (more programs), and channels_last: the group width, the thread
    vector (registers); NCHW: vectors per thread, channels per program."""
    base = default_config(spec, ho, wo, dtype, channels_last)
    half = dtype in HALF
    out = [base]
    out.append(base._replace(BLOCK_P=64 if base.BLOCK_P == 128 else 128, STAGES1=base.STAGES1 + 1))
    if channels_last:
        out.append(base._replace(STAGES2=1))                                   # no prefetch: the old buffering
        out.append(base._replace(PIXR=2 if base.PIXR != 2 else 4))             # other group width
        if half and base.BLOCK_C >= 8:                                         # 8-byte vectors: half the registers
            out.append(base._replace(BLOCK_C=base.BLOCK_C // 2, BLOCK_G=base.BLOCK_G * (2 if base.BLOCK_C > 8 else 1)))
        out.append(base._replace(PROGS2=2 * base.PROGS2))                      # shorter bands, more programs
    else:
        out.append(base._replace(STAGES2=1))                                   # no prefetch: the old buffering
        out.append(base._replace(BLOCK_G=base.BLOCK_G * 2))                    # 2 vectors per thread
        out.append(base._replace(BLOCK_C=min(base.BLOCK_C * 2, 16), BLOCK_G=128))
        out.append(base._replace(PROGS2=2 * base.PROGS2))                      # shorter bands, more programs
    seen, uniq = set(), []
    for cfg in out:
        if cfg not in seen:
            seen.add(cfg)
            uniq.append(cfg)
    return uniq[:6]


def _check_config(cfg: TwoPassConfig) -> None:
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    if not (pow2(cfg.BLOCK_P) and cfg.BLOCK_P >= 16 and pow2(cfg.BLOCK_N) and cfg.BLOCK_N >= 16
            and pow2(cfg.BLOCK_K) and cfg.BLOCK_K >= 16 and pow2(cfg.BLOCK_G) and pow2(cfg.BLOCK_C) and cfg.PIXR >= 1
            and pow2(cfg.WARPS1) and pow2(cfg.WARPS2) and cfg.PROGS1 >= 1 and cfg.PROGS2 >= 1 and cfg.STAGES2 >= 1):
        raise ValueError(f"triton_two_pass: invalid config {cfg} (blocks: powers of two; dot blocks >= 16)")
