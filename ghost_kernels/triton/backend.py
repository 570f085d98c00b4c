"""``backend="triton"``: the Triton path as one name.

* Inference (eval-mode BN, no autograd): the Triton kernel family that ``choice.py`` ranks first for
  the shape (measured on this GPU, else the offline model's order) among those whose limits admit it.
* Training (train-mode BN, or any call that needs gradients): the training ops of ``train_ops.py``
  (nn.BatchNorm2d semantics, a fused backward, SyncBatchNorm).

Equivalent PyTorch: ``reference.ghost_reference(x, params, training=training)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core import choice
from ..core.backend import Backend, Request, Support, is_compiling
from ..core.params import GhostParams, has_running_stats
from ..core.reference import ghost_reference
from ..core.spec import ACTIVATIONS
from .family import TritonFamily, triton_environment_reason
from .train_ops import ghost_train


@dataclass
class TritonBackend(Backend):
    families: Sequence[TritonFamily] = field(default=(), repr=False)

    def environment_reason(self, device: Optional[torch.device] = None) -> Optional[str]:
        return triton_environment_reason(device)

    def family_order(self, req: Request) -> Tuple[List[TritonFamily], str]:
        """The families in the order to try them for ``req``, and why. While torch.compile or export
        traces the call the order is not by shape (sizes may be symbolic): the traced call only asks
        whether some family admits the module at all, the op ``ghost_kernels::forward`` picks per call."""
        by_name = {f.name: f for f in self.families}
        if is_compiling():
            return [by_name[n] for n in choice.TRITON_FAMILIES if n in by_name], "traced: chosen per call"
        name, capability = choice.device_of(req.x)
        key = choice.shape_key(req.spec, req.x.shape[2], req.x.shape[3], req.compute_dtype, req.channels_last)
        order, why = choice.rank(list(by_name), key, name, capability, choice.heuristic_triton_order(key),
                                 complete_only=True)
        return [by_name[n] for n in order], why

    def pick(self, req: Request) -> Tuple[Optional[TritonFamily], str, List[str]]:
        """(the family to run or None, why, the reasons of every family passed over)."""
        order, why = self.family_order(req)
        passed = []
        for fam in order:
            reasons = fam.not_supported_reasons(req)
            if not reasons:
                return fam, why, passed
            passed.append(f"{fam.name}: " + "; ".join(reasons))
        return None, why, passed

    def not_supported_reasons(self, req: Request) -> List[str]:
        env = self.environment_reason(req.x.device)
        if env:
            return [env]
        if req.inference:
            fam, _, passed = self.pick(req)
            return [] if fam is not None else passed
        reasons = training_support_reasons(req)
        batch_stats = req.training or not has_running_stats(req.params)
        if batch_stats and req.batch_values == 1:
            reasons.append("batch statistics need more than 1 value per channel, got 1")
        if req.sync_error:
            reasons.append(req.sync_error)
        return reasons

    def resolve(self, req: Request) -> Backend:
        if req.inference:
            fam, _, _ = self.pick(req)
            return fam
        return self

    def forward(self, x: Tensor, req: Request) -> Tensor:
        if req.inference:
            fam, _, _ = self.pick(req)
            return fam.forward(x, req)
        if req.batch_values == 0:  # nothing to compute; eager's result and buffer updates exactly
            return ghost_reference(x, req.params, training=req.training)
        return ghost_train(x, req.params, req.training, req.compute_dtype, req.sync_group)

    def module_reasons(self, params: GhostParams, gated: bool = False) -> List[str]:
        """Reasons no Triton path (no inference family, nor the training ops) can ever run the module."""
        per_path = [TRAINING_SUPPORT.module_reasons(params, gated)] + [f.module_reasons(params, gated)
                                                                        for f in self.families]
        if any(not r for r in per_path):
            return []
        return sorted(set(r for reasons in per_path for r in reasons))

    def training_module_reasons(self, params: GhostParams, gated: bool = False) -> List[str]:
        """Why the training ops can never train the module (an inference family may still run it)."""
        return TRAINING_SUPPORT.module_reasons(params, gated)

    def explain_choice(self, req: Request) -> str:
        if not req.inference:
            return training_op_why(req)
        fam, why, _ = self.pick(req)
        return f"the inference op ghost_kernels::triton_forward, family {fam.name if fam else None}; {why}"


def training_support_reasons(req: Request) -> List[str]:
    """:data:`TRAINING_SUPPORT`'s reasons for a call that is not plain inference, each naming the
    training ops (an inference family may run the same module under torch.no_grad() in eval mode)."""
    out = []
    for reason in TRAINING_SUPPORT.reasons(req):
        if reason.startswith("kernel_size="):
            reason += ("; the training kernels take a 1x1 primary conv only (a k x k one runs fused in inference, "
                       "on triton_two_pass): train it with backend='torch' or 'auto'")
        elif reason.startswith("a conv without a BatchNorm"):
            reason += ("; the training ops normalize with a train-mode BatchNorm: train the module's training "
                       "form, or use backend='torch' or 'auto'")
        out.append(f"training ops: {reason}")
    return out


def training_op_why(req: Request) -> str:
    """Why a call runs the training ops rather than an inference family."""
    if req.training:
        what = "train-mode BatchNorm (batch statistics, running-statistics updates)"
    elif req.needs_grad:
        what = ("eval-mode BatchNorm with autograd: grad mode is on and x or a parameter requires grad. Under "
                "torch.no_grad() or torch.inference_mode() the inference op ghost_kernels::triton_forward runs "
                "instead")
    else:
        what = "BatchNorm without running statistics (batch statistics even in eval mode)"
    return f"the training op ghost_kernels::triton_train_forward (with a backward): {what}"


# What the training ops (train_ops.py) run: every activation the kernels know, convs with or without a
# bias, each followed by a BatchNorm. Not: a k x k primary conv (the forward's two-pass kernels take it,
# the backward's are 1x1 only) and a conv without a BatchNorm (a deployed module: its training form
# has the BatchNorm).
TRAINING_SUPPORT = Support(acts=ACTIVATIONS, conv_bias=True)
