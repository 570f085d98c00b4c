"""The offline model on the CUDA C++ kernel of the built extension (``ghost_kernels/_C*.so``,
``csrc/ghost_forward.cu``): its sm_90 SASS, read with the same parser and the same three terms as
the Triton families, for the comparison with its H200 measurement (benchmarks/NOTES.md).

There is no launcher to capture and no TTGIR: the trip counts of the kernel's loops come from its
source, per source line (``LOOPS``), and ptxas's unrolling from the SASS itself -- a loop whose body
holds U copies of its line's unit instruction (an x-tile load, a tap's FMA) runs ``floor(trips / U)``
times, its remainder being the peeled code around it, counted once per entry. Loads from the weight
and BN vectors (``L2_SOURCES``) take the L2 latency, the rest (x) the DRAM latency. Grid: one CTA of
256 threads (8 warps) per 14x14 tile (16x16 with its halo) and 16 intrinsic channels, not persistent.
Rough where the instruction model is exact for Triton: it is a cross-check, not a budget."""
from __future__ import annotations

import glob
import math
import os
import subprocess
import tempfile
from typing import Dict, List, Optional

from .compiler import _tool
from .latency import launch_latency
from .rows import HBM_RATE, floor_bytes, issue_us, predicted_us
from .sass import analyze_sass, find_loops, innermost_loops, parse_sass
from .trips import weighted_counts

HALO, THREADS, WARPS, BM = 16, 256, 8, 16
BK = {"bfloat16": 32, "float16": 32, "float32": 16}
L2_SOURCES = ("p.wd[", "w1[", "p.scale1[", "p.shift1[", "p.shift2[")   # source text of the small tensors' loads


def _source(root: str) -> List[str]:
    with open(os.path.join(root, "csrc", "ghost_forward.cu")) as f:
        return f.read().splitlines()


def _line_of(src: List[str], needle: str) -> int:
    return next(i + 1 for i, ln in enumerate(src) if needle in ln)


