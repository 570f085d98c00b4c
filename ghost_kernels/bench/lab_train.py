"""The lab's ``train`` phase (issue 17.5): what training costs, per module and for the whole network.

Run in a call of its own (``benchmarks/gpu_lab.sh OUTDIR --phases train``: the default phases fill the
lab's budget with inference), it writes ``train.json`` after every row:

1. **Per shape** (the 22 distinct GhostNet 1.0x shapes at the lab's batch, bf16 channels_last; the
   first of each resolution first, so a short budget still covers every resolution): one training
   step of one module -- train-mode forward and backward with a fixed random dL/dout
   (``harness.OPS["train"]``) -- for ``eager`` (the module as timm writes it), ``compile``
   (torch.compile of it) and ``triton`` (``backend="triton"``: the fused training ops), each checked
   against float64 (dL/dx within the bench's gate) before it is timed, with its peak memory above what
   was allocated before the step (``peak_MiB``) and its bandwidth against the training floor
   (``harness.train_bytes``: read x three times, dL/dout once, write out and dL/dx).
2. **The network**: GhostNet 1.0x (timm ``ghostnet_100``, random weights) training images/s under AMP
   (bf16 autocast, fp32 weights, channels_last, SGD with momentum, cross-entropy on random labels,
   no dropout):
   timm against ``convert(model, backend="triton")``, each eager and under torch.compile, timed over
   whole steps (forward, backward, optimizer) with the host clock after two warm-up steps, with peak
   memory. Each row first checks its first step's loss and gradients against timm eager's from the
   same weights and batch (``grad_rel_err``): a row whose gradients disagree is reported, not timed.

``auto`` trains on PyTorch until this phase has measured the fused ops faster per shape
(``dispatch.AUTO_TRAINING_REASON``); these rows are the measurement that decision waits for.

``--cpu-check`` runs the plumbing on the CPU: two small shapes in float32 and a three-stage GhostNet
(``lab_model.CPU_CHECK_CFGS``) at batch 2 in float32 without autocast, torch.compile replaced by the
eager model (the compiled training step is tested in tests/test_compile.py): no numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..convert import convert
from ..core.spec import ModuleShape
from .harness import OPS, bench_shape, randomize_, train_bytes

SHAPE_IMPLS = ("eager", "compile", "triton")
MODEL_IMPLS = (("timm", "eager"), ("convert_triton", "eager"), ("timm", "compile"), ("convert_triton", "compile"))
GRAD_GATE = {"bfloat16": 0.1, "float32": 1e-3}   # whole-network gradient vs timm eager's, same precision
WARMUP_STEPS, TIMED_STEPS = 2, 5
SHAPE_ROW_S, MODEL_COMPILE_S = 8.0, 60.0   # what a shape row and a compiled model row are expected to cost


def shape_order(shapes: List[tuple]) -> List[tuple]:
    """(shape, count) pairs with the first of each resolution first: a short budget still covers
    every resolution."""
    seen, first, rest = set(), [], []
    for s, c in shapes:
        (rest if s.h in seen else first).append((s, c))
        seen.add(s.h)
    return first + rest


def shape_rows(device, batch: int, deadline: Optional[float], cpu_check: bool, quick: bool, copy_GBps,
               l2_bytes: int, emit: Callable[[dict], None], compile_s: float = 90.0) -> None:
    """Section 1: one training step per shape and implementation (see the module docstring)."""
    from .__main__ import select_shapes
    if cpu_check:
        shapes = [(dataclasses.replace(s, h=6, w=5), c)
                  for s, c in select_shapes("blocks.0.0.ghost1,blocks.1.0.ghost2", False)]
        dtype = "float32"
    else:
        shapes, dtype = shape_order(select_shapes("quick" if quick else "all", quick)), "bfloat16"
    compile_budget = {"compile": compile_s}   # spent, later shapes' compile rows say so (the first of each
                                              # resolution come first)
    for k, (shape, count) in enumerate(shapes):
        if deadline is not None and time.perf_counter() + SHAPE_ROW_S > deadline:
            emit(_skipped_shape(shape, count, batch, dtype, "the phase's budget ran out"))
            continue
        rows = bench_shape(shape, count, batch, dtype, "channels_last", list(SHAPE_IMPLS), device, copy_GBps,
                           l2_bytes, compile_budget, rep_ms=20 if cpu_check else 100, op=OPS["train"])
        for row in rows:
            emit(dict(dataclasses.asdict(row), section="shape"))
        torch.cuda.empty_cache()


def _skipped_shape(shape: ModuleShape, count: int, batch: int, dtype: str, why: str) -> dict:
    spec = shape.spec
    return dict(section="shape", op="train", impl="*", name=shape.name, inp=spec.inp, oup=spec.oup, h=shape.h,
                w=shape.w, batch=batch, dtype=dtype, count=count, status="skipped", note=why,
                bytes=train_bytes(spec, batch, shape.h, shape.w, 2 if dtype != "float32" else 4))


class TrainBench:
    """GhostNet, its batch and labels, and the training step of section 2."""

    def __init__(self, device, batch: int, cpu_check: bool):
        import timm
        from timm.models.ghostnet import GhostNet

        from .lab_model import CPU_CHECK_CFGS
        self.device, self.cpu_check, self.batch = device, cpu_check, batch
        self.amp = not cpu_check
        self.image = 32 if cpu_check else 224
        # no dropout: every row's first step is compared with timm eager's from the same weights and batch
        base = (GhostNet(CPU_CHECK_CFGS, num_classes=10, drop_rate=0.0) if cpu_check
                else timm.create_model("ghostnet_100", drop_rate=0.0))
        self.classes = base.num_classes
        self.base = randomize_(base).train().to(device, memory_format=torch.channels_last)
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(batch, 3, self.image, self.image, generator=g).to(device).contiguous(
            memory_format=torch.channels_last)
        self.labels = torch.randint(0, self.classes, (batch,), generator=g).to(device)

    def model(self, impl: str, mode: str) -> nn.Module:
        """A fresh copy of timm's model or of the converted one, compiled for ``mode`` (``cpu_check``:
        never compiled, see the module docstring)."""
        model = copy.deepcopy(self.base)
        if impl == "convert_triton":
            convert(model, backend="triton")
        if mode == "compile" and not self.cpu_check:
            torch._dynamo.reset()
            return torch.compile(model)
        return model

    def step(self, model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> float:
        """One training step (forward under autocast, cross-entropy, backward, the optimizer's step
        when given); returns the loss."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = nn.functional.cross_entropy(model(self.x), self.labels)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    def first_grads(self, model: nn.Module):
        """The loss and the flattened gradients of one step from the model's current weights."""
        for p in model.parameters():
            p.grad = None
        loss = self.step(model, None)
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        for p in model.parameters():
            p.grad = None
        return loss, grads


