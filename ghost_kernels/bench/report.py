"""Benchmark output: the stdout table, the JSON file, the markdown summary and the PNG plots."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from typing import Dict, List, Optional

from .harness import Row

COMPILE_IMPLS = ("compile", "compile_max_autotune")
# Why a CPU run has no bandwidth columns (bench.json's copy_GBps is null there).
NO_BANDWIDTH = ("GB/s and % of copy are shown for GPU runs only: they say how close a GPU kernel comes to the "
                "device's memory bandwidth; on a CPU the PyTorch paths are bound by computation and framework "
                "overhead, not memory traffic, so the same ratio would say nothing about the kernels")


def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def _speedups(rows: List[Row]) -> None:
    """Fill extra['x_eager'] and extra['x_compile'] (speedup over eager / the better compile mode)."""
    groups = defaultdict(dict)
    for r in rows:
        groups[(r.op, r.name, r.dtype, r.layout)][r.impl] = r
    for g in groups.values():
        eager = g.get("eager")
        compiled = [g[c].median_ms for c in COMPILE_IMPLS if c in g and g[c].median_ms]
        for r in g.values():
            if r.median_ms:
                if eager and eager.median_ms:
                    r.extra["x_eager"] = eager.median_ms / r.median_ms
                if compiled:
                    r.extra["x_compile"] = min(compiled) / r.median_ms


def network_sum(rows: List[Row], copy_GBps: Optional[float]) -> List[dict]:
    """Per (op, impl, dtype, layout): the sum over all modules of the network (count x median)."""
    shapes = {(r.name, r.dtype, r.layout, r.op) for r in rows}
    sums: Dict[tuple, dict] = {}
    for r in rows:
        key = (r.op, r.impl, r.dtype, r.layout)
        s = sums.setdefault(key, dict(op=r.op, impl=r.impl, dtype=r.dtype, layout=r.layout, batch=r.batch,
                                      median_ms=0.0, bytes=0, shapes=0, modules=0))
        if r.median_ms is not None:
            s["median_ms"] += r.count * r.median_ms
            s["bytes"] += r.count * r.bytes
            s["shapes"] += 1
            s["modules"] += r.count
    n_shapes = defaultdict(int)
    for name, dtype, layout, op in shapes:
        n_shapes[(op, dtype, layout)] += 1
    out = []
    for (op, impl, dtype, layout), s in sums.items():
        s["complete"] = s["shapes"] == n_shapes[(op, dtype, layout)]
        if not s["shapes"]:
            s["median_ms"] = None
        # bandwidth with a copy bandwidth to compare with only: a GPU run (NO_BANDWIDTH)
        s["GBps"] = s["bytes"] / (s["median_ms"] * 1e-3) / 1e9 if s["median_ms"] and copy_GBps else None
        s["copy_fraction"] = s["GBps"] / copy_GBps if s["GBps"] else None
        out.append(s)
    for s in out:
        peers = {p["impl"]: p for p in out if (p["op"], p["dtype"], p["layout"]) == (s["op"], s["dtype"], s["layout"])}
        if s["complete"] and s["median_ms"]:
            e = peers.get("eager")
            if e and e["complete"]:
                s["x_eager"] = e["median_ms"] / s["median_ms"]
            comp = [peers[c]["median_ms"] for c in COMPILE_IMPLS if c in peers and peers[c]["complete"]]
            if comp:
                s["x_compile"] = min(comp) / s["median_ms"]
    return out


def _pct(fraction) -> str:
    return _fmt(fraction and 100 * fraction, ".0f")


def table(rows: List[Row], sums: List[dict], copy_GBps: Optional[float], device: str) -> str:
    """The stdout table: per row, then the network's sum. Bandwidth columns only with a copy
    bandwidth to compare with (a GPU run); else a line that says why not."""
    _speedups(rows)
    bw = bool(copy_GBps)
    lines = [f"device: {device}" + (f"   copy bandwidth (read+write): {copy_GBps:.0f} GB/s" if bw else ""), ""]
    if not bw:
        lines += [NO_BANDWIDTH + ".", ""]
    hdr = f"{'module':<22} {'in':>4} {'out':>4} {'hw':>4} {'dtype':<8} {'layout':<13} {'impl':<20} {'ms':>8} " + \
          (f"{'GB/s':>7} {'%copy':>6} " if bw else "") + f"{'xeager':>7} {'xcomp':>6}  note"
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(
            f"{r.name:<22} {r.inp:>4} {r.oup:>4} {r.h:>4} {r.dtype:<8} {r.layout:<13} {r.impl:<20} "
            f"{_fmt(r.median_ms):>8} " + (f"{_fmt(r.GBps, '.0f'):>7} {_pct(r.copy_fraction):>6} " if bw else "") +
            f"{_fmt(r.extra.get('x_eager'), '.2f'):>7} {_fmt(r.extra.get('x_compile'), '.2f'):>6}  "
            f"{_note(r.status, r.note)}")
    lines += ["", "the network's Ghost modules (sum over all modules, count x time):"]
    for s in sums:
        lines.append(f"  {s['op']:<8} {s['impl']:<20} {s['dtype']:<8} {s['layout']:<13} {_fmt(s['median_ms']):>8} ms "
                     + (f"{_fmt(s['GBps'], '.0f'):>6} GB/s {_pct(s['copy_fraction']):>4}% copy  " if bw else "")
                     + f"x{_fmt(s.get('x_eager'), '.2f')} eager  x{_fmt(s.get('x_compile'), '.2f')} compile"
                     f"  [{s['modules']} modules]{'' if s['complete'] else '  (incomplete: some shapes not timed)'}")
    return "\n".join(lines)


def _note(status: str, note: str) -> str:
    """A row's note column: the status when it is not ok, and the note (also on ok rows: which backend
    ``auto`` ran, a busy machine)."""
    return note if status == "ok" else f"{status}: {note}"


def model_table(model_rows: List[dict]) -> str:
    lines = ["model level (GhostNet 1.0x, random weights):"]
    for m in model_rows:
        ips = m.get("images_per_s")
        peak = f"peak {m['peak_MiB']:.0f} MiB" if m.get("peak_MiB") else ""
        lines.append(f"  {m['op']:<6} {m['impl']:<24} {_fmt(ips, '.0f'):>8} img/s  {peak:<16} "
                     f"{'' if m.get('status') == 'ok' else m.get('status', '') + ': ' + m.get('note', '')}")
    return "\n".join(lines)


def to_json(meta: dict, rows: List[Row], sums: List[dict], model_rows: List[dict]) -> dict:
    out = dict(meta)
    out["rows"] = []
    for r in rows:
        d = asdict(r)
        d.update(d.pop("extra"))
        out["rows"].append(d)
    out["network"] = sums
    out["model"] = model_rows
    return out


def markdown(data: dict) -> str:
    bw = bool(data.get("copy_GBps"))
    lines = [f"# ghost_kernels benchmark: {data['device']}, {data['date']}", "",
             f"Batch {data.get('batch')}; {'quick run; ' if data.get('quick') else ''}run time {data.get('wall_s')} s.", "",
             f"torch {data['torch']}, triton {data['triton']}, CUDA {data['cuda']}, driver {data.get('driver')}. "
             + (f"Device-to-device copy (read + write bytes): **{data['copy_GBps']:.0f} GB/s**. " if bw else "")
             + f"Tests: {tests_line(data.get('tests'))}.", "",
             *([] if bw else [NO_BANDWIDTH + ".", ""]),
             *([f"**Warning: {data['busy']}**", ""] if data.get("busy") else []),
             "## The network's Ghost modules (count x time summed over the measured shapes; "
             "train = forward + backward, train-mode BN)", "",
             "GhostNet 1.0x has 32 Ghost modules (22 distinct shapes); `modules` says how many of them a row covers.", "",
             "| op | impl | dtype | layout | batch | modules | ms | " + ("GB/s | % of copy | " if bw else "")
             + "x eager | x best compile |",
             "|---|---|---|---|---|---|---|" + ("---|---|" if bw else "") + "---|---|"]
    for s in data["network"]:
        lines.append(f"| {s['op']} | {s['impl']} | {s['dtype']} | {s['layout']} | {s['batch']} | {s['modules']} | "
                     f"{_fmt(s['median_ms'])} | "
                     + (f"{_fmt(s['GBps'], '.0f')} | {_pct(s['copy_fraction'])} | " if bw else "")
                     + f"{_fmt(s.get('x_eager'), '.2f')} | {_fmt(s.get('x_compile'), '.2f')} |"
                     + ("" if s["complete"] else " (incomplete)"))
    lines += ["", "## Per module shape", "",
              "| op | module | in | out | H×W | dtype | layout | impl | median ms (p20–p80) | "
              + ("GB/s | % copy | " if bw else "") + "x eager | peak MiB | note |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if bw else "") + "---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['op']} | {r['name']} | {r['inp']} | {r['oup']} | {r['h']}×{r['w']} | {r['dtype']} | {r['layout']} | "
                     f"{r['impl']} | {_fmt(r['median_ms'])} ({_fmt(r['p20_ms'])}–{_fmt(r['p80_ms'])}) | "
                     + (f"{_fmt(r['GBps'], '.0f')} | {_pct(r['copy_fraction'])} | " if bw else "")
                     + f"{_fmt(r.get('x_eager'), '.2f')} | {_fmt(r.get('peak_MiB'), '.0f')} | {_note(r['status'], r['note'])} |")
    for op, why in (data.get("not_timed") or {}).items():
        lines += ["", f"Not timed for {op}, by design: " + "; ".join(f"{i} ({w})" for i, w in why.items()) + "."]
    if data.get("model_note"):
        lines += ["", data["model_note"] + "."]
    if data.get("model"):
        lines += ["", "## Model level: GhostNet 1.0x, 224², random weights, AMP (fp32 model under torch.autocast)", "",
                  "| op | impl | batch | dtype | layout | images/s | peak MiB | note |", "|---|---|---|---|---|---|---|---|"]
        for m in data["model"]:
            lines.append(f"| {m['op']} | {m['impl']} | {m.get('batch', '')} | {m.get('dtype', '')} | "
                         f"{m.get('layout', '')} | {_fmt(m.get('images_per_s'), '.0f')} | {_fmt(m.get('peak_MiB'), '.0f')} | "
                         f"{'' if m.get('status') == 'ok' else m.get('status', '') + ': ' + m.get('note', '')} |")
    return "\n".join(lines) + "\n"


def plots(data: dict, out_dir: str) -> List[str]:
    """Two PNGs: speedup over eager per shape per impl, and fraction of copy bandwidth per shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for key, fname, ylabel in (("x_eager", "speedup.png", "speedup over eager (x)"),
                               ("copy_fraction", "bandwidth.png", "fraction of device-copy bandwidth")):
        series: Dict[str, Dict[str, float]] = defaultdict(dict)
        labels: List[str] = []
        for r in data["rows"]:
            short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "channels_last": "CL", "nchw": "NCHW"}
            label = f"{r['inp']}→{r['oup']}@{r['h']} {short[r['dtype']]} {short[r['layout']]}"
            if label not in labels:
                labels.append(label)
            if r.get(key) is not None:
                series[r["impl"]][label] = r[key]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels) * max(1, len(series)) / 2), 4.5))
        width = 0.8 / len(series)
        for i, (impl, vals) in enumerate(sorted(series.items())):
            xs = [j + i * width for j, lab in enumerate(labels) if lab in vals]
            ax.bar(xs, [vals[lab] for lab in labels if lab in vals], width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        if key == "copy_fraction":
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        else:
            ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{data['device']} — batch {data.get('batch')}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{out_dir}/{fname}"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def tests_line(tests: Optional[dict]) -> str:
    if not tests:
        return "not run in this job (the GPU suite runs pytest first and passes its counts with --junit)"
    return ", ".join(f"{v} {k}" for k, v in tests.items())


def parse_junit(path: Optional[str]) -> Optional[dict]:
    """{'passed', 'failed', 'skipped'} from a pytest junit XML file; None if there is none (pytest did
    not run, or wrote nothing)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not path:
        return None
    try:
        import xml.etree.ElementTree as ET

        root = ET.parse(path).getroot()
    except Exception:
        return None
    for suite in root.iter("testsuite"):
        tests, fail = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skip = int(suite.get("skipped", 0))
        counts["failed"] += fail
        counts["skipped"] += skip
        counts["passed"] += tests - fail - skip
    return counts


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