def loop_trips(src: List[str], spec, n: int, h: int, dtype: str) -> Dict[int, tuple]:
    """source line -> (trips per entry of the loop, the instruction base one source iteration has once)."""
    bk, taps = BK[dtype], spec.dw_size * spec.dw_size
    vec = 16 // (4 if dtype == "float32" else 2)
    n_ghost, kept = BM * (spec.ratio - 1), spec.oup - spec.m
    blocks = math.ceil(spec.m / BM)
    ghost = sum(len([g for g in range(0, n_ghost, vec) if c * (spec.ratio - 1) * BM + g < kept])
                for c in range(blocks)) / blocks
    warps_with_weights = math.ceil(min(n_ghost * taps, THREADS) / 32) / WARPS
    return {
        _line_of(src, "for (int i = tid; i < n_ghost * taps"): (warps_with_weights, "LDG"),
        _line_of(src, "for (int k0 = 0; k0 < p.cin"): (math.ceil(spec.inp / bk), None),
        _line_of(src, "for (int i = threadIdx.x; i < kLanes * kGroups"): (HALO * HALO * (bk // vec) / THREADS, "LDG"),
        _line_of(src, "for (int i = threadIdx.x; i < kLanes * BK"): (0.0, "LDG"),     # channels_last: vector path
        _line_of(src, "for (int i = tid; i < kBM * BK"): (BM * bk / THREADS, "LDG"),
        _line_of(src, "for (int g = 0; g < n_ghost"): (ghost, None),
        _line_of(src, "for (int dy = 0; dy < p.dw"): (spec.dw_size, None),
        _line_of(src, "for (int dx = 0; dx < p.dw"): (spec.dw_size, "FFMA"),
    }


def loop_weights(instrs, loops, trips: Dict[int, tuple]) -> Dict[int, float]:
    """The weight of every SASS loop from its back edge's source line (``loop_trips``)."""
    inner = innermost_loops(loops, len(instrs))
    out = {}
    for lp in loops:
        latch = instrs[max(lp.latches)]
        line = latch.loc[0][1] if latch.loc else None
        if line not in trips:
            raise ValueError(f"SASS loop at 0x{lp.start(instrs):04x}: source line {line} not in LOOPS")
        t, unit = trips[line]
        copies = sum(1 for i in lp.body if inner[i] == lp.id and instrs[i].base == unit) if unit else 1
        out[lp.id] = t if copies <= 1 else float(math.floor(t / copies))
    return out


def sass_sm90(so_path: str, dtype: str = "bfloat16") -> tuple:
    """(SASS text with encodings, the kernel's function name, its registers and static shared memory)
    from the extension's sm_90 cubin."""
    from .compiler import parse_res_usage
    from .sass import split_functions
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([_tool("cuobjdump"), "-xelf", "all", so_path], cwd=tmp, capture_output=True, check=True)
        cubin = next(iter(glob.glob(os.path.join(tmp, "*sm_90*.cubin"))), None)
        if cubin is None:
            raise FileNotFoundError(f"{so_path} has no sm_90 cubin")
        text = subprocess.run([_tool("nvdisasm"), "-c", "-gi", "-hex", cubin], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    tag = {"bfloat16": "13__nv_bfloat16", "float16": "6__half", "float32": "IfE"}[dtype]
    name = next(f for f in split_functions(text) if "ghost_forward_kernel" in f and tag in f)
    usage = parse_res_usage(res.split(f"Function {name}:", 1)[1].split("Function", 1)[0])
    return text, name, dict(regs=usage["regs"], smem=usage["shared"] or 0)


def model_shape(kernel: dict, src: List[str], shape, batch: int = 256, dtype: str = "bfloat16") -> dict:
    """The three terms of the CUDA kernel (:func:`read_kernel`) on one shape (channels_last)."""
    spec, h = shape.spec, shape.h
    weights = loop_weights(kernel["instrs"], kernel["loops"], loop_trips(src, spec, batch, h, dtype))
    per_warp = weighted_counts(kernel["analysis"], weights)["n"]
    ho, wo = spec.out_hw(h, shape.w)
    tile = HALO - 2 * (spec.dw_size // 2)
    programs = batch * math.ceil(ho / tile) * math.ceil(wo / tile) * math.ceil(spec.m / BM)
    usage = kernel["usage"]
    lat = launch_latency(kernel["records"], weights, programs, usage["regs"], usage["smem"], WARPS,
                         arg_bytes={"weights": 0})
    esize = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    hbm = floor_bytes(spec, batch, h, shape.w, esize)
    warp_instr = per_warp * WARPS * programs
    return dict(name=shape.name, inp=spec.inp, oup=spec.oup, h=h, programs=programs, warp_instr=warp_instr,
                issue_us=issue_us(warp_instr), hbm_us=hbm / HBM_RATE * 1e6, latency_us=lat["latency_us"],
                predicted_us=predicted_us(warp_instr, hbm, lat["latency_us"]), ctas_per_sm=lat["ctas_per_sm"],
                rounds=lat["rounds"], round_trips=lat["round_trips"], regs=usage["regs"], smem=usage["smem"])


def read_kernel(text: str, function: str, usage: dict, src: List[str]) -> dict:
    """The parsed kernel: instructions, loops, the instruction model's analysis, the timing records
    (loads from the weights and BN vectors marked L2-resident)."""
    from .latency import timing_records
    instrs = parse_sass(text, function)
    l2_lines = {f"{_path(text)}:{i + 1}": ["weights"] for i, ln in enumerate(src) if any(s in ln for s in L2_SOURCES)}
    return dict(instrs=instrs, loops=find_loops(instrs)[0], analysis=analyze_sass(text, function), usage=usage,
                records=timing_records(text, function, l2_lines))


def _path(text: str) -> str:
    """The .cu file's path as the line info names it."""
    import re
    m = re.search(r'"([^"]*ghost_forward\.cu)"', text)
    return m.group(1) if m else "ghost_forward.cu"


def extension_path(root: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(root, "ghost_kernels", "_C*.so")))
    return found[0] if found else None


def model_extension(shapes, root: str, batch: int = 256, dtype: str = "bfloat16") -> List[dict]:
    """The three terms of the built extension's kernel on ``shapes`` (ModuleShape list)."""
    so = extension_path(root)
    if so is None:
        raise FileNotFoundError(f"no built extension under {root}/ghost_kernels")
    text, function, usage = sass_sm90(so, dtype)
    src = _source(root)
    kernel = read_kernel(text, function, usage, src)
    return [model_shape(kernel, src, s, batch, dtype) for s in shapes]
