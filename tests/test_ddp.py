"""Data-parallel training on 2 CPU processes (gloo): a converted model with synchronized batch
statistics trains with the fused ops (statistics all-gathered, backward sums all-reduced inside
them), and its losses, gradients, parameters and running statistics equal single-process training on
the concatenated batch. Without synchronization each rank normalizes with its own half's statistics,
so the gradients differ from the whole batch's (also checked: the test can fail)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import ghost_kernels as gk

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ddp_worker  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU test (gloo, Triton interpreter): it runs in CI"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "syncbn", "nosync"])
def test_synchronized_training_matches_single_process_on_the_whole_batch(mode, tmp_path):
    """ddp: DistributedDataParallel + ghost_kernels.sync_batch_stats; syncbn: SyncBatchNorm modules;
    nosync: DDP with per-rank statistics, which must *not* match (the comparison can fail)."""
    world, port = 2, free_port()
    path = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)   # keep the caller's entries
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), mode, str(r), str(world), str(port),
                               str(tmp_path / f"rank{r}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers did not finish in 400 s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    single = gk.convert(ddp_worker.ddp_model(), backend="triton")
    losses, grads = ddp_worker.train(single, ddp_worker.batches())
    if mode == "nosync":
        got = ranks[0]["grads"]
        assert not all(torch.allclose(got[k], g, rtol=1e-4, atol=1e-6) for k, g in grads.items())
        return
    for r, got in enumerate(ranks):
        assert torch.allclose(got["losses"], torch.stack(losses), rtol=1e-5, atol=0), (r, got["losses"], losses)
        for name, g in grads.items():
            assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-6), f"rank {r}: d{name}"
        for name, v in single.state_dict().items():
            w = got["state"][name]
            assert torch.allclose(w.to(v.dtype), v, rtol=1e-4, atol=1e-6), f"rank {r}: {name} after training"
