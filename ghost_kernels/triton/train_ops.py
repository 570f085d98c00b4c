"""Training of the Ghost module with the Triton kernels (``train_kernels.py``, ``halo.py``):
the train-mode forward's launches, and the torch.library ops ``ghost_kernels::triton_train_forward``
and ``triton_train_backward`` (register_fake, register_autograd) that torch.compile, torch.export and
opcheck see. The design (passes, bytes, statistics) is the note at the top of ``train_kernels.py``.

What the ops take (``TRAINING_SUPPORT`` in ``backend.py``): a 1x1 primary conv with stride 1 or 2,
ratio 2-4, dw_size 1/3/5/7, any activation of ``spec.ACTIVATIONS`` (``act``: "relu", "silu",
"hardswish", "none", for both stages), each conv with or without a bias (``b1``, ``b2``: None without)
and followed by a BatchNorm. Optional BN affine parameters (affine=False) are None in the ops; running
statistics given means "eval-mode BN", None means batch statistics; ``sync_group`` is a
``batch_stats.register_group`` index (-1: no synchronization). The backward op returns the gradients
of x, w1, b1, bn1 weight/bias, wd, b2, bn2 weight/bias, an empty tensor for each absent one.
"""

# No ``from __future__ import annotations`` here: torch 2.6's custom_op evaluates string annotations
# in its own namespace, which has no ``Tuple`` (the op's schema is inferred from them).
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.batch_stats import Moments, update_running_stats
from ..core.fold import FoldedGhost
from ..core.layout import empty_output, output_memory_format
from ..core.params import GhostParams, bn_has_running_stats
from ..core.spec import GhostSpec
from . import common as tc
from . import halo as triton_halo
from .common import triton
from .train_backward import bn_affine, centred, train_backward

if triton is not None:
    from .train_kernels import _affine_act_kernel, _pw_stats_kernel


def pw_moments(x: Tensor, w1: Tensor, spec: GhostSpec) -> Moments:
    """F1: the batch moments of z1 = conv1x1(x, w1) per channel, without writing z1."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    total = n * ho * wo
    block_p, block_m = 128, 32 if spec.m > 16 else 16
    # 16 input channels a K step: with 32, the [32, 128] tile of 64-bit x offsets and the pipelined copies
    # took 255 registers and spilled 228-340 bytes from 48 input channels up (offline sm_90, Triton 3.8,
    # 2026-12-03); with 16: 168-221 registers, no spill, half the predicted time (GhostNet's 72->40 @28:
    # 92 -> 39 us at batch 256)
    block_k = 16
    n_pb = triton.cdiv(total, block_p)
    part = torch.empty(2, n_pb, spec.m, dtype=torch.float32, device=x.device)
    with tc.device_ctx(x):
        tc.launch(
            _pw_stats_kernel, (n_pb, triton.cdiv(spec.m, block_m)),
            x, w1, part, spec.inp, ho, wo, spec.m, total, *x.stride(), n_pb,
            loops=(triton.cdiv(spec.inp, block_k),),
            STRIDE=spec.stride, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_P=block_p,
            IEEE=w1.dtype == torch.float32, DOT_F32=tc.interpreting() and w1.dtype == torch.bfloat16,
            num_warps=4)
    count = torch.full((n_pb,), float(block_p), dtype=torch.float64, device=x.device)
    count[-1] = total - (n_pb - 1) * block_p
    return Moments.merge(count, part[0], part[1])


def train_forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], bn1_weight: Optional[Tensor],
                  bn1_bias: Optional[Tensor], wd: Tensor, b2: Optional[Tensor], bn2_weight: Optional[Tensor],
                  bn2_bias: Optional[Tensor], stats1: Optional[Tuple[Tensor, Tensor]],
                  stats2: Optional[Tuple[Tensor, Tensor]], eps1: float, eps2: float, spec: GhostSpec,
                  sync_group: Optional[int] = None):
    """The forward of both BNs' modes. ``stats1``/``stats2`` = (running_mean, running_var) for eval-mode
    BN, None for batch statistics (train mode); ``b1``/``b2``: the convs' biases or None. Returns out
    and, per BN, (mean, invstd, unbiased var) float32: the mean of BN's input, conv bias included (what
    running_mean tracks); the unbiased variance is for the running statistics (NaN-free zeros in eval
    mode). The kernels compute the convs without their biases and centre them with ``mean - bias``
    (``train_backward.centred``): in train mode the batch mean absorbs the bias."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    out = empty_output(x, spec.oup, spec.stride, w1.dtype)
    w1m = w1.reshape(spec.m, spec.inp).contiguous()
    wdm = wd.reshape(spec.new, spec.dw_size ** 2).float().contiguous()
    if stats1 is None:
        mean1, var1u, var1 = pw_moments(x, w1m, spec).finish(sync_group)
        invstd1 = torch.rsqrt(var1 + eps1).float()
        if b1 is not None:
            mean1 = mean1 + b1.float()
    else:
        mean1, invstd1 = stats1[0].float().clone(), torch.rsqrt(stats1[1].float() + eps1)  # outputs never alias inputs
        var1u = torch.zeros_like(mean1)
    scale1, shift1 = bn_affine(centred(mean1, b1), invstd1, bn1_weight, bn1_bias)

    if stats2 is not None:  # eval-mode BN2: the single-pass inference kernel with BN2 folded
        mean2, invstd2 = stats2[0].float().clone(), torch.rsqrt(stats2[1].float() + eps2)
        scale2, shift2 = bn_affine(centred(mean2, b2), invstd2, bn2_weight, bn2_bias)
        folded = FoldedGhost(w1m, scale1, shift1, (wdm * scale2[:, None]).contiguous(), shift2)
        if out.numel():
            triton_halo.launch_forward(x, out, folded, spec, act2=spec.act)
        return out, mean1, invstd1, var1u, mean2, invstd2, torch.zeros_like(mean2)

    zero = torch.zeros(spec.new, dtype=torch.float32, device=x.device)
    folded = FoldedGhost(w1m, scale1, shift1, wdm, zero)
    moments = triton_halo.launch_forward(x, out, folded, spec, act2="none", stats=True)
    mean2, var2u, var2 = moments.finish(sync_group)
    invstd2 = torch.rsqrt(var2 + eps2).float()
    if b2 is not None:
        mean2 = mean2 + b2.float()
    scale2, shift2 = bn_affine(centred(mean2, b2), invstd2, bn2_weight, bn2_bias)
    kept = spec.oup - spec.m
    if kept > 0:
        block_c, block_p = 16, 128
        with tc.device_ctx(x):
            tc.launch(
                _affine_act_kernel, (n, triton.cdiv(kept, block_c), triton.cdiv(ho * wo, block_p)),
                out, scale2, shift2, kept, ho * wo, wo, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                spec.m, loops=(), ACT=tc.act_code(spec.act), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)
    return out, mean1, invstd1, var1u, mean2, invstd2, var2u