def model_rows(device, batch: int, deadline: Optional[float], cpu_check: bool, emit: Callable[[dict], None]) -> None:
    """Section 2: GhostNet 1.0x training images/s (see the module docstring)."""
    bench = TrainBench(device, 2 if cpu_check else batch, cpu_check)
    ref_loss, ref_grads = bench.first_grads(bench.model("timm", "eager"))
    dtype = "float32" if cpu_check else "bfloat16"
    for impl, mode in MODEL_IMPLS:
        row = dict(section="model", net="ghostnet_100", impl=f"{impl}_{mode}", model=impl, mode=mode, batch=bench.batch,
                   image_size=bench.image, dtype=dtype, precision="amp" if bench.amp else "float32",
                   layout="channels_last", status="ok", note="")
        if cpu_check and mode == "compile":
            row["note"] = "cpu-check: the eager model stands in for torch.compile"
        need = TIMED_STEPS * 0.5 + (MODEL_COMPILE_S if mode == "compile" and not cpu_check else 0.0)
        if deadline is not None and time.perf_counter() + need > deadline:
            emit(dict(row, status="skipped", note="the phase's budget ran out"))
            continue
        try:
            _time_model(bench, impl, mode, ref_loss, ref_grads, row)
        except Exception as exc:   # reported, not fatal: the other rows still run
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        emit(row)
        torch.cuda.empty_cache()


def _time_model(bench: TrainBench, impl: str, mode: str, ref_loss: float, ref_grads, row: Dict) -> None:
    model = bench.model(impl, mode)
    t0 = time.perf_counter()
    loss, grads = bench.first_grads(model)       # also compiles
    row["first_step_s"] = time.perf_counter() - t0
    row["loss"], row["loss_timm_eager"] = loss, ref_loss
    row["grad_rel_err"] = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    gate = GRAD_GATE[row["dtype"]]
    if not row["grad_rel_err"] <= gate:
        row.update(status="wrong", note=f"gradients {row['grad_rel_err']:.2e} from timm eager's (> {gate:g}): not timed")
        return
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    warmup, timed = (1, 1) if bench.cpu_check else (WARMUP_STEPS, TIMED_STEPS)   # cpu-check: the plumbing
    for _ in range(warmup):
        bench.step(model, opt)
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        before = torch.cuda.memory_allocated(bench.device)
    t0 = time.perf_counter()
    for _ in range(timed):
        bench.step(model, opt)   # loss.item() syncs every step: what a training loop that logs sees
    step_s = (time.perf_counter() - t0) / timed
    row["step_ms"] = step_s * 1e3
    row["images_per_s"] = bench.batch / step_s
    if bench.device.type == "cuda":
        row["peak_MiB"] = (torch.cuda.max_memory_allocated(bench.device) - before) / 2 ** 20


def train_phase(device, batch: int, deadline: Optional[float], cpu_check: bool = False, quick: bool = False,
                copy_GBps: Optional[float] = None, l2_bytes: int = 50 << 20, progress=None,
                compile_s: float = 90.0) -> dict:
    """Both sections; ``progress(result)`` after every row. The per-shape rows get the first 60% of
    the time to ``deadline`` and ``compile_s`` seconds of torch.compile among them (``--compile-budget``),
    the network the rest (its compiled rows go first when time is short)."""
    rows: List[dict] = []
    start = time.perf_counter()
    split = None if deadline is None else start + 0.6 * (deadline - start)

    def emit(row: dict) -> None:
        rows.append(row)
        if progress is not None:
            progress({"rows": rows})

    shape_rows(device, batch, split, cpu_check, quick, copy_GBps, l2_bytes, emit, compile_s)
    model_rows(device, batch, deadline, cpu_check, emit)
    return {"rows": rows}
