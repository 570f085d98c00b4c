"""The GPU lab's timing: CUDA-graph replay over rotating inputs, the references (copy bandwidth, launch
latency), and the implementations timed per shape (baselines, backends, every family x config).

A timed call is captured ``K`` times in one CUDA graph, each on a different input (K inputs larger
than L2 together), and the graph is replayed: launch gaps and Python overhead drop out, and no call
reads its input from L2. Every implementation is checked against the float64 reference (on the
first images of the batch) before it is timed; a wrong one is reported, never timed.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.params import GhostParams
from ..core.spec import ModuleShape
from ..dispatch import BY_NAME, TRITON_FAMILIES
from ..module import GhostModule
from ..testing import rel_err
from .harness import DTYPES, ERR_GATE, LAYOUTS, FoldedEager, eager_module, module_bytes, randomize_

CHECK_IMAGES = 4   # images of the batch compared with the float64 reference


def graph_time(fn: Callable[[Tensor], Tensor], inputs: List[Tensor], reps: int = 20) -> Tuple[float, float, float]:
    """(median, p20, p80) ms per call of ``fn``: one CUDA graph of ``fn`` over every input, replayed.
    (CPU tensors, for the lab's ``--cpu-check``: a plain loop timed with the host clock.)"""
    if inputs[0].device.type != "cuda":
        times = []
        for _ in range(max(2, reps // 5)):
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            times.append((time.perf_counter() - t0) * 1e3 / len(inputs))
        times.sort()
        return times[len(times) // 2], times[0], times[-1]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in inputs:   # warm-up (compiles, learns occupancy) outside the capture
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(x) for x in inputs]
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(inputs))
    del outs, graph
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def rotating(shape, dtype, layout, min_bytes: int, device) -> List[Tensor]:
    one = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    n = max(2, min(16, math.ceil(min_bytes / max(one, 1))))
    return [torch.randn(shape, device=device, dtype=torch.float32).to(dtype).contiguous(memory_format=layout)
            for _ in range(n)]


def references(device, l2_bytes: int, shape_bytes: List[int]) -> dict:
    """Copy bandwidth at several sizes and at each shape's own bytes, an L2-resident copy, and the
    latency of an empty launch (eager and in a graph)."""
    out: Dict[str, object] = {"copy_GBps": {}, "copy_at_shape_bytes": {}}

    def copy_rate(nbytes: int) -> float:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        n_in = max(1, min(8, (3 * l2_bytes) // max(nbytes, 1)))
        srcs = [src] + [torch.empty_like(src).uniform_() for _ in range(n_in - 1)]
        med, _, _ = graph_time(lambda s: dst.copy_(s), srcs)
        return 2 * nbytes / (med * 1e-3) / 1e9

    for mb in ((16, 64, 256, 1024, 4096) if device.type == "cuda" else (4, 16)):
        out["copy_GBps"][f"{mb}MiB"] = copy_rate(mb << 20)
    for b in sorted(set(shape_bytes)):
        out["copy_at_shape_bytes"][str(b)] = copy_rate(max(b // 2, 4096))   # read + write = b bytes moved
    small = torch.empty((l2_bytes // 8) // 4, device=device)
    dst = torch.empty_like(small)
    med, _, _ = graph_time(lambda s: dst.copy_(s), [small])
    out["l2_copy_GBps"] = 2 * small.numel() * 4 / (med * 1e-3) / 1e9
    tiny = torch.empty(1, device=device)
    out["empty_launch_graph_us"] = 1e3 * graph_time(lambda t: t.add_(0), [tiny] * 32)[0]
    sync = torch.cuda.synchronize if tiny.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(2000):
        tiny.add_(0)
    sync()
    out["empty_launch_eager_us"] = (time.perf_counter() - t0) / 2000 * 1e6
    out["copy_peak_GBps"] = max(out["copy_GBps"].values())
    return out


class ShapeBench:
    """One module shape at one dtype and layout: weights, inputs, the reference, and the implementations."""

    def __init__(self, shape: ModuleShape, batch: int, dtype_name: str, layout_name: str, device, l2_bytes: int):
        self.shape, self.spec, self.batch = shape, shape.spec, batch
        self.dtype, self.layout = DTYPES[dtype_name], LAYOUTS[layout_name]
        self.dtype_name, self.layout_name = dtype_name, layout_name
        self.base = randomize_(eager_module(self.spec)).to(device).eval()
        ref_mod = GhostModule.from_module(copy.deepcopy(self.base).double(), backend="torch")
        self.base = self.base.to(self.dtype)
        self.params = GhostParams.from_module(self.base, self.spec)
        self.inputs = rotating((batch, self.spec.inp, shape.h, shape.w), self.dtype, self.layout, 3 * l2_bytes, device)
        with torch.no_grad():
            self.ref = ref_mod(self.inputs[0][:CHECK_IMAGES].double())
        self.bytes = module_bytes(self.spec, batch, shape.h, shape.w, self.inputs[0].element_size())

    def impls(self, compile_ok: bool) -> Dict[str, Callable[[], Callable[[Tensor], Tensor]]]:
        """impl name -> a factory of the callable to time (the factory may raise to skip)."""
        made: Dict[str, Callable[[], Callable]] = {
            "eager": lambda: self.base,
            "eager_folded": lambda: FoldedEager(self.base, self.spec),
            "auto": lambda: GhostModule.from_module(self.base, backend="auto"),
            "torch_folded": lambda: GhostModule.from_module(self.base, backend="torch_folded"),
        }
        if BY_NAME["cuda"].environment_reason(self.inputs[0].device) is None:
            made["cuda"] = lambda: GhostModule.from_module(self.base, backend="cuda")
        if compile_ok:
            made["compile"] = lambda: _compiled(self.base)
        return made

    def family_configs(self, all_configs: bool) -> List[Tuple[str, object]]:
        """(family, config) pairs: every lab config, or the default only."""
        ho, wo = self.spec.out_hw(self.shape.h, self.shape.w)
        cl = self.layout == torch.channels_last
        pairs = []
        for fam in TRITON_FAMILIES:
            if fam.support.module_reasons(self.params):   # e.g. a k x k primary conv: triton_two_pass only
                continue
            if fam.default_config is None:
                pairs.append((fam.name, None))
                continue
            cfgs = fam.lab_configs(self.spec, ho, wo, self.dtype, cl) if all_configs and fam.lab_configs else []
            default = fam.default_config(self.spec, ho, wo, self.dtype, cl)
            for cfg in [default] + [c for c in cfgs if c != default]:
                pairs.append((fam.name, cfg))
        return pairs

    def family_callable(self, family: str, config) -> Callable[[Tensor], Tensor]:
        fam = BY_NAME[family]
        return lambda x: fam.launcher(x, self.params, self.dtype, config=config)

    def check(self, fn: Callable[[Tensor], Tensor]) -> float:
        with torch.no_grad():
            out = fn(self.inputs[0])
        return rel_err(out[:CHECK_IMAGES], self.ref)

    def gate(self) -> float:
        return ERR_GATE[self.dtype]


def time_impl(bench: ShapeBench, fn: Callable[[Tensor], Tensor], reps: int) -> dict:
    """Check, then time one implementation; the row's measured fields (or its failure)."""
    row: dict = {}
    err = bench.check(fn)
    row["rel_err"] = err
    if not err <= bench.gate():
        row.update(status="wrong", note=f"rel err {err:.2e} > {bench.gate():.0e}: not timed")
        return row
    with torch.no_grad():
        med, p20, p80 = graph_time(fn, bench.inputs, reps)
    row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80)
    return row


def _compiled(module: nn.Module):
    import torch._dynamo
    torch._dynamo.reset()
    return torch.compile(module)


def config_dict(cfg) -> Optional[dict]:
    return None if cfg is None else dict(cfg._asdict())
