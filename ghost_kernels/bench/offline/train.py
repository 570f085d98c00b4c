"""The training ops in the offline model: what one training step of a Ghost module moves and issues on
sm_90, per phase (forward, backward), against the training floor -- without a GPU.

``python -m ghost_kernels.bench --offline --train`` (or ``python -m ghost_kernels.bench.offline --train``)
writes ``offline-train.json`` and ``offline-train.md``; from Python :func:`model_train`.

Why a separate path from the inference rows: a training step is not one family's launcher but the
training ops' Python (``triton/train_ops.py``, ``triton/train_backward.py``), which mixes Triton
launches with torch ops (the per-tile partial sums, BatchNorm's per-channel arithmetic, and B6's two
cuBLAS GEMMs). Leaving the torch ops out would make the backward look cheap exactly where its bytes
are; so every torch op the step runs is counted too, by bytes.

How a phase's row is made
=========================

1. **Capture.** ``train_forward`` and then ``train_backward`` (the functions the custom ops
   ``ghost_kernels::triton_train_forward``/``_backward`` call; train-mode BatchNorm, batch statistics)
   run on CPU tensors of the real shapes (``cases.make_inputs``: ``torch.empty`` inputs, nothing
   touched until read) inside :func:`ghost_kernels.triton.common.capture_launches`: every Triton launch
   is recorded, not run. Where a launch's output feeds a later step (F1's partial sums -> BN1's moments
   -> F2's scale, F3's -> F4's; B1's sums -> B2's coefficients, ...), the later step runs on the uninitialised buffer: the model
   needs only shapes, strides and dtypes, so the values are irrelevant. dL/dout is an empty tensor
   shaped like ``out``.
2. **Torch ops.** The same run happens under ``train_capture.TorchTraffic``, a ``TorchDispatchMode``
   that sees every aten op the step runs (views and allocations excepted: they move nothing) and
   records its bytes, the **analytic count**: each tensor input read once (its elements as viewed),
   each output and each mutated input written once. Such entries have ``kind: "torch"``, no
   instruction count, and ``predicted_us = hbm_us`` (cuBLAS and torch's elementwise kernels are taken
   as bandwidth-bound at the model's ``HBM_RATE``). The ops still run, on the CPU, at batch 256: the
   GEMMs read zero pages, a fraction of a second per module.
3. **Triton launches** are specialized, compiled and modelled exactly as inference launches
   (``specialize.specialize_launch``, ``compiler.compile_jobs``, ``rows.model_launch``: instructions,
   registers, spills, the latency term; every pass is ``triton_two_pass``'s two kernels or B3's
   transposed stencil, gridded for 132 SMs while captured).
   Their HBM bytes are declared per kernel in ``train_capture.triton_traffic`` from the design note
   of ``triton/train_kernels.py`` (which tensor a pass reads and writes, and how much of it): a kernel
   not declared there is an error in the row, never a silent zero. Conventions: x counts once per
   pass that reads it (the channel blocks of one tile share it through L2, as the inference model
   counts ``triton_two_pass``); the stencil passes (F3, F4, B1, B2) read y1 back from ``out[:, :m]``
   (or B0's scratch) in whole 32-byte sectors where the output is channels_last (as the inference
   model counts two-pass's pass 2); B3 reads g_z2, y1 and dL/dout[:, :m] once each (its window's
   overlapping rows and columns come from L1/L2); weights and per-channel vectors count once.

The floor (:func:`train_floor`)
===============================

Forward: x read once, out written once (the inference floor, ``rows.floor_bytes``). Backward:
dL/dout read once, x read once (the backward must see the input; the output would do as well, and
for GhostNet's ratio 2 is no smaller), dL/dx written once, and the parameter gradients written once
(dL/dw1, dL/dwd and the four BatchNorm vectors, in the parameters' dtype; a few hundred KB at most).
The weight gradients' reductions over pixels are part of that floor only as their results: a kernel
that reduces on the fly moves nothing more.

Row keys
========

The inference rows' keys (``regs``, ``spills``, ``smem``, ``warp_instr``, ``floor_bytes``,
``hbm_bytes``, ``instr_per_byte``, ``issue_us``/``hbm_us``/``latency_us``, ``ctas_per_sm``, ``rounds``,
``round_trips``, ``bytes_in_flight_per_sm``, ``predicted_us``, ``variants``, ``launches``, ``error``)
plus ``phase``, ``modules`` (how many modules of the network have this shape), ``triton_bytes`` and
``torch_bytes`` (``hbm_bytes`` is their sum), ``torch_small_bytes`` (the part of ``torch_bytes`` moved by
ops none of whose tensors exceeds ``latency.L2_RESIDENT_BYTES``, 4 MiB: BatchNorm's per-channel and
per-tile statistics arithmetic, whose operands were just written and likely stay in the 50 MB L2 --
counted in ``hbm_bytes`` all the same, so that the count is an upper bound and nothing is dropped by a
guess), ``bytes_over_floor`` (``hbm_bytes / floor_bytes``) and
``max_kernel_instr_per_byte`` / ``worst_kernel``: the largest warp-instructions per byte of **its
own** HBM traffic of any Triton launch of the phase (a kernel has no floor of its own; a kernel that
moves redundant bytes is caught by ``bytes_over_floor`` instead). ``instr_per_byte`` is the phase's
warp-instructions per floor byte, as in the inference rows. Sums over the phase's launches:
``warp_instr``, ``issue_us``, ``latency_us`` (Triton launches only), ``hbm_us`` (all bytes);
``predicted_us`` is the sum of each launch's own ``max(issue, hbm, latency)`` (a phase is a sequence
of launches, each bound by its own term). ``kind`` is ``"triton"`` or ``"torch"`` per launch.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

from . import rows as terms
from .cases import LAYOUTS, _dtype_name, _interpreting, _torch_dtype
from .compiler import MAX_WORKERS
from .errors import OfflineError, TritonApiMismatch
from .rows import DEVICE_NAME, H200_COPY_BYTES_PER_S, model_launch
from .runner import (
    _shape_from_json,
    _shape_to_json,
    compile_all,
    run_child,
    specialize_all,
)
from .specialize import TARGET_ARCH, _triton
from .train_capture import (
    BYTES_BUDGET,
    FAMILY,
    KERNEL_INSTR_BUDGET,
    PHASES,
    TRAIN_KERNEL_FILES,
    capture_train,
    pass_name,
    torch_entries,
    train_floor,
    triton_traffic,
)
from .train_report import markdown, write

__all__ = ["BYTES_BUDGET", "FAMILY", "KERNEL_INSTR_BUDGET", "PHASES", "capture_train", "case_rows", "markdown",
           "model_train", "source_hashes", "summary", "train_floor", "triton_traffic", "write"]

# --------------------------------------------------------------------------------------------------
# The model

def model_train(shape_cases: Sequence, dtypes: Sequence = ("bfloat16",), layouts: Sequence[str] = ("channels_last",),
                batch: int = 256, workers: int = MAX_WORKERS, strict: bool = False,
                verbose: bool = False) -> Tuple[List[dict], dict]:
    """(rows, meta): one row per (module shape, dtype, layout, phase). ``shape_cases``: [(ModuleShape,
    count)] (``models.shape_cases``) or ModuleShapes (count 1). Under ``TRITON_INTERPRET=1`` it runs in a
    child process without the interpreter, as :func:`runner.model` does."""
    cases_in = [c if isinstance(c, tuple) else (c, 1) for c in shape_cases]
    dtypes = [_dtype_name(_torch_dtype(d)) for d in dtypes]
    for lay in layouts:
        if lay not in LAYOUTS:
            raise ValueError(f"layout {lay!r}: expected one of {LAYOUTS}")
    if _interpreting():
        return _in_child(cases_in, dtypes, layouts, batch, workers, strict, verbose)
    t_start = time.perf_counter()
    cases, jobs = [], {}
    for shape, count in cases_in:
        for dn in dtypes:
            for lay in layouts:
                case = dict(shape=shape, count=count, dtype=dn, layout=lay, error=None, phases={})
                cases.append(case)
                try:
                    for phase, (launches, ops) in capture_train(shape, _torch_dtype(dn), lay, batch).items():
                        case["phases"][phase] = (specialize_all(launches, jobs), ops)
                except TritonApiMismatch:
                    raise
                except Exception as exc:
                    if strict:
                        raise
                    case["error"] = f"capture: {type(exc).__name__}: {exc}"
    t_capture = time.perf_counter() - t_start

    results, t_compile = compile_all(jobs, workers, verbose)
    rows = [row for case in cases for row in case_rows(case, results, batch, strict)]
    meta = dict(
        triton=_triton().__version__, target=f"sm_{TARGET_ARCH}", device_model=DEVICE_NAME, batch=batch,
        family=FAMILY, phases=list(PHASES), dtypes=list(dtypes), layouts=list(layouts),
        shapes=[s.name for s, _ in cases_in], variants=len(jobs),
        compile_errors=sum(1 for r in results.values() if "error" in r),
        capture_s=round(t_capture, 2), compile_wall_s=round(t_compile, 2),
        workers=(1 if len(jobs) < 3 else max(1, min(workers, MAX_WORKERS))) if jobs else 0,
        wall_s=round(time.perf_counter() - t_start, 2),
        floor=("forward: x read + out written; backward: dL/dout read + x read + dL/dx written + parameter "
               "gradients written (bench/offline/train.py: train_floor)"),
        bytes=("Triton launches: declared per kernel (train_capture.py: triton_traffic; x once per pass, y1 read "
               "back in 32-byte sectors (channels_last), scratch in L2); torch ops "
               "(kind torch): each input read once and each output written once, counted from the aten ops the "
               "step runs"),
        instr_per_byte="warp_instr / floor_bytes (row); a launch's: warp_instr / its own hbm_bytes",
        predicted_us="sum over the phase's launches of max(issue_us, hbm_us, latency_us) (torch ops: hbm_us)",
        budget=dict(bytes_over_floor=BYTES_BUDGET, kernel_instr_per_byte=KERNEL_INSTR_BUDGET,
                    note="issue 17's CI budget (tests/test_offline_train.py)"),
        sources=source_hashes(),
    )
    meta["summary"] = summary(rows)
    return rows, meta


def case_rows(case, results, batch: int, strict: bool) -> List[dict]:
    """The forward and backward rows of one captured case."""
    shape, dn = case["shape"], case["dtype"]
    spec = shape.spec
    elem = {"bfloat16": 2, "float16": 2, "float32": 4}[dn]
    ho, wo = spec.out_hw(shape.h, shape.w)
    out = []
    for phase in PHASES:
        fb = train_floor(spec, batch, shape.h, shape.w, elem, phase)
        row = dict(family=FAMILY, phase=phase, name=shape.name, inp=spec.inp, oup=spec.oup, h=shape.h, w=shape.w,
                   ho=ho, wo=wo, kernel_size=spec.kernel_size, ratio=spec.ratio, dw_size=spec.dw_size,
                   stride=spec.stride, act=spec.act, dtype=dn, layout=case["layout"], batch=batch,
                   modules=case["count"], regs=None, spills=None, smem=None, warp_instr=None, floor_bytes=fb,
                   floor_us=fb / H200_COPY_BYTES_PER_S * 1e6, hbm_bytes=None, triton_bytes=None, torch_bytes=None,
                   torch_small_bytes=None,
                   bytes_over_floor=None, instr_per_byte=None, max_kernel_instr_per_byte=None, worst_kernel=None,
                   issue_us=None, hbm_us=None, latency_us=None, predicted_us=None, ctas_per_sm=None, rounds=None,
                   round_trips=None, bytes_in_flight_per_sm=None, variants=0, launches=[], error=case["error"])
        out.append(row)
        if row["error"]:
            continue
        pairs, ops = case["phases"][phase]
        try:
            launches = []
            for la, job in pairs:
                res = results[job.key]
                if "error" in res:
                    raise OfflineError(f"compile of {job.name}: {res['error']}")
                m = model_launch(res, la, job)
                m.update(kind="triton", **{"pass": pass_name(la, phase)},
                         **triton_traffic(la, spec, batch, shape.h, shape.w, elem))
                m["hbm_bytes"] = m["read_bytes"] + m["write_bytes"]
                m["instr_per_byte"] = m["warp_instr"] / m["hbm_bytes"] if m["hbm_bytes"] else None
                m["issue_us"], m["hbm_us"] = terms.issue_us(m["warp_instr"]), terms.hbm_us(m["hbm_bytes"])
                m["predicted_us"] = terms.predicted_us(m["warp_instr"], m["hbm_bytes"], m.get("latency_us"))
                launches.append(m)
        except Exception as exc:
            if strict:
                raise
            row["error"] = f"{type(exc).__name__}: {exc}"
            continue
        fill_row(row, launches, torch_entries(ops, phase))
    return out


def fill_row(row: dict, launches: List[dict], torch_ops: List[dict]) -> None:
    """A phase row's numbers from its Triton launches and torch entries."""
    tri = launches
    row["launches"] = tri + torch_ops
    row["variants"] = len({l["key"] for l in tri})
    row["triton_bytes"] = sum(l["hbm_bytes"] for l in tri)
    row["torch_bytes"] = sum(e["hbm_bytes"] for e in torch_ops)
    row["torch_small_bytes"] = sum(e["small_bytes"] for e in torch_ops)
    row["hbm_bytes"] = row["triton_bytes"] + row["torch_bytes"]
    row["bytes_over_floor"] = row["hbm_bytes"] / row["floor_bytes"]
    if tri:
        worst = max(tri, key=lambda l: l["instr_per_byte"] or 0)
        lat = [l.get("latency_us") for l in tri]
        slow = max(tri, key=lambda l: l.get("latency_us") or 0)
        trips = sum(l.get("round_trips") or 0 for l in tri)
        row.update(regs=max(l["regs"] or 0 for l in tri), spills=max(l["spills"] or 0 for l in tri),
                   smem=max(l["smem"] or 0 for l in tri), warp_instr=sum(l["warp_instr"] for l in tri),
                   max_kernel_instr_per_byte=worst["instr_per_byte"], worst_kernel=f"{worst['pass']} {worst['kernel']}",
                   latency_us=None if any(v is None for v in lat) else sum(lat), ctas_per_sm=slow.get("ctas_per_sm"),
                   rounds=slow.get("rounds"), round_trips=trips,
                   bytes_in_flight_per_sm=row["hbm_bytes"] / terms.H200_SMS / trips if trips else None)
        row["instr_per_byte"] = row["warp_instr"] / row["floor_bytes"]
        row["issue_us"] = terms.issue_us(row["warp_instr"])
    row["hbm_us"] = terms.hbm_us(row["hbm_bytes"])
    row["predicted_us"] = sum(l["predicted_us"] for l in row["launches"])


