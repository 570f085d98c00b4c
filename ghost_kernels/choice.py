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
  Triton) takes the family the offline model predicts fastest: :data:`TRITON_HEURISTIC`.
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


def shape_key(spec: GhostSpec, h: int, w: int, dtype: torch.dtype, channels_last: bool) -> Tuple:
    """The table's key of a call: input H x W (not the output's), dtype and layout names."""
    return (spec.inp, spec.oup, spec.ratio, spec.dw_size, spec.stride, spec.act, int(h), int(w),
            DTYPE_NAMES.get(dtype, str(dtype)), "channels_last" if channels_last else "nchw")


def row_key(row: dict) -> Tuple:
    return (row["inp"], row["oup"], row["ratio"], row["dw_size"], row["stride"], row["act"], row["h"], row["w"],
            row["dtype"], row["layout"])


@functools.lru_cache(maxsize=None)
def load_table(path: str = TABLE_PATH) -> Dict[str, dict]:
    """{gpu name: {"capability": [major, minor], "source": ..., "rows": {key: {impl: ms}}}}."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    table = {}
    for gpu, entry in raw.get("gpus", {}).items():
        rows = {row_key(r): dict(r["ms"]) for r in entry.get("rows", [])}
        table[gpu] = dict(entry, rows=rows)
    return table


def measurements(key: Tuple, device_name: str, capability: Optional[Tuple[int, int]] = None,
                 table: Optional[dict] = None) -> Tuple[Optional[Dict[str, float]], Optional[str]]:
    """(impl -> ms, "GPU name (source)") for ``key`` on this GPU or the nearest measured one of the
    same compute capability; (None, None) when nothing was measured."""
    table = load_table() if table is None else table
    names = [device_name] + sorted(g for g, e in table.items()
                                   if g != device_name and capability is not None
                                   and tuple(e.get("capability", ())) == tuple(capability))
    for gpu in names:
        entry = table.get(gpu)
        if entry and key in entry["rows"]:
            ms = dict(entry["rows"][key])
            if "torch_folded" not in ms and "eager_folded" in ms:
                ms["torch_folded"] = ms["eager_folded"]
            return ms, f"{gpu} ({entry.get('source', 'choice_table.json')})"
    return None, None


def rank(candidates: Sequence[str], key: Tuple, device_name: str, capability: Optional[Tuple[int, int]] = None,
         heuristic: Sequence[str] = ()) -> Tuple[List[str], str]:
    """``candidates`` in the order to try them, and a sentence saying why."""
    ms, source = measurements(key, device_name, capability)
    if ms:
        measured = sorted((c for c in candidates if ms.get(c) is not None), key=lambda c: ms[c])
        rest = [c for c in heuristic if c in candidates and c not in measured]
        rest += [c for c in candidates if c not in measured and c not in rest]
        times = ", ".join(f"{c} {ms[c]:.4f} ms" for c in measured)
        return measured + rest, f"measured on {source}: {times}"
    order = [c for c in heuristic if c in candidates] + [c for c in candidates if c not in heuristic]
    return order, f"no measurement of this shape on {device_name}: heuristic order {', '.join(order)}"


def heuristic_triton_order(spec: GhostSpec, ho: int, wo: int) -> List[str]:
    """Triton families for an unmeasured shape, best predicted first. From the offline model
    (``python -m ghost_kernels.bench --offline``: modelled warp-instructions per HBM byte, sm_90):
    the band kernel (single pass, shifts in registers) first, the two-pass kernel next, the v1 halo
    kernel last (it is 3-30x over the instruction budget)."""
    return list(TRITON_FAMILIES)


def triton_family(spec: GhostSpec, h: int, w: int, dtype: torch.dtype, channels_last: bool,
                  device_name: str = "NVIDIA H200", capability: Optional[Tuple[int, int]] = (9, 0),
                  admissible: Optional[Sequence[str]] = None) -> str:
    """The family ``backend="triton"`` runs for this shape (used by the offline model's ``chosen``)."""
    ho, wo = spec.out_hw(h, w)
    candidates = [f for f in TRITON_FAMILIES if admissible is None or f in admissible]
    order, _ = rank(candidates, shape_key(spec, h, w, dtype, channels_last), device_name, capability,
                    heuristic_triton_order(spec, ho, wo))
    return order[0]
