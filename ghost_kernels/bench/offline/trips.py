"""Trip counts -> weights: which SASS loop each ``loops=`` entry of a launch weights (by source line,
through pipelining and ptxas unrolling; :class:`LoopMismatch` when they cannot describe the kernel;
hardware wait loops take no entry and weigh 1), and the per-program counts those weights give."""
from __future__ import annotations

import itertools
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import LoopMismatch


def _fmt_line(line) -> str:
    if not line:
        return "?"
    return f"{os.path.basename(line[0])}:{line[1]}"


def _loop_table(src: List[dict], sass: List[dict], loops: Optional[Sequence[float]]) -> str:
    rows = ["source loops (TTGIR scf.for, source order):"]
    for i, s in enumerate(src):
        extra = f", constant trips {s['const_trips']}" if s.get("const_trips") is not None else ""
        pipe = f", pipelined ({s['stages']} stages)" if s.get("pipelined") else ""
        rows.append(f"  [{i}] {_fmt_line(s['line'])} parent={s['parent']}{extra}{pipe}")
    rows.append("SASS loops (backward branches, by start address):")
    for lp in sass:
        rows.append(f"  [{lp['id']}] 0x{lp['start']:04x}-0x{lp['end']:04x} depth {lp['depth']} parent={lp['parent']} "
                    f"back-edge at {_fmt_line(lp['line'])}, {lp['own']} instructions"
                    + (" (hardware wait/retry loop: not matched, once per entry)" if lp.get("wait") else ""))
    rows.append(f"loops= passed by the launcher: {None if loops is None else list(loops)}")
    return "\n".join(rows)


def assign_trips(analysis: dict, src: List[dict], loops: Optional[Sequence[float]],
                 kernel_name: str = "kernel") -> Tuple[Dict[int, float], List[dict]]:
    """The weight (executions per entry of its parent) of every SASS loop, from the launcher's
    ``loops``, and a description of the matching (one dict per SASS loop)."""
    all_sass = analysis["sass_loops"]
    # hardware wait/retry loops (sass.WAIT_TOKENS) are no source loops: once per entry, never matched
    waits = {lp["id"]: 1.0 for lp in all_sass if lp.get("wait")}
    wait_how = {i: "hardware wait/retry loop: once per entry" for i in waits}
    sass = [lp for lp in all_sass if not lp.get("wait")]
    loops = None if loops is None else [float(t) for t in loops]
    if not sass:
        # no loop survived: trip counts do not matter, as long as they can describe this kernel
        if loops and len(loops) != len(src) and not all(t <= 1 for t in loops):
            raise LoopMismatch(f"{kernel_name}: loops= has {len(loops)} trip counts, but the kernel has "
                               f"{len(src)} source loop(s) and no SASS loop"
                               + (" but hardware wait loops" if waits else "") + "\n"
                               + _loop_table(src, all_sass, loops))
        return dict(waits), _describe(all_sass, waits, wait_how, "hardware wait/retry loops only")
    if loops is None:
        raise LoopMismatch(f"{kernel_name}: the launch passes no loops= but the SASS has {len(sass)} loop(s); "
                           f"pass the average trip count of each runtime loop (source order) to "
                           f"triton_common.launch(..., loops=[...])\n" + _loop_table(src, all_sass, loops))

    # 1. source loop -> SASS loops, by the back-edge's source line (address order within a line)
    groups: Optional[List[List[int]]] = None  # per source loop: its SASS loop ids
    have_lines = all(lp["line"] for lp in sass) and all(s["line"] for s in src)
    if have_lines and src:
        by_line: Dict[tuple, List[int]] = defaultdict(list)
        for lp in sass:
            by_line[tuple(lp["line"])].append(lp["id"])
        src_by_line: Dict[tuple, List[int]] = defaultdict(list)
        for i, s in enumerate(src):
            src_by_line[tuple(s["line"])].append(i)
        groups = [[] for _ in src]
        ok = True
        for line, ids in by_line.items():
            owners = src_by_line.get(line, [])
            if not owners:
                ok = False
                break
            # siblings of one source loop: consecutive SASS loops with the same parent
            if len(ids) == len(owners):
                for o, lid in zip(owners, ids):
                    groups[o].append(lid)
            elif len(ids) > len(owners) and len(ids) % len(owners) == 0:
                k = len(ids) // len(owners)
                for j, o in enumerate(owners):
                    chunk = ids[j * k:(j + 1) * k]
                    if len({all_sass[c]["parent"] for c in chunk}) != 1:
                        ok = False
                    groups[o].extend(chunk)
            elif len(ids) < len(owners):
                # some copies unrolled away: keep address order, the first ones get a SASS loop
                # only if that is unambiguous (every copy has the same constant trip count)
                consts = {src[o]["const_trips"] for o in owners}
                if len(consts) == 1 and None not in consts:
                    for o, lid in zip(owners, ids):
                        groups[o].append(lid)
                else:
                    ok = False
            else:
                ok = False
        if not ok:
            groups = None

    # 2. loops= entries -> SASS loop weights
    weights: Dict[int, float] = {}
    how: Dict[int, str] = {}
    source: Dict[int, int] = {}   # SASS loop id -> index of its source loop
    match = None
    if groups is not None:
        surviving = [i for i, g in enumerate(groups) if g]
        for mode, idxs in (("source loops", list(range(len(src)))), ("surviving source loops", surviving)):
            kept = _align(loops, [src[i]["const_trips"] for i in idxs])
            if kept is None:
                continue
            dropped = [k for k in range(len(loops)) if k not in kept]
            match = mode + (f" (loops{dropped} <= 1 trip: loops the compiler removed)" if dropped else "")
            for si, k in zip(idxs, kept):  # a source loop without SASS loop was unrolled away
                _weigh_group(all_sass, src[si], groups[si], loops[k], weights, how, f"loops[{k}]")
                source.update((lid, si) for lid in groups[si])
            break
    if match is None and len(loops) == len(sass):
        match = "SASS loops by start address"
        for k, (lp, trips) in enumerate(zip(sass, loops)):
            weights[lp["id"]] = max(trips, 0.0)
            how[lp["id"]] = f"loops[{k}] = {trips:g}"
    if match is None:
        surviving_n = sum(1 for g in groups if g) if groups is not None else None
        raise LoopMismatch(
            f"{kernel_name}: loops= has {len(loops)} trip counts, but the kernel has {len(src)} source loop(s)"
            + (f" of which {surviving_n} survive as SASS loops" if surviving_n is not None else "")
            + f" and {len(sass)} SASS loop(s); pass one average trip count per runtime loop in source order "
            "(tl.static_range copies count separately)\n" + _loop_table(src, all_sass, loops))
    weights.update(waits)
    how.update(wait_how)
    return weights, _describe(all_sass, weights, how, match, source)