def summary(rows: Sequence[dict]) -> dict:
    """Per phase and for the whole step, over the rows' modules (each row weighted by ``modules``):
    bytes, floor, their ratio, Triton and torch bytes, predicted us, the worst kernel's instructions per
    byte (and where), the largest spill and register count; ``errors``: rows without numbers."""
    out: Dict[str, dict] = {}
    for phase in PHASES + ("step",):
        rs = [r for r in rows if (phase == "step" or r["phase"] == phase)]
        ok = [r for r in rs if not r.get("error")]
        acc = defaultdict(float)
        for r in ok:
            for k in ("hbm_bytes", "floor_bytes", "triton_bytes", "torch_bytes", "torch_small_bytes", "predicted_us",
                      "warp_instr"):
                acc[k] += (r[k] or 0) * r["modules"]
        worst = max(ok, key=lambda r: r["max_kernel_instr_per_byte"] or 0, default=None)
        out[phase] = dict(
            modules=sum(r["modules"] for r in ok) // (2 if phase == "step" else 1),
            hbm_bytes=acc["hbm_bytes"], floor_bytes=acc["floor_bytes"],
            bytes_over_floor=acc["hbm_bytes"] / acc["floor_bytes"] if acc["floor_bytes"] else None,
            triton_bytes=acc["triton_bytes"], torch_bytes=acc["torch_bytes"],
            torch_small_bytes=acc["torch_small_bytes"],
            bytes_over_floor_without_small=((acc["hbm_bytes"] - acc["torch_small_bytes"]) / acc["floor_bytes"]
                                            if acc["floor_bytes"] else None),
            warp_instr=acc["warp_instr"],
            predicted_us=acc["predicted_us"], floor_us=acc["floor_bytes"] / H200_COPY_BYTES_PER_S * 1e6,
            max_kernel_instr_per_byte=worst["max_kernel_instr_per_byte"] if worst else None,
            worst_kernel=f"{worst['worst_kernel']} at {worst['name']} ({worst['inp']}->{worst['oup']} @{worst['h']})"
            if worst else None,
            spills=max((r["spills"] or 0 for r in ok), default=None),
            regs=max((r["regs"] or 0 for r in ok), default=None),
            errors=len(rs) - len(ok))
    return out