@torch.library.custom_op("ghost_kernels::triton_train_forward", mutates_args=())
def train_forward_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], bn1_weight: Optional[Tensor],
                     bn1_bias: Optional[Tensor], wd: Tensor, b2: Optional[Tensor], bn2_weight: Optional[Tensor],
                     bn2_bias: Optional[Tensor], running_mean1: Optional[Tensor], running_var1: Optional[Tensor],
                     running_mean2: Optional[Tensor], running_var2: Optional[Tensor], eps1: float, eps2: float,
                     oup: int, stride: int, ratio: int, dw_size: int, act: str, sync_group: int
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = GhostSpec.from_op_args(x.shape[1], oup, 1, stride, ratio, dw_size, act)
    s1 = None if running_mean1 is None else (running_mean1, running_var1)
    s2 = None if running_mean2 is None else (running_mean2, running_var2)
    return train_forward(x, w1, b1, bn1_weight, bn1_bias, wd, b2, bn2_weight, bn2_bias, s1, s2, eps1, eps2, spec,
                         _group(sync_group))


@train_forward_op.register_fake
def _(x, w1, b1, bn1_weight, bn1_bias, wd, b2, bn2_weight, bn2_bias, running_mean1, running_var1, running_mean2,
      running_var2, eps1, eps2, oup, stride, ratio, dw_size, act, sync_group):
    m, new = w1.shape[0], wd.shape[0]
    v1, v2 = (lambda: x.new_empty(m, dtype=torch.float32)), (lambda: x.new_empty(new, dtype=torch.float32))
    return empty_output(x, oup, stride, w1.dtype), v1(), v1(), v1(), v2(), v2(), v2()


