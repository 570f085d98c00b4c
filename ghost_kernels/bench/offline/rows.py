"""Rows of the model: one launch's modelled counts (:func:`model_launch`), and one case's row (its
launches summed or maxed, the floor and HBM bytes, the issue, floor and predicted times on an H200,
``chosen``)."""
from __future__ import annotations

from typing import Dict, Optional

from .cases import _torch_dtype
from .errors import OfflineError
from .latency import H200_CLOCK_HZ, H200_SMS, MEMORY_LATENCY_US, launch_latency
from .specialize import CompileJob
from .trips import _fmt_line, assign_trips, weighted_counts

H200_COPY_BYTES_PER_S = 4223e9       # measured copy bandwidth (benchmarks/results, 2026-11-28)
DEVICE_NAME = "NVIDIA H200"
try:   # the enforced budget: warp-instructions per floor byte (tests/test_offline_budget.py)
    from ...core.choice import INSTRUCTION_BUDGET
except ImportError:   # an older tree
    INSTRUCTION_BUDGET = 0.25

# predicted_us = max(issue_us, hbm_us, latency_us): issue_us = warp_instr / ISSUE_RATE, hbm_us =
# hbm_bytes / HBM_RATE, latency_us from latency.py (MEMORY_LATENCY_US). ASSUMPTIONS, not measurements of
# these kernels: to be checked against the GPU lab (ncu's smsp__inst_executed.sum, stall reasons and
# DRAM throughput, and the measured times of benchmarks/) and corrected here and in latency.py.
ISSUE_SLOTS_PER_SM = 4               # 4 SM sub-partitions, one warp-instruction per clock each
ISSUE_SUSTAINED = 0.7                # sustained fraction of the issue slots (assumed)
ISSUE_RATE = H200_SMS * ISSUE_SLOTS_PER_SM * ISSUE_SUSTAINED * H200_CLOCK_HZ   # warp-instructions / s
HBM_COPY_BYTES_PER_S = 4.22e12       # copy bandwidth measured on an H200, 2026-11-28
                                     # (benchmarks/results/2026-11-28-nvidia-h200-quick.json: copy_GBps 4222.5)
HBM_SUSTAINED = 0.85                 # fraction of the copy bandwidth a kernel sustains (assumed)
HBM_RATE = HBM_SUSTAINED * HBM_COPY_BYTES_PER_S                                # bytes / s


def model_launch(result: dict, launch, job: CompileJob) -> dict:
    """One launch: the variant's static facts and its modelled warp-instructions."""
    programs = 1
    for g in launch.grid:
        programs *= int(g)
    warps = result["num_warps"]
    analysis = result["analysis"]
    weights, desc = assign_trips(analysis, result["src_loops"], launch.loops, result["name"])
    per_warp = weighted_counts(analysis, weights)
    instr_per_program = per_warp.get("n", 0.0) * warps
    tile_loop = _tile_loop(analysis["sass_loops"], desc, result["src_loops"])
    tile_unit, per_tile = "program", 1.0
    if tile_loop is not None and weights.get(tile_loop, 0) > 0:
        # a persistent kernel: a tile is one iteration of its loop over the program's share of the tiles
        line = next(lp["line"] for lp in analysis["sass_loops"] if lp["id"] == tile_loop)
        tile_unit, per_tile = f"iteration of the loop at {_fmt_line(line)}", weights[tile_loop]
    lat = launch_latency(analysis.get("timing"), weights, programs, result["regs"], result["smem"], warps, tile_loop,
                         arg_bytes(launch))
    bar_prog = per_warp.get("bar", 0.0)
    dyn = {kind: {int(k[3:]): v * warps * programs for k, v in per_warp.items() if k.startswith(kind) and k[3:]}
           for kind in ("ldg", "stg")}
    return dict(
        kernel=result["name"], key=job.key, grid=list(launch.grid), programs=programs, num_warps=warps,
        num_stages=result["num_stages"], loops=None if launch.loops is None else list(launch.loops),
        specialization=job.specialization, regs=result["regs"], spills=result["spills"],
        spill_loads=result["spill_loads"], spills_source=result["spills_source"], smem=result["smem"],
        ld_bits=analysis["ld_bits"], st_bits=analysis["st_bits"], ld_hist=analysis["ld_hist"],
        st_hist=analysis["st_hist"], ld_bits_main=_main_width(dyn["ldg"]), st_bits_main=_main_width(dyn["stg"]),
        ldg_by_bits={str(k): v for k, v in sorted(dyn["ldg"].items())},
        stg_by_bits={str(k): v for k, v in sorted(dyn["stg"].items())},
        barriers_static=analysis["static"].get("bar", 0),
        barriers_per_program=bar_prog, barriers_per_tile=bar_prog / per_tile if per_tile else bar_prog,
        tile_unit=tile_unit, mma_static=analysis["static"].get("mma", 0),
        tma_loads_static=analysis["static"].get("tma_loads", 0),
        mma_warp_instr=per_warp.get("mma", 0.0) * warps * programs,
        static_instrs=analysis["static"]["instrs"], instr_per_warp=per_warp.get("n", 0.0),
        instr_per_program=instr_per_program, warp_instr=instr_per_program * programs,
        ldg_warp_instr=per_warp.get("ldg", 0.0) * warps * programs,
        stg_warp_instr=per_warp.get("stg", 0.0) * warps * programs,
        compile_s=result["compile_s"], sass_loops=desc, **lat,
    )


