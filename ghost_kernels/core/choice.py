"""Which path runs a shape: measured per GPU and shape, with a documented heuristic elsewhere.

``choice_table.json`` (beside this file) holds GPU measurements of the eval-mode forward, per GPU
name and shape (channels, ratio, dw size, stride, activation, H x W, dtype, layout; batch 256), in
milliseconds per implementation. ``benchmarks/publish.py`` writes it from a GPU lab run
(``benchmarks/gpu_lab.sh``); nothing in it is typed by hand.

The rules:

* **Measured shape** (this GPU's name in the table, or failing that a measured GPU of the same
  compute capability, e.g. H100 <-> H200): candidates run in order of their measured time; a
  candidate without a measurement for the shape comes after every measured one. ``torch_folded`` is
  always a candidate of ``auto``, so converting a model never makes a measured shape slower than
  eager PyTorch with BN folded. (Where a run measured eager with BN folded only as the bench's
  pre-folded ``eager_folded``, that time stands in for ``torch_folded``.)
* **Unmeasured shape or GPU**: ``auto`` runs ``torch_folded``: the only GPU run so far (H200,
  2026-11-28) measured the fused v1 kernels slower than BN-folded cuDNN at every shape, and no
  fused family is assumed faster before it is measured. ``backend="triton"`` (the user asked for
  Triton) takes the family the offline model predicts fastest (:func:`heuristic_triton_order`).

The offline model's predictions (``python -m ghost_kernels.bench --offline``: modelled
warp-instructions and HBM bytes per call on sm_90, turned into a predicted time) are in the same
file, section ``offline``, written by ``benchmarks/publish.py OFFLINE_DIR``.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .spec import GhostSpec

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "choice_table.json")

# Triton families in the order backend="triton" tries them on an unmeasured shape (the first whose
# limits admit the call runs): see ``heuristic_triton_order`` for the rule and its source.
TRITON_FAMILIES = ("triton_band", "triton_two_pass", "triton_halo")

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _act_field(act: str, kernel_size: int) -> str:
    """The key's activation field; a k x k primary conv (never measured yet: the table's rows are 1x1
    modules) adds its size, so that it never borrows a 1x1 module's measurement."""
    return act if kernel_size == 1 else f"{act}:k{kernel_size}"


def _act_key(spec: GhostSpec) -> str:
    return _act_field(spec.act, spec.kernel_size)


def shape_key(spec: GhostSpec, h: int, w: int, dtype: torch.dtype, channels_last: bool) -> Tuple:
    """The table's key of a call: input H x W (not the output's), dtype and layout names."""
    return (spec.inp, spec.oup, spec.ratio, spec.dw_size, spec.stride, _act_key(spec), int(h), int(w),
            DTYPE_NAMES.get(dtype, str(dtype)), "channels_last" if channels_last else "nchw")


def spec_key(spec: GhostSpec, dtype: torch.dtype, channels_last: bool) -> Tuple:
    """The table key's parts that do not depend on the input's sizes (what is static under tracing)."""
    return (spec.inp, spec.oup, spec.ratio, spec.dw_size, spec.stride, _act_key(spec),
            DTYPE_NAMES.get(dtype, str(dtype)), "channels_last" if channels_last else "nchw")


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def row_key(row: dict) -> Tuple:
    """:func:`shape_key` of a result row (a row of a k x k module carries ``kernel_size``)."""
    k = row.get("kernel_size", 1)
    return (row["inp"], row["oup"], row["ratio"], row["dw_size"], row["stride"],
            _act_field(row["act"], k), row["h"], row["w"], row["dtype"], row["layout"])


@functools.lru_cache(maxsize=None)
def _raw(path: str = TABLE_PATH) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def offline_predictions(path: str = TABLE_PATH) -> Dict[Tuple, Dict[str, float]]:
    """{key: {family: predicted microseconds}} from the offline model (sm_90), for the heuristic."""
    rows = _raw(path).get("offline", {}).get("rows", [])
    return {row_key(r): dict(r["predicted_us"]) for r in rows}


INSTRUCTION_BUDGET = 0.25   # modelled warp-instructions per HBM byte of the floor (tests/test_offline_budget.py)


@functools.lru_cache(maxsize=None)
def offline_within_budget(path: str = TABLE_PATH) -> Dict[Tuple, Dict[str, bool]]:
    rows = _raw(path).get("offline", {}).get("rows", [])
    return {row_key(r): {f: v <= INSTRUCTION_BUDGET for f, v in r.get("instr_per_byte", {}).items()} for r in rows}