@torch.library.custom_op("ghost_kernels::triton_train_backward", mutates_args=())
def train_backward_op(grad: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], bn1_weight: Optional[Tensor],
                      bn1_bias: Optional[Tensor], wd: Tensor, b2: Optional[Tensor], bn2_weight: Optional[Tensor],
                      bn2_bias: Optional[Tensor], mean1: Tensor, invstd1: Tensor, mean2: Tensor, invstd2: Tensor,
                      oup: int, stride: int, ratio: int, dw_size: int, act: str, batch_stats1: bool,
                      batch_stats2: bool, sync_group: int
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, w1, b1, bn1 weight/bias, wd, b2, bn2 weight/bias (an empty tensor for an absent
    conv bias or affine parameter)."""
    spec = GhostSpec.from_op_args(x.shape[1], oup, 1, stride, ratio, dw_size, act)
    grads = train_backward(grad, x, w1, b1, bn1_weight, bn1_bias, wd, b2, bn2_weight, bn2_bias, mean1, invstd1,
                           mean2, invstd2, spec, batch_stats1, batch_stats2, _group(sync_group))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@train_backward_op.register_fake
def _(grad, x, w1, b1, bn1_weight, bn1_bias, wd, b2, bn2_weight, bn2_bias, mean1, invstd1, mean2, invstd2, oup,
      stride, ratio, dw_size, act, batch_stats1, batch_stats2, sync_group):
    like = lambda t: x.new_empty(0) if t is None else torch.empty_like(t)  # noqa: E731
    gx = torch.empty_like(x, memory_format=output_memory_format(x))
    return (gx, torch.empty_like(w1), like(b1), like(bn1_weight), like(bn1_bias), torch.empty_like(wd), like(b2),
            like(bn2_weight), like(bn2_bias))


_GRAD_INPUTS = 9   # x, w1, b1, bn1 weight, bn1 bias, wd, b2, bn2 weight, bn2 bias: the op's first inputs


def _setup_context(ctx, inputs, output):
    (x, w1, b1, bn1_weight, bn1_bias, wd, b2, bn2_weight, bn2_bias, rm1, _, rm2, _, _, _, oup, stride, ratio,
     dw_size, act, sync_group) = inputs
    _, mean1, invstd1, _, mean2, invstd2, _ = output
    ctx.save_for_backward(x, w1, b1, bn1_weight, bn1_bias, wd, b2, bn2_weight, bn2_bias, mean1, invstd1, mean2,
                          invstd2)
    ctx.args = (oup, stride, ratio, dw_size, act, rm1 is None, rm2 is None, sync_group)
    ctx.has = tuple(t is not None for t in inputs[:_GRAD_INPUTS])


def _backward(ctx, grad, *_stat_grads):
    grads = train_backward_op(grad, *ctx.saved_tensors, *ctx.args)
    return tuple(g if has else None for g, has in zip(grads, ctx.has)) + (None,) * 12


train_forward_op.register_autograd(_backward, setup_context=_setup_context)


def ghost_train(x: Tensor, params: GhostParams, training: bool, compute_dtype: torch.dtype,
                sync_group: Optional[int] = None) -> Tensor:
    """The Ghost module with autograd and nn.BatchNorm2d semantics in both modes: casts to
    ``compute_dtype`` like nn.Conv2d under autocast, runs the op, and in train mode updates the
    running statistics the way nn.BatchNorm2d does (running_mean includes the conv's bias, as eager's).

    Equivalent PyTorch: ``reference.ghost_reference(x, params, training=training)``.
    """
    w1, bn1, wd, bn2, spec, b1, b2 = params   # both BatchNorms, 1x1 primary conv (TRAINING_SUPPORT)

    def mode(bn):
        batch = training or not bn_has_running_stats(bn)
        return batch, (training and bn.track_running_stats and bn.running_mean is not None)

    batch1, update1 = mode(bn1)
    batch2, update2 = mode(bn2)
    stats = lambda bn, batch: (None, None) if batch else (bn.running_mean, bn.running_var)  # noqa: E731
    out, mean1, _, var1u, mean2, _, var2u = train_forward_op(
        x.to(compute_dtype), w1.to(compute_dtype), b1, bn1.weight, bn1.bias, wd, b2, bn2.weight, bn2.bias,
        *stats(bn1, batch1), *stats(bn2, batch2), float(bn1.eps), float(bn2.eps),
        spec.oup, spec.stride, spec.ratio, spec.dw_size, spec.act, -1 if sync_group is None else sync_group)
    if update1:
        update_running_stats(bn1, mean1, var1u)
    if update2:
        update_running_stats(bn2, mean2, var2u)
    return out


def _group(sync_group: int) -> Optional[int]:
    """The ops' ``sync_group`` argument (an int in the op schema, -1 for none) as an optional index."""
    return None if sync_group < 0 else sync_group
