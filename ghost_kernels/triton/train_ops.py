"""Training of the Ghost module with the Triton kernels (``two_pass.py``'s, and ``train_kernels.py``'s
transposed stencil in the backward):
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

from ..core.batch_stats import update_running_stats
from ..core.layout import empty_output, output_memory_format
from ..core.params import GhostParams, bn_has_running_stats
from ..core.spec import GhostSpec
from . import two_pass_train
from .train_backward import bn_affine, centred, train_backward


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
    (``train_backward.centred``): in train mode the batch mean absorbs the bias.

    Launches (design note: ``train_kernels.py``): F1 = pass 1 of ``triton_two_pass`` with STATS (BN1's
    moments), F2 = pass 1 writing y1, F3 = pass 2 with STATS (BN2's moments, every ghost channel), F4 =
    pass 2 writing the kept ghost channels; an eval-mode BN skips its statistics pass."""
    dtype = w1.dtype
    out = empty_output(x, spec.oup, spec.stride, dtype)
    mean1, invstd1, var1u = _bn_stats(stats1, lambda: two_pass_train.train_stats1(x, out, w1, spec, dtype), eps1, b1,
                                      sync_group)
    scale1, shift1 = bn_affine(centred(mean1, b1), invstd1, bn1_weight, bn1_bias)
    two_pass_train.train_pass1(x, out, w1, scale1, shift1, spec, dtype)
    mean2, invstd2, var2u = _bn_stats(stats2, lambda: two_pass_train.train_stats2(x, out, wd, spec, dtype), eps2, b2,
                                      sync_group)
    scale2, shift2 = bn_affine(centred(mean2, b2), invstd2, bn2_weight, bn2_bias)
    two_pass_train.train_pass2(x, out, wd, scale2, shift2, spec, dtype)
    return out, mean1, invstd1, var1u, mean2, invstd2, var2u


def _bn_stats(running: Optional[Tuple[Tensor, Tensor]], moments, eps: float, conv_bias: Optional[Tensor],
              sync_group: Optional[int]):
    """(mean, invstd, unbiased var) of one BN, float32: from ``running`` (running_mean, running_var) in
    eval mode (var 0), else from the batch: ``moments()`` runs the statistics pass, merged over the
    process group if any; the mean includes the conv's bias, as eager's (what running_mean tracks)."""
    if running is not None:
        mean, invstd = running[0].float().clone(), torch.rsqrt(running[1].float() + eps)  # outputs never alias inputs
        return mean, invstd, torch.zeros_like(mean)
    mean, var_unbiased, var = moments().finish(sync_group)
    invstd = torch.rsqrt(var + eps).float()
    return (mean if conv_bias is None else mean + conv_bias.float()), invstd, var_unbiased


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