@functools.lru_cache(maxsize=None)
def load_table(path: str = TABLE_PATH) -> Dict[str, dict]:
    """{gpu name: {"capability": [major, minor], "source": ..., "rows": {key: {impl: ms}}}}."""
    raw = _raw(path)
    table = {}
    for gpu, entry in raw.get("gpus", {}).items():
        rows = {row_key(r): dict(r["ms"]) for r in entry.get("rows", [])}
        configs = {row_key(r): dict(r.get("config", {})) for r in entry.get("rows", [])}
        table[gpu] = dict(entry, rows=rows, configs=configs)
    return table


def _constant(fn):
    """Under torch.compile, call ``fn`` at trace time and keep its result as a constant: a pure function
    of static facts (the device, the module's options, the committed table; never an input size,
    which can be symbolic), so no file or device query is traced."""
    assume = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return assume(fn) if assume is not None else fn


def device_of(x: torch.Tensor) -> Tuple[str, Optional[Tuple[int, int]]]:
    """(GPU name, compute capability) of x's device; the interpreter is "CPU (Triton interpreter)"."""
    return _device_info(x.device.type, x.device.index if x.device.index is not None else -1)


@_constant
def _device_info(device_type: str, index: int) -> Tuple[str, Optional[Tuple[int, int]]]:
    if device_type == "cuda":
        return _cuda_info(torch.cuda.current_device() if index < 0 else index)
    return "CPU (Triton interpreter)", None


@functools.lru_cache(maxsize=None)   # a driver query per module call otherwise
def _cuda_info(idx: int) -> Tuple[str, Tuple[int, int]]:
    return torch.cuda.get_device_name(idx), tuple(torch.cuda.get_device_capability(idx))


# Implementations whose measured times enter the table: the backends "auto" can choose, and
# eager_folded, which stands in for torch_folded in runs that did not time it.
TABLE_IMPLS = ("torch_folded", "eager_folded", "cuda") + TRITON_FAMILIES


def offline_from_rows(rows: Sequence[dict], source: str) -> dict:
    """The table's ``offline`` section from the offline model's rows (``offline.json``: any network's
    modules, each row with its options)."""
    by_key: Dict[Tuple, dict] = {}
    for r in rows:
        if r.get("error") or r.get("predicted_us") is None:
            continue
        spec = GhostSpec(r["inp"], r["oup"], r.get("kernel_size", 1), r["ratio"], r["dw_size"], r["stride"], r["act"])
        row = dict(inp=spec.inp, oup=spec.oup, ratio=spec.ratio, dw_size=spec.dw_size, stride=spec.stride,
                   act=_act_key(spec), h=r["h"], w=r["w"], dtype=r["dtype"], layout=r["layout"])
        entry = by_key.setdefault(row_key(row), dict(row, predicted_us={}, instr_per_byte={}))
        entry["predicted_us"][r["family"]] = r["predicted_us"]
        entry["instr_per_byte"][r["family"]] = r["instr_per_byte"]
    return {"target": "sm_90", "source": source, "rows": list(by_key.values())}


def entry_from_rows(rows: Sequence[dict], device: str, capability, source: str, date: str,
                    families: Sequence[str] = TRITON_FAMILIES) -> dict:
    """A GPU's table entry from the lab's timing rows (``timing.json``: the bench's result schema with
    ``ratio``, ``dw_size``, ``act`` and, for families, the fastest ``config``; ``families``: every
    registered Triton family, whose rows enter the table too). Written by
    ``benchmarks/publish.py``; read by :func:`load_table`."""
    by_key: Dict[Tuple, dict] = {}
    for r in rows:
        if r.get("op", "forward") != "forward" or r.get("status") != "ok" or not r.get("median_ms"):
            continue
        if r["impl"] not in TABLE_IMPLS and r["impl"] not in families:
            continue
        key = row_key(r)
        entry = by_key.setdefault(key, dict(zip(("inp", "oup", "ratio", "dw_size", "stride", "act", "h", "w",
                                                 "dtype", "layout"), key), ms={}, config={}))
        entry["ms"][r["impl"]] = r["median_ms"]
        if r.get("config"):
            entry["config"][r["impl"]] = r["config"]
    return {"capability": list(capability) if capability else None, "source": source, "date": date,
            "rows": list(by_key.values())}


def _entries(device_name: str, capability, table: dict):
    """This GPU's table entry first, then those of measured GPUs with the same compute capability."""
    names = [device_name] + sorted(g for g, e in table.items()
                                   if g != device_name and capability is not None
                                   and tuple(e.get("capability", ())) == tuple(capability))
    return [(g, table[g]) for g in names if g in table]


