"""Compilation for sm_90 and reading the cubin: ``triton.compile`` of each :class:`CompileJob` (in a
process pool of at most ``MAX_WORKERS``, never under ``TRITON_INTERPRET=1``), then ``nvdisasm``
(SASS), ``cuobjdump -res-usage`` (registers), ptxas's ``-v`` log (spills), the metadata (shared
memory) and TTIR/TTGIR (source loops)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

from .errors import OfflineError, TritonApiMismatch
from .latency import timing_records
from .mlir import load_sources, source_loops
from .sass import analyze_sass
from .specialize import CompileJob, _decode_const, _triton, resolve_kernel, target

MAX_WORKERS = 2


def _tool(name: str) -> str:
    try:
        from triton import knobs
        p = getattr(knobs.nvidia, name).path
        if p and os.path.exists(p):
            return p
    except Exception:
        pass
    cand = os.path.join(os.path.dirname(_triton().__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(cand):
        return cand
    p = shutil.which(name)
    if not p:
        raise OfflineError(f"{name} not found (Triton's bundled CUDA tools)")
    return p


def _disassemble(cubin: bytes) -> Tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-gi", "-hex", path], capture_output=True, text=True)
        if sass.returncode != 0 or "/*0000*/" not in sass.stdout:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True)
        return sass.stdout, res.stdout
    finally:
        os.unlink(path)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas_log(text: str) -> dict:
    """Registers, spill store/load bytes and stack frame from ``ptxas -v`` output (None: not there)."""
    regs, spill, stack = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text), _PTXAS_STACK.search(text)
    return dict(regs=int(regs.group(1)) if regs else None, spill_stores=int(spill.group(1)) if spill else None,
                spill_loads=int(spill.group(2)) if spill else None, stack=int(stack.group(1)) if stack else None)


def parse_res_usage(text: str) -> dict:
    """Registers, stack and shared memory from ``cuobjdump -res-usage``."""
    out = {}
    for key, name in (("REG", "regs"), ("STACK", "stack"), ("SHARED", "shared"), ("LOCAL", "local")):
        m = re.search(rf"\b{key}:(\d+)", text)
        out[name] = int(m.group(1)) if m else None
    return out


def compile_job(job: CompileJob) -> dict:
    """Compile one specialization for sm_90 and analyse it (runs in a worker process)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise OfflineError("the offline compile must not run with TRITON_INTERPRET=1")
    triton = _triton()
    try:
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise TritonApiMismatch(f"Triton {triton.__version__}: no triton.compiler.ASTSource ({exc})") from exc
    kernel = resolve_kernel(job.kernel)
    if job.source_key and kernel.cache_key != job.source_key:
        raise OfflineError(f"{job.name}: the kernel's source (or a function it calls) changed between the capture "
                           f"and the compile (file edited meanwhile?): run the model again")
    constexprs = {tuple(k) if isinstance(k, list) else k: _decode_const(v) for k, v in job.constexprs.items()}
    log = io.StringIO()
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - Triton < 3.4: no ptxas log, spills from the SASS
        knobs = None
    t0 = time.perf_counter()
    try:
        src = ASTSource(kernel, job.signature, constexprs, job.attrs)
    except TypeError as exc:
        raise TritonApiMismatch(f"Triton {triton.__version__}: ASTSource(fn, signature, constexprs, attrs) "
                                f"differs ({exc})") from exc
    old = None
    if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log (register and spill lines)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target(), options=dict(job.options))
    finally:
        if old is not None:
            knobs.nvidia.dump_ptxas_log = old
    compile_s = time.perf_counter() - t0
    asm = compiled.asm
    sass, res = _disassemble(asm["cubin"])
    md = compiled.metadata
    analysis = analyze_sass(sass, getattr(md, "name", None))
    num_stages = int(getattr(md, "num_stages", job.options.get("num_stages", 3)))
    src_loops = source_loops(asm.get("ttir", ""), asm.get("ttgir", ""), num_stages)
    analysis["timing"] = timing_records(sass, getattr(md, "name", None), load_sources(asm.get("ttgir", "")))
    usage = parse_res_usage(res)
    ptx = parse_ptxas_log(log.getvalue())
    regs = usage["regs"] if usage["regs"] is not None else ptx["regs"]
    if ptx["spill_stores"] is not None:
        spills, spill_loads, spills_source = ptx["spill_stores"], ptx["spill_loads"], "ptxas -v"
    else:
        spills, spill_loads = analysis["local_store_bytes"], analysis["local_load_bytes"]
        spills_source = "SASS STL/LDL bytes (Triton cache hit: no ptxas log)"
    return dict(
        key=job.key, name=getattr(md, "name", job.name), triton=triton.__version__, compile_s=round(compile_s, 3),
        regs=regs, spills=spills, spill_loads=spill_loads, spills_source=spills_source,
        ptxas_regs=ptx["regs"], stack=usage["stack"], smem=int(getattr(md, "shared", 0) or 0),
        num_warps=int(getattr(md, "num_warps", job.options.get("num_warps", 4))), num_stages=num_stages,
        tensor_cores=analysis["static"].get("mma", 0) > 0, analysis=analysis, src_loops=src_loops,
    )


def _compile_job_safe(job: CompileJob) -> dict:
    try:
        return compile_job(job)
    except Exception as exc:  # reported per row
        msg, cause = f"{type(exc).__name__}: {exc}", exc.__cause__ or exc.__context__
        while cause is not None:   # a CompilationError in a called jit function: the cause is chained
            msg, cause = f"{msg}\n{type(cause).__name__}: {cause}", cause.__cause__ or cause.__context__
        return dict(key=job.key, error=msg if len(msg) <= 4000 else f"{msg[:1000]} [...] {msg[-3000:]}")


def compile_jobs(jobs: Sequence[CompileJob], workers: int = MAX_WORKERS, progress=None) -> Dict[str, dict]:
    """Compile every job (at most ``MAX_WORKERS`` processes), results by key."""
    out: Dict[str, dict] = {}
    workers = max(1, min(int(workers), MAX_WORKERS, len(jobs)))
    if workers == 1 or len(jobs) < 3:  # a worker's start (torch + triton imports, ~3 s) outweighs 2 small compiles
        for job in jobs:
            out[job.key] = _compile_job_safe(job)
            if progress:
                progress(job, out[job.key])
        return out
    import concurrent.futures as cf
    import multiprocessing as mp
    env_interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(list(sys.path),)) as pool:
            futs = {pool.submit(_compile_job_safe, job): job for job in jobs}
            for fut in cf.as_completed(futs):
                job = futs[fut]
                try:
                    out[job.key] = fut.result()
                except Exception as exc:  # a crashed worker
                    out[job.key] = dict(key=job.key, error=f"{type(exc).__name__}: {exc}")
                if progress:
                    progress(job, out[job.key])
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    return out


def _worker_init(path: List[str]) -> None:
    for p in reversed(path):
        if p not in sys.path:
            sys.path.insert(0, p)