def _tile_loop(sass_loops, desc, src_loops) -> Optional[int]:
    """The SASS loop of a persistent kernel's tile loop: a top-level loop (no hardware wait loop) whose
    source loop starts from the program id (``mlir_loops``' ``persistent``); None for a kernel without."""
    source = {d["id"]: d.get("source") for d in desc}
    for lp in sass_loops:
        si = source.get(lp["id"])
        if lp["parent"] is None and not lp.get("wait") and si is not None and src_loops[si].get("persistent"):
            return lp["id"]
    return None


def arg_bytes(launch) -> Dict[str, int]:
    """The bytes of the storage behind each tensor (or tensor descriptor) argument of a launch, by the
    kernel's parameter names."""
    out = {}
    for name, value in zip(launch.kernel.arg_names, launch.args):
        tensor = getattr(value, "base", value)          # a TensorDescriptor's tensor
        storage = getattr(tensor, "untyped_storage", None)
        if storage is not None:
            out[name] = storage().nbytes()
    return out


def _main_width(hist: Dict[int, float]) -> Optional[int]:
    """The access width (bits) that moves the most bytes, from modelled warp-instructions per width."""
    hist = {b: n for b, n in hist.items() if n > 0}
    return max(hist, key=lambda b: (hist[b] * b, b)) if hist else None


def family_chooser():
    """(``choice.triton_family`` or None, the meta note on how ``chosen`` is decided)."""
    try:
        from ...core import choice
    except ImportError as exc:
        return None, f"ghost_kernels.core.choice is not importable ({exc}): chosen is False on every row"
    fn = getattr(choice, "triton_family", None)
    if fn is None:
        return None, "ghost_kernels.core.choice has no triton_family(): chosen is False on every row"
    return fn, "chosen: ghost_kernels.core.choice.triton_family(spec, h, w, dtype, channels_last, device_name='NVIDIA H200')"


def floor_bytes(spec, n: int, h: int, w: int, elem: int) -> int:
    """The HBM bytes no implementation can avoid: x read once, the output written once."""
    ho, wo = spec.out_hw(h, w)
    return n * spec.inp * h * w * elem + n * spec.oup * ho * wo * elem


def hbm_bytes(family: str, spec, n: int, h: int, w: int, elem: int, channels_last: bool) -> int:
    """The HBM bytes a call of ``family`` moves: the floor plus the family's ``extra_hbm_bytes`` (none
    defined: 0)."""
    from ...triton import family as triton_family
    fam = triton_family.FAMILIES.get(family)
    extra = getattr(fam, "extra_hbm_bytes", None)
    more = int(extra(spec, n, h, w, elem, channels_last)) if extra is not None else 0
    return floor_bytes(spec, n, h, w, elem) + more


def issue_us(warp_instr: float) -> float:
    """The call's warp-instructions at the sustained issue rate (µs)."""
    return warp_instr / ISSUE_RATE * 1e6


def hbm_us(hbm: float) -> float:
    """The call's HBM bytes at the sustained HBM rate (µs)."""
    return hbm / HBM_RATE * 1e6


def predicted_us(warp_instr: float, hbm: float, latency: Optional[float] = None) -> float:
    """The call's time bound by instruction issue, HBM or latency, whichever is slowest (µs); without
    a latency term (no control bits in the SASS) the larger of the other two."""
    return max(issue_us(warp_instr), hbm_us(hbm), latency or 0.0)


BYTES_NEEDED_IN_FLIGHT = HBM_RATE * MEMORY_LATENCY_US * 1e-6 / H200_SMS   # Little's law, per SM


