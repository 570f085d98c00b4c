"""The model's outputs: ``offline.json`` (``{"meta": ..., "rows": [...]}``) and the ``offline.md``
table."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence


def markdown(rows: Sequence[dict], meta: Optional[dict] = None) -> str:
    head = ("| family | module | Cin->oup @H | dtype | layout | chosen | regs | spills | smem | ld/st bits | "
            "bar/tile | warp-instr (M) | floor MB | instr/B | issue/floor | hbm/floor | pred us | variants |")
    # ld/st bits: the widest global load/store, and (in parentheses) the width moving the most bytes
    lines = []
    if meta:
        lines.append(f"Offline model, Triton {meta.get('triton')} {meta.get('target')}, batch {meta.get('batch')}: "
                     f"warp-instructions per call / floor HBM bytes (budget ~0.15-0.2). {meta.get('chosen', '')}")
        lines.append("")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        short_dt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(r["dtype"], r["dtype"])
        shape = f"{r['inp']}->{r['oup']} @{r['h']}"
        if r.get("error"):
            lines.append(f"| {r['family']} | {r['name']} | {shape} | {short_dt} | {r['layout']} | "
                         f"{'yes' if r['chosen'] else ''} | error: {r['error'].splitlines()[0][:120]} |"
                         + " |" * 11)
            continue
        ratio = r["issue_us"] / r["floor_us"] if r["floor_us"] else float("nan")
        lines.append(
            f"| {r['family']} | {r['name']} | {shape} | {short_dt} | {r['layout']} | {'yes' if r['chosen'] else ''} | "
            f"{r['regs']} | {r['spills']} | {r['smem']} | {r['ld_bits']}/{r['st_bits']} "
            f"({r['ld_bits_main']}/{r['st_bits_main']}) | "
            f"{r['barriers_per_tile']:.1f} | {r['warp_instr'] / 1e6:.1f} | {r['floor_bytes'] / 1e6:.1f} | "
            f"{r['instr_per_byte']:.3f} | {ratio:.2f} | {_ratio(r.get('hbm_bytes'), r['floor_bytes'])} | "
            f"{_num(r.get('predicted_us'))} | {r['variants']} |")
    return "\n".join(lines) + "\n"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _num(v) -> str:
    return f"{v:.1f}" if v is not None else "-"


def write(out: str, rows: Sequence[dict], meta: dict) -> str:
    """Write ``offline.json`` and ``offline.md`` to the folder ``out``; the markdown table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "offline.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    md = markdown(rows, meta)
    with open(os.path.join(out, "offline.md"), "w") as f:
        f.write(md)
    return md
