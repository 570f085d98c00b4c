"""``triton_two_pass``'s kernels in training (``train_ops.py``, ``train_backward.py``): pass 1 and pass 2
as statistics passes (STATS: BN's batch moments of the raw conv output, nothing written), as writing
passes with BN given as (scale, shift) (``common.AFFINE``), and pass 2 as the backward's GRAD pass (BN2's
backward sums). Design note: ``train_kernels.py``; the kernels: ``two_pass.py``."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.batch_stats import Moments
from ..core.spec import GhostSpec
from . import common as tc
from .two_pass import _batches, _config, _contiguous, _pass1, _pass2


def train_stats1(x: Tensor, out: Tensor, w1: Tensor, spec: GhostSpec, dtype: torch.dtype) -> Moments:
    """BN1's batch moments of z1 = conv(x, w1) (no bias): pass 1 with STATS, nothing written to ``out``
    (whose layout and dtype select the kernel variant that ``train_pass1`` runs next)."""
    cfg = _config(x, out, spec, dtype)
    w1 = _contiguous(w1)
    parts = []
    with tc.device_ctx(x):
        for xs, os_ in _batches(x, out, cfg):
            parts.append(_pass1(xs, os_, w1, _no_bn(w1), spec, dtype, cfg, stats=True))
    return Moments.merge(*(torch.cat(t) for t in zip(*parts)))


def train_pass1(x: Tensor, out: Tensor, w1: Tensor, scale1: Tensor, shift1: Tensor, spec: GhostSpec,
                dtype: torch.dtype) -> None:
    """``out[:, :m] = act(conv(x, w1) * scale1 + shift1)``: pass 1 with BN1 given as per-channel fp32
    (scale, shift)."""
    cfg = _config(x, out, spec, dtype)
    w1 = _contiguous(w1)
    with tc.device_ctx(x):
        for xs, os_ in _batches(x, out, cfg):
            _pass1(xs, os_, w1, _affine(scale1, shift1), spec, dtype, cfg)


def train_stats2(x: Tensor, out: Tensor, wd: Tensor, spec: GhostSpec, dtype: torch.dtype) -> Moments:
    """BN2's batch moments of z2 = dwconv(y1, wd) (no bias) for every ghost channel, the sliced-off
    ones included, from y1 in ``out[:, :m]``: pass 2 with STATS, nothing written."""
    cfg = _config(x, out, spec, dtype)
    wd = _contiguous(wd)
    parts = []
    with tc.device_ctx(x):
        for xs, os_ in _batches(x, out, cfg):
            parts.append(_pass2(os_, wd, _no_bn(wd), spec, dtype, cfg, stats=True))
    return Moments.merge(*(torch.cat(t) for t in zip(*parts)))


def train_pass2(x: Tensor, out: Tensor, wd: Tensor, scale2: Tensor, shift2: Tensor, spec: GhostSpec,
                dtype: torch.dtype) -> None:
    """``out[:, m:oup] = act(dwconv(y1, wd) * scale2 + shift2)`` from y1 in ``out[:, :m]``."""
    if spec.oup == spec.m:
        return
    cfg = _config(x, out, spec, dtype)
    wd = _contiguous(wd)
    with tc.device_ctx(x):
        for _, os_ in _batches(x, out, cfg):
            _pass2(os_, wd, _affine(scale2, shift2), spec, dtype, cfg)


def grad_sums2(x: Tensor, ybuf: Tensor, grad: Tensor, wd: Tensor, scale2: Tensor, shift2: Tensor, mean2: Tensor,
               spec: GhostSpec, dtype: torch.dtype) -> Tensor:
    """BN2's backward sums [2, m (r - 1)]: sum(g_u2) and sum(g_u2 (z2 - mean2)) per ghost channel (0 for
    those sliced off), from y1 in ``ybuf[:, :m]`` (``train_pass1``'s, the forward's bit for bit) and
    dL/dout ``grad``: pass 2's GRAD variant, with u2 = z2 * scale2 + shift2 as ``train_pass2``
    computes it. ``mean2``: BN2's mean of the bias-free z2 (float32)."""
    sums = torch.zeros(2, spec.new, dtype=torch.float32, device=ybuf.device)
    if spec.oup == spec.m or ybuf.numel() == 0:
        return sums
    cfg = _config(x, ybuf, spec, dtype)
    # dL/dout's tile, u2 and the two sums per group ride on the ring's registers: with the forward's
    # tiles, 255 registers and 20-136 bytes of spills at 40->120 @28 and 160->960 @7 (offline, Triton 3.8)
    # and 24 at 24->72 @56 (Triton 3.6); half the channel block, or else half the pixels per group, halves
    # the ring
    cfg = cfg._replace(BLOCK_C=cfg.BLOCK_C // 2) if cfg.BLOCK_C >= 16 else cfg._replace(PIXR=max(1, cfg.PIXR // 2))
    wd = _contiguous(wd)
    n_per = None
    with tc.device_ctx(x):
        for xs, ys in _batches(x, ybuf, cfg):
            n0 = 0 if n_per is None else n_per
            n_per = n0 + ys.shape[0]
            part = _pass2(ys, wd, _affine(scale2, shift2), spec, dtype, cfg, grad=(grad[n0:n_per], mean2))
            sums[:, :spec.oup - spec.m] += part.sum(1)
    return sums


def _affine(scale: Tensor, shift: Tensor):
    """Kernel BN arguments and flags for a given per-channel fp32 (scale, shift)."""
    return (scale, shift, scale, scale, 0.0, scale), tc.AFFINE


def _no_bn(placeholder: Tensor):
    """Kernel BN arguments and flags for the raw conv output (scale 1, shift 0)."""
    p = placeholder
    return (p, p, p, p, 0.0, p), 0