def _describe(sass: List[dict], weights: Dict[int, float], how: Dict[int, str], match: str,
              source: Optional[Dict[int, int]] = None) -> List[dict]:
    """Per SASS loop: where it is, its weight and how it got it, and ``source``: the index of the
    source loop (TTGIR) it belongs to (None: matched without source lines, or a wait loop)."""
    source = source or {}
    return [dict(id=lp["id"], start=f"0x{lp['start']:04x}", end=f"0x{lp['end']:04x}", depth=lp["depth"],
                 line=_fmt_line(lp["line"]), instrs=lp["own"], weight=weights.get(lp["id"], 0.0),
                 trips=how.get(lp["id"], "?"), match=match, wait=bool(lp.get("wait")), source=source.get(lp["id"]))
            for lp in sass]


def _align(loops: List[float], consts: List[Optional[int]]) -> Optional[List[int]]:
    """Which entries of ``loops`` describe these source loops, in order: all of them when the counts
    agree, else the others after dropping entries of at most one trip (a loop of one trip that the
    compiler removed before the TTGIR), preferring a choice that agrees with constant trip counts."""
    extra = len(loops) - len(consts)
    if extra == 0:
        return list(range(len(loops)))
    if extra < 0:
        return None
    cands = [k for k, t in enumerate(loops) if t <= 1]
    if len(cands) < extra:
        return None
    first = None
    for n, combo in enumerate(itertools.combinations(cands, extra)):
        kept = [k for k in range(len(loops)) if k not in combo]
        if first is None:
            first = kept
        if all(c is None or abs(c - loops[k]) < 0.5 for c, k in zip(consts, kept)):
            return kept
        if n > 1000:
            break
    return first


def _weigh_group(sass: List[dict], s: dict, ids: List[int], trips: float, weights: Dict[int, float],
                 how: Dict[int, str], label: str) -> None:
    trips = max(float(trips), 0.0)
    if not ids:
        return
    eff = trips
    note = f"{label} = {trips:g}"
    if s.get("pipelined") and s.get("peeled"):
        eff = max(trips - (s["stages"] - 1), 0.0)
        note += f", pipelined with peeled epilogue: {eff:g} steady-state trips"
    elif s.get("pipelined"):
        note += f", pipelined ({s['stages']} stages, epilogue predicated)"
    if len(ids) == 1:
        weights[ids[0]] = eff
        how[ids[0]] = note
        return
    # several SASS loops for one source loop: ptxas unrolled it (U-times body + remainder)
    pay = {i: max(sass[i]["payload"], 1) for i in ids}
    unit = min(pay.values())
    unroll = {i: max(1, round(pay[i] / unit)) for i in ids}
    main = max(ids, key=lambda i: (unroll[i], -i))
    u = unroll[main]
    rest = [i for i in ids if i != main]
    r = min(eff, (u - 1) / 2.0)
    weights[main] = max(eff - r, 0.0) / u
    how[main] = note + f", unrolled x{u} by ptxas: {weights[main]:.3g} trips"
    for i in rest:
        weights[i] = r / len(rest) / unroll[i]
        how[i] = note + f", remainder of the x{u} loop: {weights[i]:.3g} trips"


def weighted_counts(analysis: dict, weights: Dict[int, float]) -> Dict[str, float]:
    """Per-program (per warp) dynamic counts: each bucket times the product of its loops' weights."""
    tot = defaultdict(float)
    for b in analysis["buckets"]:
        w = 1.0
        for lid in b["loops"]:
            w *= weights.get(lid, 0.0)
        for k, v in b.items():
            if k != "loops":
                tot[k] += w * v
    return dict(tot)