def measured_config(family: str, x: torch.Tensor, spec: GhostSpec, dtype: torch.dtype) -> Optional[dict]:
    """The tiling the GPU lab measured fastest for ``family`` at this shape (a dict of the family's
    config fields), or None."""
    table = load_table()
    if not table:
        return None
    key = shape_key(spec, x.shape[2], x.shape[3], dtype, is_channels_last(x))
    for _, entry in _entries(*device_of(x), table):
        cfg = entry["configs"].get(key, {}).get(family)
        if cfg:
            return cfg
    return None


def measurements(key: Tuple, device_name: str, capability: Optional[Tuple[int, int]] = None,
                 table: Optional[dict] = None) -> Tuple[Optional[Dict[str, float]], Optional[str]]:
    """(impl -> ms, "GPU name (source)") for ``key`` on this GPU or the nearest measured one of the
    same compute capability; (None, None) when nothing was measured."""
    table = load_table() if table is None else table
    for gpu, entry in _entries(device_name, capability, table):
        if key in entry["rows"]:
            ms = dict(entry["rows"][key])
            if "torch_folded" not in ms and "eager_folded" in ms:
                ms["torch_folded"] = ms["eager_folded"]
            return ms, f"{gpu} ({entry.get('source', 'choice_table.json')})"
    return None, None


@_constant
def spec_measured(key: Tuple, device_name: str, capability: Optional[Tuple[int, int]] = None) -> bool:
    """Whether this GPU (or one of its compute capability) has a measurement of ``spec_key`` at any
    input size: the static fact ``auto`` decides from under torch.compile / export."""
    for _, entry in _entries(device_name, capability, load_table()):
        if any(k[:6] + k[8:] == key for k in entry["rows"]):
            return True
    return False


def rank(candidates: Sequence[str], key: Tuple, device_name: str, capability: Optional[Tuple[int, int]] = None,
         heuristic: Sequence[str] = (), complete_only: bool = False) -> Tuple[List[str], str]:
    """``candidates`` in the order to try them, and a sentence saying why. ``complete_only``: use the
    measurements only if every candidate was measured (the Triton families among themselves: a
    measured slow family must not win over an unmeasured one by being measured)."""
    ms, source = measurements(key, device_name, capability)
    measured = sorted((c for c in candidates if ms and ms.get(c) is not None), key=lambda c: ms[c])
    if ms and measured and not (complete_only and len(measured) < len(candidates)):
        rest = [c for c in heuristic if c in candidates and c not in measured]
        rest += [c for c in candidates if c not in measured and c not in rest]
        times = ", ".join(f"{c} {ms[c]:.4f} ms" for c in measured)
        return measured + rest, f"measured on {source}: {times}"
    order = [c for c in heuristic if c in candidates] + [c for c in candidates if c not in heuristic]
    what = "not every candidate measured" if measured else "no measurement"
    return order, f"{what} for this shape on {device_name}: heuristic order {', '.join(order)}"


def heuristic_triton_order(key: Tuple) -> List[str]:
    """Triton families for an unmeasured shape, fastest predicted first: by the offline model's
    predicted time (``max(warp-instructions / issue rate, HBM bytes / bandwidth)`` on sm_90, section
    ``offline`` of the table) where it has the shape; elsewhere a rule from the same model's
    numbers: the band kernel for small planes (a whole image per program: no halo and no extra
    bytes), the two-pass kernel for larger ones (within the instruction budget everywhere, at the
    price of reading y1 back), the v1 halo kernel last (3-30x over the budget)."""
    predicted = offline_predictions().get(key)
    if predicted:
        # within the instruction budget first: past it the predicted time rests on a sustained issue
        # rate that only a GPU run can confirm (ghost_kernels/bench/offline: the model's assumptions)
        within = offline_within_budget().get(key, {})
        ranked = sorted((f for f in TRITON_FAMILIES if f in predicted),
                        key=lambda f: (not within.get(f, False), predicted[f]))
        return ranked + [f for f in TRITON_FAMILIES if f not in ranked]
    h, w = key[6], key[7]
    small = (h // key[4]) * (w // key[4]) <= 256
    return ["triton_band", "triton_two_pass", "triton_halo"] if small else \
        ["triton_two_pass", "triton_band", "triton_halo"]


def triton_family(spec: GhostSpec, h: int, w: int, dtype: torch.dtype, channels_last: bool,
                  device_name: str = "NVIDIA H200", capability: Optional[Tuple[int, int]] = (9, 0),
                  admissible: Optional[Sequence[str]] = None) -> str:
    """The family ``backend="triton"`` runs for this shape (used by the offline model's ``chosen``)."""
    key = shape_key(spec, h, w, dtype, channels_last)
    candidates = [f for f in TRITON_FAMILIES if admissible is None or f in admissible]
    order, _ = rank(candidates, key, device_name, capability, heuristic_triton_order(key), complete_only=True)
    return order[0]
