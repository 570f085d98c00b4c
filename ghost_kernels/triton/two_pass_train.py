"""``triton_two_pass``'s kernels in training (``train_ops.py``, ``train_backward.py``): pass 1 and pass 2
as statistics passes (STATS: BN's batch moments of the raw conv output, nothing written), as writing
passes with BN given as (scale, shift) (``common.AFFINE``), and as the backward's GRAD passes (BN2's
backward sums and input gradient; BN1's backward sums and input gradient). Design note:
``train_kernels.py``; the kernels: ``two_pass.py``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.batch_stats import Moments
from ..core.spec import GhostSpec
from . import common as tc
from .two_pass import _batches, _config, _contiguous, _pass1, _pass2
from .two_pass_config import TwoPassConfig


def _each_batch(x: Tensor, out: Tensor, spec: GhostSpec, dtype: torch.dtype, *more: Tensor,
                cfg: Optional[TwoPassConfig] = None, channels_last: Optional[bool] = None):
    """The launches' common frame: (config, [(x, out, *more) batch slices]) on x's device."""
    cfg = cfg or _config(x, out, spec, dtype, channels_last=channels_last)
    with tc.device_ctx(x):
        yield from ((cfg,) + sl for sl in _batches(x, out, cfg, *more))


def train_stats1(x: Tensor, out: Tensor, w1: Tensor, spec: GhostSpec, dtype: torch.dtype) -> Moments:
    """BN1's batch moments of z1 = conv(x, w1) (no bias): pass 1 with STATS, nothing written to ``out``
    (whose layout and dtype select the kernel variant that ``train_pass1`` runs next)."""
    w1 = _contiguous(w1)
    parts = [_pass1(xs, os_, w1, _no_bn(w1), spec, dtype, cfg, stats=True)
             for cfg, xs, os_ in _each_batch(x, out, spec, dtype)]
    return Moments.merge(*(torch.cat(t) for t in zip(*parts)))


def train_pass1(x: Tensor, out: Tensor, w1: Tensor, scale1: Tensor, shift1: Tensor, spec: GhostSpec,
                dtype: torch.dtype) -> None:
    """``out[:, :m] = act(conv(x, w1) * scale1 + shift1)``: pass 1 with BN1 given as per-channel fp32
    (scale, shift)."""
    w1 = _contiguous(w1)
    for cfg, xs, os_ in _each_batch(x, out, spec, dtype):
        _pass1(xs, os_, w1, _affine(scale1, shift1), spec, dtype, cfg)


def train_stats2(x: Tensor, out: Tensor, wd: Tensor, spec: GhostSpec, dtype: torch.dtype) -> Moments:
    """BN2's batch moments of z2 = dwconv(y1, wd) (no bias) for every ghost channel, the sliced-off
    ones included, from y1 in ``out[:, :m]``: pass 2 with STATS, nothing written."""
    wd = _contiguous(wd)
    parts = [_pass2(os_, wd, _no_bn(wd), spec, dtype, cfg, stats=True)
             for cfg, _, os_ in _each_batch(x, out, spec, dtype)]
    return Moments.merge(*(torch.cat(t) for t in zip(*parts)))


def train_pass2(x: Tensor, out: Tensor, wd: Tensor, scale2: Tensor, shift2: Tensor, spec: GhostSpec,
                dtype: torch.dtype) -> None:
    """``out[:, m:oup] = act(dwconv(y1, wd) * scale2 + shift2)`` from y1 in ``out[:, :m]``."""
    if spec.oup == spec.m:
        return
    wd = _contiguous(wd)
    for cfg, _, os_ in _each_batch(x, out, spec, dtype):
        _pass2(os_, wd, _affine(scale2, shift2), spec, dtype, cfg)


def _grad_config(x: Tensor, ybuf: Tensor, spec: GhostSpec, dtype: torch.dtype, halvings: int = 2) -> TwoPassConfig:
    """Pass 2's tiles for the GRAD variants. dL/dout's tile, u2, the sums (and g_z2's coefficients) ride on
    the ring's registers: with the forward's tiles, 255 registers and 20-136 bytes of spills at 40->120
    @28 and 160->960 @7 (offline, Triton 3.8) and 24 at 24->72 @56 (Triton 3.6); with one halving 8-28
    bytes at 24->72 @56 and 72->40 @28. Each halving halves the channel block, or else the pixels per
    group."""
    cfg = _config(x, ybuf, spec, dtype)
    for _ in range(halvings):
        cfg = cfg._replace(BLOCK_C=cfg.BLOCK_C // 2) if cfg.BLOCK_C >= 16 else cfg._replace(PIXR=max(1, cfg.PIXR // 2))
    return cfg


def grad_sums2(x: Tensor, ybuf: Tensor, grad: Tensor, wd: Tensor, scale2: Tensor, shift2: Tensor, mean2: Tensor,
               spec: GhostSpec, dtype: torch.dtype) -> Tensor:
    """BN2's backward sums [2, m (r - 1)]: sum(g_u2) and sum(g_u2 (z2 - mean2)) per ghost channel (0 for
    those sliced off), from y1 in ``ybuf[:, :m]`` (``train_pass1``'s, the forward's bit for bit) and
    dL/dout ``grad``: pass 2's GRAD variant, with u2 = z2 * scale2 + shift2 as ``train_pass2``
    computes it. ``mean2``: BN2's mean of the bias-free z2 (float32)."""
    sums = torch.zeros(2, spec.new, dtype=torch.float32, device=ybuf.device)
    if spec.oup == spec.m or ybuf.numel() == 0:
        return sums
    wd = _contiguous(wd)
    cfg = _grad_config(x, ybuf, spec, dtype)
    for cfg, _, ys, gs in _each_batch(x, ybuf, spec, dtype, grad, cfg=cfg):
        sums[:, :spec.oup - spec.m] += _pass2(ys, wd, _affine(scale2, shift2), spec, dtype, cfg,
                                              grad=(gs, mean2)).sum(1)
    return sums