def latency_terms(launches, hbm: Optional[float]) -> dict:
    """The row's latency facts: ``latency_us`` (the launches run one after the other: summed, None
    if any launch has none), the occupancy, rounds and round trips of the launch that takes longest,
    and ``bytes_in_flight_per_sm``: HBM bytes per SM per dependent round trip of the call."""
    lat = [l.get("latency_us") for l in launches]
    if not launches or any(v is None for v in lat):
        return dict(latency_us=None, ctas_per_sm=None, rounds=None, round_trips=None, bytes_in_flight_per_sm=None)
    worst = max(launches, key=lambda l: l["latency_us"])
    trips = sum(l["round_trips"] for l in launches)
    return dict(latency_us=sum(lat), ctas_per_sm=worst["ctas_per_sm"], rounds=worst["rounds"], round_trips=trips,
                bytes_in_flight_per_sm=hbm / H200_SMS / trips if hbm and trips else None)


def make_row(case, results, batch, chooser, strict) -> dict:
    """The row of one case (its captured launches and their compile results by key)."""
    shape, dn, lay = case["shape"], case["dtype"], case["layout"]
    spec = shape.spec
    dt = _torch_dtype(dn)
    elem = {"bfloat16": 2, "float16": 2, "float32": 4}[dn]
    ho, wo = spec.out_hw(shape.h, shape.w)
    fb = floor_bytes(spec, batch, shape.h, shape.w, elem)
    row = dict(family=case["family"], name=shape.name, inp=spec.inp, oup=spec.oup, h=shape.h, w=shape.w, ho=ho,
               wo=wo, kernel_size=spec.kernel_size, ratio=spec.ratio, dw_size=spec.dw_size, stride=spec.stride,
               act=spec.act, dtype=dn,
               layout=lay, batch=batch, regs=None, spills=None, smem=None, ld_bits=None, st_bits=None,
               ld_bits_main=None, st_bits_main=None,
               barriers=None, barriers_per_tile=None, mma=None, warp_instr=None, floor_bytes=fb,
               instr_per_byte=None, floor_us=fb / H200_COPY_BYTES_PER_S * 1e6, issue_us=None, chosen=False,
               variants=len({job.key for _, job in case["launches"]}), launches=[], error=case["error"],
               hbm_bytes=None, hbm_us=None, latency_us=None, ctas_per_sm=None, rounds=None, round_trips=None,
               bytes_in_flight_per_sm=None, predicted_us=None)
    try:
        row["hbm_bytes"] = hbm_bytes(case["family"], spec, batch, shape.h, shape.w, elem, lay == "channels_last")
    except Exception as exc:
        if strict:
            raise
        row["hbm_bytes_error"] = f"{type(exc).__name__}: {exc}"
    if chooser is not None:
        try:
            row["chosen"] = chooser(spec, shape.h, shape.w, dt, lay == "channels_last",
                                    device_name=DEVICE_NAME) == case["family"]
        except Exception as exc:
            row["chosen"] = False
            row["chosen_error"] = f"{type(exc).__name__}: {exc}"
    if row["error"]:
        return row
    launches = []
    try:
        for la, job in case["launches"]:
            res = results[job.key]
            if "error" in res:
                raise OfflineError(f"compile of {job.name}: {res['error']}")
            launches.append(model_launch(res, la, job))
    except Exception as exc:
        if strict:
            raise
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    row["launches"] = launches
    row.update(
        regs=max(l["regs"] or 0 for l in launches), spills=max(l["spills"] for l in launches),
        smem=max(l["smem"] for l in launches),
        **{k: min((l[k] for l in launches if l[k]), default=None)
           for k in ("ld_bits", "st_bits", "ld_bits_main", "st_bits_main")},
        barriers=sum(l["barriers_static"] for l in launches),
        barriers_per_tile=max(l["barriers_per_tile"] for l in launches),
        mma=sum(l["mma_static"] for l in launches),
        tma_loads=sum(l.get("tma_loads_static", 0) for l in launches),
        warp_instr=sum(l["warp_instr"] for l in launches),
    )
    row["instr_per_byte"] = row["warp_instr"] / fb if fb else None
    row["issue_us"] = issue_us(row["warp_instr"])
    row.update(latency_terms(launches, row["hbm_bytes"]))
    if row["hbm_bytes"] is not None:
        row["hbm_us"] = hbm_us(row["hbm_bytes"])
        row["predicted_us"] = predicted_us(row["warp_instr"], row["hbm_bytes"], row["latency_us"])
    return row
