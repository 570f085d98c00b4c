"""``offline-train.md`` and ``offline-train.json``: the training model's summary per phase, one line
per module and phase, and every launch (``train.py``)."""
from __future__ import annotations

from typing import Sequence

from . import report
from .train_capture import BYTES_BUDGET, FAMILY, KERNEL_INSTR_BUDGET

SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
SMALL_SHARE = 0.01   # torch ops below this share of a row's bytes: one summed line in the launch table


def _mb(v) -> str:
    return f"{v / 1e6:.1f}" if v is not None else "-"


def _f(v, fmt="{:.2f}") -> str:
    return fmt.format(v) if v is not None else "-"


def markdown(rows: Sequence[dict], meta: dict) -> str:
    """The summary per phase, one line per module and phase, then every launch."""
    s = meta["summary"]
    lines = [f"Offline model of the training ops (`{FAMILY}`: train_ops.py / train_backward.py), Triton "
             f"{meta.get('triton')} {meta.get('target')}, batch {meta.get('batch')}, "
             f"{', '.join(SHORT.get(d, d) for d in meta.get('dtypes', []))} {', '.join(meta.get('layouts', []))}; "
             f"network {meta.get('network', '-')}. Floor: {meta.get('floor')}. Bytes: {meta.get('bytes')}.", "",
             "| phase | modules | bytes GB | floor GB | bytes / floor | Triton GB | torch GB (of which small ops) | "
             "bytes / floor without small torch ops | worst instr/B (kernel) | spills | max regs | predicted us | "
             "floor us |", "|" + "---|" * 13]
    for phase, v in s.items():
        lines.append(f"| {phase} | {v['modules']} | {v['hbm_bytes'] / 1e9:.2f} | {v['floor_bytes'] / 1e9:.2f} | "
                     f"{_f(v['bytes_over_floor'])} | {v['triton_bytes'] / 1e9:.2f} | {v['torch_bytes'] / 1e9:.2f} "
                     f"({v['torch_small_bytes'] / 1e9:.2f}) | {_f(v['bytes_over_floor_without_small'])} | "
                     f"{_f(v['max_kernel_instr_per_byte'], '{:.3f}')} ({v['worst_kernel']}) | {v['spills']} | "
                     f"{v['regs']} | {v['predicted_us']:.0f} | {v['floor_us']:.0f} |")
    lines += ["", f"Budget (issue 17, CI): bytes / floor <= {BYTES_BUDGET} over the modules, every training kernel "
                  f"<= {KERNEL_INSTR_BUDGET} warp-instructions per byte of its own traffic.", "",
              "| module | Cin->oup @H | x | dtype | layout | phase | MB | floor MB | bytes / floor | torch MB | "
              "warp-instr (M) | instr/floor B | worst kernel instr/B | regs | spills | predicted us |",
              "|" + "---|" * 16]
    for r in rows:
        head = (f"| {r['name']} | {r['inp']}->{r['oup']} @{r['h']} | {r['modules']} | "
                f"{SHORT.get(r['dtype'], r['dtype'])} | {r['layout']} | {r['phase']} |")
        if r.get("error"):
            lines.append(head + f" error: {r['error'].splitlines()[0][:120]} |" + " |" * 9)
            continue
        lines.append(head + f" {_mb(r['hbm_bytes'])} | {_mb(r['floor_bytes'])} | {_f(r['bytes_over_floor'])} | "
                     f"{_mb(r['torch_bytes'])} | {_f((r['warp_instr'] or 0) / 1e6, '{:.1f}')} | "
                     f"{_f(r['instr_per_byte'], '{:.3f}')} | {_f(r['max_kernel_instr_per_byte'], '{:.3f}')} "
                     f"({r['worst_kernel']}) | {r['regs']} | {r['spills']} | {_f(r['predicted_us'], '{:.1f}')} |")
    lines += ["", f"Launches (kind torch: counted by bytes, no instructions; torch ops under {SMALL_SHARE:.0%} of "
                  "their row's bytes are summed in one line per row, each op is in the JSON):", "",
              "| module | phase | pass | kernel | kind | grid / calls | regs | spills | CTAs/SM | rounds | "
              "warp-instr (M) | MB | instr/B | issue us | hbm us | latency us | pred us | traffic |",
              "|" + "---|" * 18]
    for r in rows:
        launches = r.get("launches") or ()
        small = [l for l in launches if l["kind"] == "torch" and l["hbm_bytes"] < SMALL_SHARE * r["hbm_bytes"]]
        for l in [l for l in launches if not any(l is x for x in small)]:
            tri = l["kind"] == "triton"
            lines.append(
                f"| {r['name']} | {r['phase']} | {l['pass']} | {l['kernel']} | {l['kind']} | "
                f"{'x'.join(map(str, l['grid'])) if tri else l['calls']} | {_f(l.get('regs'), '{}')} | "
                f"{_f(l.get('spills'), '{}')} | {_f(l.get('ctas_per_sm'), '{}')} | {_f(l.get('rounds'), '{}')} | "
                f"{_f(l['warp_instr'] / 1e6 if tri else None, '{:.1f}')} | {_mb(l['hbm_bytes'])} | "
                f"{_f(l.get('instr_per_byte'), '{:.3f}')} | {_f(l.get('issue_us'), '{:.1f}')} | "
                f"{_f(l.get('hbm_us'), '{:.1f}')} | {_f(l.get('latency_us'), '{:.1f}')} | "
                f"{_f(l.get('predicted_us'), '{:.1f}')} | {l.get('traffic') or l.get('note')} |")
        if small:
            nbytes, us = sum(l["hbm_bytes"] for l in small), sum(l["predicted_us"] for l in small)
            lines.append(f"| {r['name']} | {r['phase']} | torch | {len(small)} other ops | torch | "
                         f"{sum(l['calls'] for l in small)} | - | - | - | - | - | {_mb(nbytes)} | - | - | "
                         f"{us:.1f} | - | {us:.1f} | {', '.join(l['kernel'] for l in small)} |")
    return "\n".join(lines) + "\n"


def write(out: str, rows: Sequence[dict], meta: dict) -> str:
    """Write ``offline-train.json`` and ``offline-train.md`` to the folder ``out``; the markdown."""
    return report.write(out, rows, meta, "offline-train", markdown)
