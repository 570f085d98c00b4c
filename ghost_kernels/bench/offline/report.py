"""The model's outputs: ``offline.json`` (``{"meta": ..., "rows": [...]}``) and ``offline.md``: a
summary with one line per shape and the families side by side, the rows ordered by shape (the
families of a shape next to each other), and a legend of every column."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DETAIL_COLUMNS = ("family", "module", "Cin->oup @H", "dtype", "layout", "chosen", "regs", "spills", "smem",
                  "ld/st bits", "bar/tile", "warp-instr (M)", "floor MB", "instr/B", "issue/floor", "hbm/floor",
                  "CTAs/SM", "rounds", "trips", "in flight KB", "issue us", "hbm us", "latency us", "pred us",
                  "variants")

LEGEND = """Legend (every time is a model's, on an H200 at batch {batch}; see ghost_kernels/bench/offline/):

* **Cin->oup @H**: input and output channels at an H x H input; **chosen**: the family `backend="triton"`
  runs for this shape (ghost_kernels/core/choice.py).
* **regs**: registers per thread (max over the call's launches); **spills**: spill-store bytes per thread;
  **smem**: shared memory per CTA, bytes.
* **ld/st bits**: the widest global load / store of the call, in bits per thread (the narrowest such widest
  over its launches); in parentheses the width that moves the most bytes (TMA counts as 128).
* **bar/tile**: modelled `BAR` (CTA barrier) instructions per tile (a persistent kernel's tile-loop iteration,
  else a program).
* **warp-instr (M)**: modelled warp-instructions per call, millions; **floor MB**: x read once + output written
  once, MB; **instr/B**: warp-instr / floor bytes, **budget {budget} (enforced by tests/test_offline_budget.py)**.
* **issue/floor**, **hbm/floor**: issue us and hbm us over the floor time (floor bytes at {copy:.0f} GB/s).
* **CTAs/SM**: resident programs per SM (registers, shared memory, warps); **rounds**: waves of programs, or
  tiles per resident program of a persistent kernel; **trips**: dependent DRAM round trips on the critical
  path of the call (memory waits / the DRAM latency); **in flight KB**: HBM bytes per SM per round trip
  (the HBM term needs {needed:.1f} KB: Little's law at the DRAM latency). CTAs/SM and rounds are the
  slowest launch's.
* **issue us**: warp-instr at {issue:.0f} G warp-instr/s; **hbm us**: HBM bytes (floor + the family's extra)
  at {hbm:.0f} GB/s; **latency us**: rounds x one program's critical path ({mem} us loaded DRAM latency,
  {l2} us for loads from tensors of at most {l2mb} MiB); **pred us** = max(issue, hbm, latency), the term that
  bounds it in parentheses (i = issue, h = hbm, l = latency).
* **variants**: distinct compiled kernels of the call.
"""


def _short(dtype: str) -> str:
    return SHORT_DTYPE.get(dtype, dtype)


def _shape(r: dict) -> str:
    return f"{r['inp']}->{r['oup']} @{r['h']}"


def _num(v, fmt: str = "{:.1f}") -> str:
    return fmt.format(v) if v is not None else "-"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def bound(r: dict) -> Optional[str]:
    """Which term sets ``predicted_us``: "issue", "hbm" or "latency" (None without a prediction)."""
    terms = {k: r.get(f"{k}_us") for k in ("issue", "hbm", "latency")}
    terms = {k: v for k, v in terms.items() if v is not None}
    return max(terms, key=lambda k: terms[k]) if terms and r.get("predicted_us") is not None else None


def _pred(r: dict) -> str:
    b = bound(r)
    return f"{r['predicted_us']:.1f} ({b[0]})" if b else "-"


def by_shape(rows: Sequence[dict]) -> List[Tuple[tuple, List[dict]]]:
    """The rows grouped by (shape, dtype, layout), in the order the shapes first appear; within a group
    the families in the order they first appear."""
    groups: Dict[tuple, List[dict]] = {}
    families: List[str] = []
    for r in rows:
        key = (r["name"], r["inp"], r["oup"], r["h"], r["w"], r["dtype"], r["layout"])
        groups.setdefault(key, []).append(r)
        if r["family"] not in families:
            families.append(r["family"])
    return [(k, sorted(v, key=lambda r: families.index(r["family"]))) for k, v in groups.items()]


def _detail(r: dict) -> str:
    head = (f"| {r['family']} | {r['name']} | {_shape(r)} | {_short(r['dtype'])} | {r['layout']} | "
            f"{'yes' if r['chosen'] else ''} |")
    if r.get("error"):
        return head + f" error: {r['error'].splitlines()[0][:120]} |" + " |" * (len(DETAIL_COLUMNS) - 7)
    issue_floor = r["issue_us"] / r["floor_us"] if r["floor_us"] and r.get("issue_us") is not None else None
    inflight = r.get("bytes_in_flight_per_sm")
    return head + (
        f" {r['regs']} | {r['spills']} | {r['smem']} | {r['ld_bits']}/{r['st_bits']} "
        f"({r['ld_bits_main']}/{r['st_bits_main']}) | {r['barriers_per_tile']:.1f} | {r['warp_instr'] / 1e6:.1f} | "
        f"{r['floor_bytes'] / 1e6:.1f} | {r['instr_per_byte']:.3f} | {_num(issue_floor, '{:.2f}')} | "
        f"{_ratio(r.get('hbm_us'), r['floor_us'])} | {_num(r.get('ctas_per_sm'), '{}')} | "
        f"{_num(r.get('rounds'), '{}')} | {_num(r.get('round_trips'), '{:.0f}')} | "
        f"{_num(inflight / 1024 if inflight else None)} | {_num(r.get('issue_us'))} | {_num(r.get('hbm_us'))} | "
        f"{_num(r.get('latency_us'))} | {_pred(r)} | {r['variants']} |")


def summary(rows: Sequence[dict]) -> List[str]:
    """One line per (shape, dtype, layout): the floor and each family's prediction side by side."""
    groups = by_shape(rows)
    families: List[str] = []
    for _, rs in groups:
        families += [r["family"] for r in rs if r["family"] not in families]
    head = "| module | Cin->oup @H | dtype | layout | floor us | " + " | ".join(f"{f} us" for f in families) + \
        " | chosen |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (name, *_), rs in groups:
        fam = {r["family"]: r for r in rs}
        cells = [_pred(fam[f]) if f in fam and not fam[f].get("error") else ("error" if f in fam else "")
                 for f in families]
        chosen = ", ".join(r["family"] for r in rs if r["chosen"]) or "-"
        r0 = rs[0]
        lines.append(f"| {name} | {_shape(r0)} | {_short(r0['dtype'])} | {r0['layout']} | {r0['floor_us']:.1f} | "
                     + " | ".join(cells) + f" | {chosen} |")
    return lines


def markdown(rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    meta = meta or {}
    lat = meta.get("latency") or {}
    lines = []
    if meta:
        lines += [f"Offline model, Triton {meta.get('triton')} {meta.get('target')}, batch {meta.get('batch')}: "
                  f"predicted time per call = max(issue, HBM, latency); instruction budget "
                  f"{_budget(meta)} warp-instructions per floor byte. {meta.get('chosen', '')}", ""]
    lines += summary(rows) + [""]
    head = "| " + " | ".join(DETAIL_COLUMNS) + " |"
    lines += [head, "|" + "---|" * len(DETAIL_COLUMNS)]
    for _, rs in by_shape(rows):
        lines += [_detail(r) for r in rs]
    if meta:
        from .rows import BYTES_NEEDED_IN_FLIGHT, H200_COPY_BYTES_PER_S, HBM_RATE, ISSUE_RATE
        lines += ["", LEGEND.format(batch=meta.get("batch"), budget=_budget(meta), copy=H200_COPY_BYTES_PER_S / 1e9,
                                    needed=lat.get("bytes_needed_in_flight_per_sm", BYTES_NEEDED_IN_FLIGHT) / 1024,
                                    issue=ISSUE_RATE / 1e9, hbm=HBM_RATE / 1e9, mem=lat.get("memory_latency_us"),
                                    l2=lat.get("l2_latency_us"), l2mb=(lat.get("l2_resident_bytes") or 0) >> 20)]
    return "\n".join(lines) + "\n"


def _budget(meta: dict):
    from .rows import INSTRUCTION_BUDGET
    return meta.get("instruction_budget", INSTRUCTION_BUDGET)


def write(out: str, rows: Sequence[dict], meta: dict, stem: str = "offline", render=None) -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` (``render(rows, meta)``, default :func:`markdown`) to the
    folder ``out``; the markdown."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    md = (render or markdown)(rows, meta)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)
    return md
