"""``python -m ghost_kernels.bench.summary bench.json``: the short table the GPU suite prints last."""
from __future__ import annotations

import json
import sys

from .report import _fmt


def summary(data: dict) -> str:
    lines = [f"{data['device']} | {data['date']} | torch {data['torch']} | triton {data['triton']} | "
             f"driver {data.get('driver')} | " + (f"copy {data['copy_GBps']:.0f} GB/s" if data.get("copy_GBps") else
                                                  "no bandwidth (CPU run)") + f" | tests {data['tests']}",
             f"{'network Ghost modules':<24} {'dtype':<9} {'layout':<14} {'ms':>8} {'GB/s':>6} {'%copy':>6} "
             f"{'x eager':>8} {'x compile':>9}"]
    for s in data["network"]:
        lines.append(f"  {s['op'] + ' ' + s['impl']:<22} {s['dtype']:<9} {s['layout']:<14} {_fmt(s['median_ms']):>8} "
                     f"{_fmt(s['GBps'], '.0f'):>6} {_fmt(s['copy_fraction'] and 100 * s['copy_fraction'], '.0f'):>6} "
                     f"{_fmt(s.get('x_eager'), '.2f'):>8} {_fmt(s.get('x_compile'), '.2f'):>9}"
                     + ("" if s["complete"] else "  incomplete"))
    for m in data.get("model", []):
        lines.append(f"  model {m['op']} {m['impl']:<24} {_fmt(m.get('images_per_s'), '.0f'):>8} img/s "
                     f"{'' if m.get('status') == 'ok' else m.get('status', '') + ': ' + m.get('note', '')[:80]}")
    bad = [r for r in data["rows"] if r["status"] in ("wrong", "error")]
    for r in bad:
        lines.append(f"  !! {r['impl']} {r['name']} {r['dtype']} {r['layout']}: {r['status']}: {r['note'][:100]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ghost_kernels.bench.summary bench.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(summary(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
