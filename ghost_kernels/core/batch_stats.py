"""Batch statistics of train-mode BatchNorm: the momentum rule, the running-statistics update, the
parallel merge of per-tile moments, and the process groups and collectives of SyncBatchNorm.

The reference path (``reference.batch_norm``) and the training ops (``train_ops.py``) take the
momentum factor from :func:`momentum_factor`, so the rule is written once.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

from .params import BatchNormState


def momentum_factor(bn: BatchNormState, as_tensor: bool = False) -> Union[float, Tensor]:
    """nn.BatchNorm2d's exponential-average factor for a train-mode call, *after* ``num_batches_tracked``
    was incremented: ``momentum``, or ``1 / num_batches_tracked`` for ``momentum=None`` (a cumulative
    average; 0 without the counter). ``as_tensor``: the cumulative factor as a 0-d float64 tensor
    (no ``.item()``, so torch.compile traces it without a graph break); F.batch_norm needs a float."""
    if bn.momentum is not None:
        return bn.momentum
    if bn.num_batches_tracked is None:
        return 0.0
    if as_tensor:
        return 1.0 / bn.num_batches_tracked.to(torch.float64)
    return 1.0 / float(bn.num_batches_tracked)


def count_batch(bn: BatchNormState) -> None:
    """The train-mode step counter: ``num_batches_tracked += 1`` when BN tracks running statistics."""
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)


def update_running_stats(bn: BatchNormState, mean: Tensor, var_unbiased: Tensor) -> None:
    """nn.BatchNorm2d's train-mode buffer update, from the batch mean and unbiased variance."""
    with torch.no_grad():
        count_batch(bn)
        factor = momentum_factor(bn, as_tensor=True)
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype) * factor)
        bn.running_var.mul_(1 - factor).add_(var_unbiased.to(bn.running_var.dtype) * factor)


class Moments:
    """count, mean and M2 (sum of squared deviations) per channel; float64."""

    def __init__(self, count: Tensor, mean: Tensor, m2: Tensor):
        self.count, self.mean, self.m2 = count, mean, m2

    @staticmethod
    def merge(count: Tensor, sums: Tensor, m2s: Tensor) -> "Moments":
        """Chan et al.'s parallel merge of T partials: ``count`` [T], ``sums``/``m2s`` [T, C] (each
        partial's sum and its M2 about its own mean)."""
        count, sums, m2s = count.double(), sums.double(), m2s.double()
        total = count.sum()
        mean = sums.sum(0) / total
        part_mean = sums / count.clamp_min(1)[:, None]
        m2 = m2s.sum(0) + (count[:, None] * (part_mean - mean) ** 2).sum(0)
        return Moments(total, mean, m2)

    def all_gather(self, group) -> "Moments":
        """The moments over every rank of ``group`` (SyncBatchNorm)."""
        import torch.distributed as dist
        world = dist.get_world_size(group)
        mine = torch.cat([self.count.reshape(1).expand(self.mean.numel()).reshape(1, -1),
                          self.mean.reshape(1, -1), self.m2.reshape(1, -1)])
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine.contiguous(), group=group)
        stacked = torch.stack(parts)          # [world, 3, C]
        count = stacked[:, 0, 0]
        return Moments.merge(count, stacked[:, 1] * count[:, None], stacked[:, 2])

    def finish(self, group_index: Optional[int] = None):
        """(mean, unbiased variance) in float32 and the biased variance in float64, over the whole
        batch (all ranks of the group, if given)."""
        mom = self.all_gather(process_group(group_index)) if group_index is not None else self
        return mom.mean.float(), (mom.m2 / (mom.count - 1).clamp_min(1)).float(), mom.m2 / mom.count


def all_reduce(t: Tensor, group_index: int) -> Tensor:
    """Sum ``t`` in place over the registered process group ``group_index``."""
    import torch.distributed as dist
    dist.all_reduce(t, group=process_group(group_index))
    return t


# Process groups for SyncBatchNorm, referred to by index in the ops (a ProcessGroup is no op argument).
_GROUPS: List[object] = []


def register_group(group) -> int:
    """Index of ``group`` for the ops' ``sync_group`` argument (``None`` is the default group)."""
    for i, g in enumerate(_GROUPS):
        if g is group:
            return i
    _GROUPS.append(group)
    return len(_GROUPS) - 1


def process_group(group_index: int):
    """The registered process group (``None`` is the default group)."""
    return _GROUPS[group_index]
