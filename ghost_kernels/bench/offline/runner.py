"""The model over every case (families x shapes x dtypes x layouts): capture and specialize every
launch, compile each distinct variant once, model the rows. Under ``TRITON_INTERPRET=1`` (the
compiler does not run under the interpreter) it runs in a child process without it, which answers
a JSON request through ``python -m ghost_kernels.bench.offline --request ... --result ...``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import latency
from . import rows as terms
from .cases import (
    IMPORT_ERRORS,
    LAYOUTS,
    _dtype_name,
    _interpreting,
    _torch_dtype,
    capture,
    load_families,
    make_inputs,
    select_shapes,
)
from .compiler import MAX_WORKERS, compile_jobs
from .errors import LoopMismatch, OfflineError, TritonApiMismatch
from .rows import DEVICE_NAME, family_chooser, make_row
from .specialize import TARGET_ARCH, CompileJob, _triton, specialize_launch


def model(families: Optional[Sequence[str]] = None, shapes="all", dtypes: Sequence = ("bfloat16",),
          layouts: Sequence[str] = ("channels_last",), batch: int = 256, workers: int = MAX_WORKERS,
          imports: Sequence[str] = (), strict: bool = False, verbose: bool = False) -> Tuple[List[dict], dict]:
    """(rows, meta) of the offline model; see :func:`model_rows`."""
    shapes = select_shapes(shapes)
    dtypes = [_dtype_name(_torch_dtype(d)) for d in dtypes]
    for lay in layouts:
        if lay not in LAYOUTS:
            raise ValueError(f"layout {lay!r}: expected one of {LAYOUTS}")
    if _interpreting():
        return _model_in_child(families, shapes, dtypes, layouts, batch, workers, imports, strict, verbose)
    t_start = time.perf_counter()
    fams = load_families(imports)
    names = list(fams) if families is None else list(families)
    missing = [f for f in names if f not in fams]
    if missing:
        raise OfflineError(f"unknown famil{'y' if len(missing) == 1 else 'ies'} {missing}: registered: {sorted(fams)}"
                           + (f"; modules that failed to import: {IMPORT_ERRORS}" if IMPORT_ERRORS else ""))
    chooser, chosen_note = family_chooser()

    cases = []
    jobs: Dict[str, CompileJob] = {}
    for fam in names:
        for shape in shapes:
            for dn in dtypes:
                for lay in layouts:
                    case = dict(family=fam, shape=shape, dtype=dn, layout=lay, launches=[], error=None)
                    cases.append(case)
                    dt = _torch_dtype(dn)
                    try:
                        x, params = make_inputs(shape, dt, lay, batch)
                        unsupported = _unsupported(fam, params)
                        if unsupported:
                            raise OfflineError(f"the family does not run this module: {unsupported}")
                        launches = capture(fams[fam], x, params, dt)
                        if not launches:
                            raise OfflineError("the launcher made no launch through triton_common.launch()")
                        case["launches"] = specialize_all(launches, jobs)
                    except TritonApiMismatch:
                        raise
                    except Exception as exc:
                        if strict:
                            raise
                        case["error"] = f"capture: {type(exc).__name__}: {exc}"
    t_capture = time.perf_counter() - t_start

    users = _case_names(cases)
    results, t_compile = compile_all(jobs, workers, verbose, lambda job: users.get(job.key, job.name))

    rows = []
    for case in cases:
        rows.append(make_row(case, results, batch, chooser, strict))
    compile_times = [r["compile_s"] for r in results.values() if "compile_s" in r]
    meta = dict(
        triton=_triton().__version__, target=f"sm_{TARGET_ARCH}", device_model=DEVICE_NAME, batch=batch,
        families=names, dtypes=list(dtypes), layouts=list(layouts), shapes=[s.name for s in shapes],
        chosen=chosen_note, import_errors=dict(IMPORT_ERRORS), variants=len(jobs),
        compile_errors=sum(1 for r in results.values() if "error" in r),
        capture_s=round(t_capture, 2), compile_wall_s=round(t_compile, 2),
        compile_s_per_variant=round(sum(compile_times) / len(compile_times), 2) if compile_times else None,
        workers=(1 if len(jobs) < 3 else max(1, min(workers, MAX_WORKERS))) if jobs else 0,
        wall_s=round(time.perf_counter() - t_start, 2),
        model=("warp_instr = sum over launches of (SASS instructions weighted by the trip counts of their loops) "
               "x num_warps x programs; instr_per_byte = warp_instr / floor_bytes; floor_bytes = x read once + "
               "output written once; see ghost_kernels/bench/offline/__init__.py"),
        instruction_budget=terms.INSTRUCTION_BUDGET,
        budget=f"instr_per_byte <= {terms.INSTRUCTION_BUDGET} warp-instructions per floor byte (enforced: "
               "tests/test_offline_budget.py, choice.INSTRUCTION_BUDGET)",
        floor_us=f"floor_bytes / {terms.H200_COPY_BYTES_PER_S / 1e9:.0f} GB/s",
        hbm_bytes="floor_bytes + the family's extra_hbm_bytes(spec, n, h, w, elem, channels_last) (none: 0)",
        issue_us=f"warp_instr / {terms.ISSUE_RATE / 1e9:.0f} G warp-instr/s (132 SMs x 4 issue slots x 0.7 x 1.98 GHz)",
        hbm_us=f"hbm_bytes / {terms.HBM_RATE / 1e9:.0f} GB/s (0.85 x 4220 GB/s copy)",
        latency_us=(f"sum over launches of rounds x one program's critical path (latency.py): loaded DRAM latency "
                    f"{latency.MEMORY_LATENCY_US} us for every global load, {latency.L2_LATENCY_US} us for loads "
                    f"from tensors of at most {latency.L2_RESIDENT_BYTES >> 20} MiB (L2 hits), the SASS control "
                    "bits (stall counts, scoreboards) for the rest; resident programs per SM from registers, shared "
                    "memory and warps"),
        latency=dict(memory_latency_us=latency.MEMORY_LATENCY_US, l2_latency_us=latency.L2_LATENCY_US,
                     l2_resident_bytes=latency.L2_RESIDENT_BYTES,
                     bytes_needed_in_flight_per_sm=round(terms.BYTES_NEEDED_IN_FLIGHT)),
        predicted_us="max(issue_us, hbm_us, latency_us): assumed rates and latencies, to be checked against "
                     "the GPU lab (rows.py, latency.py)",
        sources=source_hashes(),
    )
    return rows, meta



def _case_names(cases) -> Dict[str, str]:
    """job key -> "family Cin->oup @H (module) dtype layout" of the cases that launch it (progress)."""
    names: Dict[str, List[str]] = {}
    for case in cases:
        sp = case["shape"].spec
        label = (f"{case['family']} {sp.inp}->{sp.oup} @{case['shape'].h} ({case['shape'].name}) "
                 f"{case['dtype']} {case['layout']}")
        for _, job in case["launches"]:
            names.setdefault(job.key, [])
            if label not in names[job.key]:
                names[job.key].append(label)
    kernels = {job.key: job.name for case in cases for _, job in case["launches"]}
    return {k: f"{v[0]} [{kernels[k]}]" + (f" (+{len(v) - 1} more case{'s' if len(v) > 2 else ''})" if len(v) > 1
                                           else "") for k, v in names.items()}


# The files whose contents decide a row's numbers: the Triton kernels, and the parts of the model that
# turn a compiled kernel into numbers. A committed result records their hashes (meta "sources"), so a
# test can tell whether it was made from today's code.
MODEL_FILES = ("cases.py", "compiler.py", "latency.py", "mlir.py", "rows.py", "sass.py", "specialize.py", "trips.py")


def source_hashes() -> Dict[str, Dict[str, str]]:
    """``{"kernels": {file: sha256[:16]}, "model": {...}}`` for ``ghost_kernels/triton/*.py`` and the
    offline model's ``MODEL_FILES``."""
    import hashlib
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.dirname(os.path.abspath(__file__))
    kernels = os.path.join(pkg, "triton")
    files = {"kernels": sorted(os.path.join(kernels, f) for f in os.listdir(kernels) if f.endswith(".py"))
             if os.path.isdir(kernels) else [],
             "model": [os.path.join(here, f) for f in MODEL_FILES]}
    out: Dict[str, Dict[str, str]] = {}
    for key, paths in files.items():
        out[key] = {}
        for path in paths:
            with open(path, "rb") as f:
                out[key][os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()[:16]
    return out


def model_rows(families: Optional[Sequence[str]] = None, shapes="all", dtypes: Sequence = ("bfloat16",),
               layouts: Sequence[str] = ("channels_last",), batch: int = 256, **kwargs) -> List[dict]:
    """One row per (family, shape, dtype, layout): registers, spills, shared memory, widest global
    load/store (bits; the narrowest such widest over the call's launches), barriers, modelled
    warp-instructions per call, floor bytes, ``instr_per_byte``, ``chosen``, ``variants`` and
    per-launch detail (``launches``); ``error`` says why a row has no numbers. ``shapes``: ``all``,
    ``quick``, indices / module names (comma string) or a list of ModuleShape. Works under
    ``TRITON_INTERPRET=1`` too (the model then runs in a child process without it). Keyword
    arguments: ``workers`` (<= 2), ``imports`` (modules or .py files that register families),
    ``strict`` (raise instead of recording errors in rows)."""
    return model(families, shapes, dtypes, layouts, batch, **kwargs)[0]


def _shape_to_json(s) -> dict:
    sp = s.spec
    return dict(name=s.name, h=s.h, w=s.w, spec=dict(inp=sp.inp, oup=sp.oup, kernel_size=sp.kernel_size,
                                                      ratio=sp.ratio, dw_size=sp.dw_size, stride=sp.stride, act=sp.act))


def _shape_from_json(d):
    from ...core.spec import GhostSpec, ModuleShape
    return ModuleShape(d["name"], GhostSpec(**d["spec"]), d["h"], d["w"])


def _unsupported(family: str, params) -> str:
    """Why ``family``'s declared table refuses the module of ``params`` ("" if it admits it, or if the
    family declares no table: older trees), so that a shape no kernel takes (a 3x3 primary conv, say) is
    reported as such instead of being launched with options the kernel ignores."""
    from ...triton.family import FAMILIES
    support = getattr(FAMILIES.get(family), "support", None)
    if support is None or not hasattr(support, "module_reasons"):
        return ""
    return "; ".join(support.module_reasons(params))


def specialize_all(launches, jobs: dict) -> list:
    """(launch, its compile job) per launch: one job per distinct specialization, kept in ``jobs``."""
    pairs = []
    for la in launches:
        job = specialize_launch(la)
        pairs.append((la, jobs.setdefault(job.key, job)))
    return pairs


def compile_all(jobs: dict, workers: int, verbose: bool, label=lambda job: job.name):
    """Compile every job (``compile_jobs``), saying each one's result when ``verbose``; (results,
    seconds). A Triton whose offline-compile API differs raises TritonApiMismatch (every job would fail
    alike)."""
    def progress(job, res):
        if verbose:
            msg = res.get("error") or f"{res['compile_s']:.1f} s, {res['regs']} regs"
            print(f"  compiled {label(job)}: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = compile_jobs(list(jobs.values()), workers, progress)
    api_errors = [r["error"] for r in results.values() if r.get("error", "").startswith("TritonApiMismatch")]
    if api_errors:
        raise TritonApiMismatch(api_errors[0].split(": ", 1)[1])
    return results, time.perf_counter() - t0


def _model_in_child(families, shapes, dtypes, layouts, batch, workers, imports, strict, verbose):
    """Run the model in ``python -m ghost_kernels.bench.offline`` without TRITON_INTERPRET."""
    req = dict(families=None if families is None else list(families), shapes=[_shape_to_json(s) for s in shapes],
               dtypes=list(dtypes), layouts=list(layouts), batch=batch, workers=workers,
               imports=[os.path.abspath(i) if i.endswith(".py") else i for i in imports], strict=strict,
               verbose=verbose)
    res = run_child(req, verbose)
    if "exception" in res:
        cls = {"LoopMismatch": LoopMismatch, "TritonApiMismatch": TritonApiMismatch}.get(res["exception"][0],
                                                                                          OfflineError)
        raise cls(res["exception"][1])
    return res["rows"], res["meta"]


def run_child(req: dict, verbose: bool) -> dict:
    """``req`` answered by ``python -m ghost_kernels.bench.offline --request`` in a child process without
    TRITON_INTERPRET (the compiler does not run under the interpreter): the result's JSON, which says
    ``exception`` where the child caught one; OfflineError where it wrote no result."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in sys.path if p and os.path.isdir(p)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory() as tmp:
        rq, rs = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        with open(rq, "w") as f:
            json.dump(req, f)
        proc = subprocess.run([sys.executable, "-m", "ghost_kernels.bench.offline", "--request", rq, "--result", rs],
                              env=env, cwd=pkg_root, capture_output=not verbose, text=True)
        if not os.path.exists(rs):
            raise OfflineError(f"the offline model's child process failed (rc {proc.returncode}):\n"
                               f"{(proc.stderr or '')[-4000:]}")
        with open(rs) as f:
            return json.load(f)


def serve_request(rq: str, rs: str) -> int:
    with open(rq) as f:
        req = json.load(f)
    try:
        if req.get("train"):   # the training ops' rows (train.py)
            from .train import serve
            rows, meta = serve(req)
            return _answer(rs, dict(rows=rows, meta=meta))
        rows, meta = model(req["families"], [_shape_from_json(d) for d in req["shapes"]], req["dtypes"],
                           req["layouts"], req["batch"], req["workers"], req["imports"], req["strict"],
                           req.get("verbose", False))
        out = dict(rows=rows, meta=meta)
    except OfflineError as exc:
        out = dict(exception=[type(exc).__name__, str(exc)])
    return _answer(rs, out)


def _answer(rs: str, out: dict) -> int:
    with open(rs, "w") as f:
        json.dump(out, f, default=str)
    return 0