# The model's files a training row depends on, besides the kernels (hashed into meta "sources")
MODEL_FILES = ("cases.py", "compiler.py", "latency.py", "mlir.py", "rows.py", "sass.py", "specialize.py", "trips.py",
               "train.py", "train_capture.py")


def source_hashes() -> Dict[str, Dict[str, str]]:
    """``{"kernels": {file: sha256[:16]}, "model": {...}}`` of :data:`TRAIN_KERNEL_FILES` and the offline
    model's files (this one included): a committed training result is checked against them."""
    pkg = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    here = os.path.dirname(os.path.abspath(__file__))

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    return {"kernels": {f: digest(os.path.join(pkg, "triton", f)) for f in TRAIN_KERNEL_FILES},
            "model": {f: digest(os.path.join(here, f)) for f in MODEL_FILES}}


# --------------------------------------------------------------------------------------------------
# The child process (the compiler does not run under TRITON_INTERPRET=1)

def _in_child(cases_in, dtypes, layouts, batch, workers, strict, verbose):
    req = dict(train=True, shapes=[_shape_to_json(s) for s, _ in cases_in], counts=[c for _, c in cases_in],
               dtypes=list(dtypes), layouts=list(layouts), batch=batch, workers=workers, strict=strict,
               verbose=verbose)
    res = run_child(req, verbose)
    if "exception" in res:
        raise OfflineError(": ".join(res["exception"]))
    return res["rows"], res["meta"]


def serve(req: dict) -> Tuple[List[dict], dict]:
    """The child's side of :func:`_in_child`'s request."""
    cases = [(_shape_from_json(d), c) for d, c in zip(req["shapes"], req["counts"])]
    return model_train(cases, req["dtypes"], req["layouts"], req["batch"], req["workers"], req["strict"],
                       req.get("verbose", False))
