"""One rank of tests/test_ddp.py: ``python ddp_worker.py MODE RANK WORLD PORT OUTFILE``.

Trains the converted network of :func:`ddp_model` on gloo, on this rank's share of each batch, with
synchronized batch statistics, and saves the losses, the first step's gradients, and the parameters
and buffers after the last step. MODE:

* ``ddp``: DistributedDataParallel, statistics synchronized by ``ghost_kernels.sync_batch_stats``;
* ``syncbn``: ``nn.SyncBatchNorm.convert_sync_batchnorm`` on the converted model (DDP refuses
  SyncBatchNorm in CPU modules, so gradients are averaged with an all-reduce, as DDP does);
* ``nosync``: DistributedDataParallel with per-rank statistics (the negative control).
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # CPU processes: the Triton kernels run in the interpreter

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import OfficialGhost as GhostModule  # noqa: E402
from torch import nn  # noqa: E402

import ghost_kernels as gk  # noqa: E402

STEPS, BATCH, HW = 2, 6, 10


def ddp_model() -> nn.Module:
    """A stem conv, three official-style Ghost modules (all the BatchNorms are inside them), a head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), GhostModule(8, 16), GhostModule(16, 21, ratio=3),
                         GhostModule(21, 13, stride=2, relu=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(13, 5))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, HW, HW, generator=g), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(STEPS)]


def train(model, data, rank=0, world=1, after_backward=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, first_grads = [], None
    per = BATCH // world
    for x, y in data:
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    return losses, first_grads


def main(mode: str, rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    model = gk.convert(ddp_model(), backend="triton")
    if mode in ("ddp", "nosync"):
        model = nn.parallel.DistributedDataParallel(gk.sync_batch_stats(model) if mode == "ddp" else model)
        losses, grads = train(model, batches(), rank, world)
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 6

        def average_gradients(model):
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        losses, grads = train(model, batches(), rank, world, average_gradients)
    total = torch.stack(losses)  # the loss over the whole batch is the mean of the ranks' (equal shares)
    dist.all_reduce(total)
    state = {k.removeprefix("module."): v for k, v in model.state_dict().items()}
    torch.save({"losses": total / world, "grads": {k.removeprefix("module."): v for k, v in grads.items()},
                "state": state}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