def grad_z2(x: Tensor, ybuf: Tensor, grad: Tensor, wd: Tensor, scale2: Tensor, shift2: Tensor, mean2: Tensor,
            coeffs, batch_stats: bool, spec: GhostSpec, dtype: torch.dtype):
    """BN2's input gradient g_z2 = a2 g_u2 + b2 + c2 (z2 - mean2) for the kept ghost channels (``coeffs``
    = (a2, b2, c2) per ghost channel; b2 = c2 = 0 without ``batch_stats``), as ``grad_sums2`` walks it:
    (g_z2, N x (oup - m) x H' x W' in ``dtype`` and ``ybuf``'s memory format; its sum per ghost channel,
    dL/dbias2, float32 [m (r - 1)], 0 for those sliced off)."""
    kept = spec.oup - spec.m
    n, _, ho, wo = ybuf.shape
    gz = torch.empty(n, kept, ho, wo, dtype=dtype, device=ybuf.device,
                     memory_format=torch.channels_last if ybuf.stride(1) == 1 and kept > 1 else torch.contiguous_format)
    sums = torch.zeros(spec.new, dtype=torch.float32, device=ybuf.device)
    if kept == 0 or ybuf.numel() == 0:
        return gz, sums
    wd = _contiguous(wd)
    coef = torch.stack([c[:kept].float() for c in coeffs]).contiguous()
    cfg = _grad_config(x, ybuf, spec, dtype)
    for cfg, _, ys, gs, zs in _each_batch(x, ybuf, spec, dtype, grad, gz, cfg=cfg):
        sums[:kept] += _pass2(ys, wd, _affine(scale2, shift2), spec, dtype, cfg, grad=(gs, mean2),
                              gz=(zs, coef, batch_stats))[0].sum(0)
    return gz, sums


def grad_bn1(x: Tensor, dy1: Tensor, w1: Tensor, scale1: Tensor, shift1: Tensor, mean1: Tensor, spec: GhostSpec,
             dtype: torch.dtype, channels_last: bool, coeffs=None, batch_stats: bool = True) -> Optional[Tensor]:
    """Pass 1's GRAD variants on dL/dy1 (``dy1``, m channels), z1 and u1 recomputed with the forward's
    tiles (``channels_last``: its output's layout), so y1 = act(u1) is the forward's bit for bit. Without
    ``coeffs``: BN1's backward sums [2, m], sum(g_u1) and sum(g_u1 (z1 - mean1)); with ``coeffs`` = (a1,
    b1, c1): ``dy1`` is overwritten with g_z1 = a1 g_u1 + b1 + c1 (z1 - mean1) (b1 = c1 = 0 without
    ``batch_stats``), and None is returned."""
    w1 = _contiguous(w1)
    mode = 1 if coeffs is None else 2 if batch_stats else 3
    coef = mean1.float().reshape(1, -1) if coeffs is None else torch.stack([mean1.float()] + [c.float() for c in coeffs])
    coef = coef.contiguous()
    sums = torch.zeros(2, spec.m, dtype=torch.float32, device=x.device)
    if dy1.numel() == 0:
        return sums if mode == 1 else None
    cfg = _config(x, dy1, spec, dtype, channels_last=channels_last)
    if cfg.BLOCK_P * cfg.BLOCK_N >= 8192:
        # dL/dy1's tile, u1, y1 and g_u1 beside the accumulator: 255 registers and 180-1044 bytes of
        # spills on 4 warps at m >= 120 (offline, Triton 3.8); half the tile (z1 is F2's bit
        # for bit all the same: the K order of every element is the tile's K loop)
        cfg = cfg._replace(BLOCK_P=cfg.BLOCK_P // 2)
        if cfg.BLOCK_P * cfg.BLOCK_N >= 8192:   # 64 x 128: 4-8 bytes of spills at m = 336, 480
            cfg = cfg._replace(BLOCK_N=cfg.BLOCK_N // 2)
    for cfg, xs, ds in _each_batch(x, dy1, spec, dtype, cfg=cfg):
        part = _pass1(xs, ds, w1, _affine(scale1, shift1), spec, dtype, cfg, grad=(coef, mode))
        if mode == 1:
            sums += part.sum(1)
    return sums if mode == 1 else None


def _affine(scale: Tensor, shift: Tensor):
    """Kernel BN arguments and flags for a given per-channel fp32 (scale, shift)."""
    return (scale, shift, scale, scale, 0.0, scale), tc.AFFINE


def _no_bn(placeholder: Tensor):
    """Kernel BN arguments and flags for the raw conv output (scale 1, shift 0)."""
    p = placeholder
    return (p, p, p, p, 0.0, p), 0
