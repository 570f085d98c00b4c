"""The source loops of a compiled kernel, from its TTIR and TTGIR: each ``scf.for`` with its source
line, nesting, constant trip count, and whether the pipeliner made it software-pipelined (and peeled
an epilogue). These are what the launcher's ``loops=`` trip counts describe."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

_LOCDEF_RE = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")
_FOR_RE = re.compile(r"^(\s*)(?:%[\w#:]+\s*=\s*)?scf\.for\s+%[\w]+\s*=\s*(\S+)\s+to\s+(\S+)\s+step\s+(\S+)")
_PIPELINE_OPS = ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local", "ttg.async_wait",
                 "ttng.wait_barrier", "ttng.async_tma_gather")


def _resolve_locs(lines: List[str]) -> Dict[str, Optional[Tuple[str, int]]]:
    raw = {}
    for ln in lines:
        m = _LOCDEF_RE.match(ln.strip())
        if m:
            raw[m.group(1)] = m.group(2)
    memo: Dict[str, Optional[Tuple[str, int]]] = {}

    def res(expr: str, depth=0) -> Optional[Tuple[str, int]]:
        expr = expr.strip()
        if depth > 50:
            return None
        m = re.match(r'^"([^"]*)":(\d+):\d+', expr)
        if m:
            return (m.group(1), int(m.group(2)))
        m = re.match(r"^callsite\((#loc\d*)\s+at\s+(#loc\d*)\)", expr)
        if m:
            return ref(m.group(1), depth + 1)
        m = re.match(r'^"[^"]*"\((#loc\d*)\)', expr)
        if m:
            return ref(m.group(1), depth + 1)
        m = re.match(r"^fused\[(.*)\]", expr)
        if m:
            for part in re.findall(r"#loc\d*", m.group(1)):
                r = ref(part, depth + 1)
                if r:
                    return r
        m = re.match(r"^(#loc\d*)$", expr)
        if m:
            return ref(m.group(1), depth + 1)
        return None

    def ref(name: str, depth=0):
        if name not in memo:
            memo[name] = None
            memo[name] = res(raw.get(name, ""), depth)
        return memo[name]

    return {k: ref(k) for k in raw}


def _strip_ssa(tok: str) -> str:
    return re.sub(r"_\d+$", "", tok)


def _const_value(tok: str) -> Optional[int]:
    m = re.match(r"^%c(-?\d+)(?:_i\d+|_index)?(?:_\d+)?$", tok)
    return int(m.group(1)) if m else None


_DEF_RE = re.compile(r"^\s*(%[\w]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_VALUE_RE = re.compile(r"%[\w]+")
_ITER_ARG_RE = re.compile(r"(%[\w]+)\s*=\s*(%[\w]+)")
# integer ops through which a loop bound still depends on the program id
_INDEX_OPS = ("arith.muli", "arith.addi", "arith.subi", "arith.divsi", "arith.divui", "arith.remsi", "arith.remui",
              "arith.minsi", "arith.maxsi", "arith.minui", "arith.extsi", "arith.extui", "arith.index_cast",
              "arith.trunci")


def _operands(rest: str) -> list:
    """The SSA values an op uses, in order (up to its type signature)."""
    return _VALUE_RE.findall(rest.split(" : ", 1)[0])


def _ssa_defs(lines: List[str]) -> Dict[str, Tuple[str, list]]:
    """SSA value -> (defining op, operands); a loop-carried value -> ("iter_arg", [its initial value])."""
    defs: Dict[str, Tuple[str, list]] = {}
    for ln in lines:
        m = _DEF_RE.match(ln)
        if m:
            defs[m.group(1)] = (m.group(2), _operands(m.group(3)))
        if "iter_args(" in ln:
            for carried, init in _ITER_ARG_RE.findall(ln.split("iter_args(", 1)[1].split(")", 1)[0]):
                defs[carried] = ("iter_arg", [init])
    return defs


def _from_program_id(value: str, defs, depth: int = 0) -> bool:
    """Whether an integer SSA value is computed from ``tt.get_program_id``."""
    op, ops = defs.get(value, (None, []))
    if op == "tt.get_program_id":
        return True
    return depth < 50 and op in _INDEX_OPS and any(_from_program_id(v, defs, depth + 1) for v in ops)


def mlir_loops(text: str) -> List[dict]:
    """The ``scf.for`` ops of a TTIR/TTGIR module in source (pre-)order: source line, parent,
    constant trip count (when the bounds are constants), pipelined or not, ``tt.num_stages``, and
    ``persistent``: its lower bound comes from the program id (the loop over a program's share of the
    tiles of a persistent kernel, whose grid the GPU sizes from the occupancy)."""
    lines = text.splitlines()
    locs = _resolve_locs(lines)
    defs = _ssa_defs(lines)
    out: List[dict] = []
    open_loops: List[Tuple[int, int]] = []  # (indent, index in out)
    for li, ln in enumerate(lines):
        m = _FOR_RE.match(ln)
        if m:
            indent = len(m.group(1))
            while open_loops and open_loops[-1][0] >= indent:
                open_loops.pop()
            lb, ub, step = m.group(2), m.group(3), m.group(4)
            const = None
            vals = [_const_value(t) for t in (lb, ub, step)]
            if None not in vals and vals[2] != 0:
                const = max(0, -(-(vals[1] - vals[0]) // vals[2]))
            rec = dict(line=None, parent=open_loops[-1][1] if open_loops else None, lb=lb, ub=ub, step=step,
                       const_trips=const, pipelined=False, stages=None, persistent=_from_program_id(lb, defs),
                       _start=li, _indent=indent)
            # find the closing brace of this op, its attributes and loc
            close = None
            for lj in range(li + 1, len(lines)):
                s = lines[lj]
                if s.startswith(" " * indent + "}") and (len(s) - len(s.lstrip())) == indent:
                    close = lj
                    break
            if close is not None:
                tail = lines[close]
                lm = re.search(r"loc\((#loc\d*)\)\s*$", tail)
                if lm:
                    rec["line"] = locs.get(lm.group(1))
                sm = re.search(r"tt\.num_stages\s*=\s*(\d+)", tail)
                if sm:
                    rec["stages"] = int(sm.group(1))
                # ops directly in this loop (nested scf.for regions excluded)
                depth_skip = None
                for lj in range(li + 1, close):
                    s = lines[lj]
                    ind = len(s) - len(s.lstrip())
                    if depth_skip is not None:
                        if ind == depth_skip and s.strip().startswith("}"):
                            depth_skip = None
                        continue
                    if _FOR_RE.match(s):
                        depth_skip = ind
                        continue
                    if any(op in s for op in _PIPELINE_OPS) or ("warp_group_dot" in s and "isAsync = true" in s):
                        rec["pipelined"] = True
            out.append(rec)
            open_loops.append((indent, len(out) - 1))
    for rec in out:
        rec.pop("_start"), rec.pop("_indent")
        if rec["line"] is not None:
            rec["line"] = list(rec["line"])
    return out


def source_loops(ttir: str, ttgir: str, num_stages: int) -> List[dict]:
    """TTGIR loops (what LLVM gets), with pipelining and, by comparison with the TTIR loop of the
    same line, whether the pipeliner peeled an epilogue (then ``peeled``: the steady state runs
    ``trips - (stages - 1)`` times)."""
    gl = mlir_loops(ttgir)
    il = mlir_loops(ttir) if ttir else []
    by_line: Dict[Any, List[dict]] = defaultdict(list)
    for rec in il:
        by_line[tuple(rec["line"]) if rec["line"] else None].append(rec)
    used: Dict[Any, int] = defaultdict(int)
    for rec in gl:
        k = tuple(rec["line"]) if rec["line"] else None
        cands = by_line.get(k, [])
        twin = cands[used[k]] if used[k] < len(cands) else None
        used[k] += 1
        stages = rec["stages"] or (twin["stages"] if twin and twin["stages"] else None) or num_stages
        rec["stages"] = stages
        rec["peeled"] = bool(rec["pipelined"] and twin is not None
                             and _strip_ssa(twin["ub"]) != _strip_ssa(rec["ub"]))
    return gl



# --------------------------------------------------------------------------------------------------
# Which kernel argument each global load reads (for the latency term: DRAM or L2, by the tensor's size)

_GLOBAL_LOAD_OPS = ("tt.load", "tt.descriptor_load", "tt.descriptor_gather", "ttg.async_copy_global_to_local",
                    "ttng.async_tma_copy_global_to_local", "ttng.async_tma_gather")
# ops whose result points into the same tensor as (one of) these operands
_POINTER_OPS = {"tt.addptr": (0,), "tt.splat": (0,), "tt.broadcast": (0,), "tt.expand_dims": (0,),
                "ttg.convert_layout": (0,), "tt.reshape": (0,), "tt.trans": (0,), "arith.select": (1, 2),
                "tt.make_tensor_descriptor": (0,), "tt.make_tensor_ptr": (0,), "tt.advance": (0,),
                "tt.bitcast": (0,)}
_FUNC_ARG_RE = re.compile(r"(%[\w]+)\s*:\s*!tt\.(?:ptr|tensordesc)")


def load_sources(ttgir: str) -> Dict[str, List[str]]:
    """``{"file:line": [argument names]}``: for the (innermost) source line of every global load of
    the TTGIR (``tt.load``, ``cp.async``, TMA), the kernel arguments its pointer or descriptor comes
    from (through ``tt.addptr``/``tt.splat``/layout changes/loop-carried values). A line whose pointer
    cannot be traced to an argument is left out."""
    lines = ttgir.splitlines()
    locs = _resolve_locs(lines)
    defs = _ssa_defs(lines)   # loop-carried values start as their initial values
    args = {a for ln in lines if "tt.func" in ln for a in _FUNC_ARG_RE.findall(ln)}

    def trace(value: str, depth: int = 0) -> set:
        if value in args:
            return {value[1:]}
        op, ops = defs.get(value, (None, []))
        picks = _POINTER_OPS.get(op, (0,) if op == "iter_arg" else ())
        if depth > 200:
            return set()
        return set().union(*(trace(ops[k], depth + 1) for k in picks if k < len(ops)))

    out: Dict[str, set] = defaultdict(set)
    for ln in lines:
        op = next((o for o in _GLOBAL_LOAD_OPS if re.search(rf"(^|\s){re.escape(o)}\s", ln)), None)
        lm = re.search(r"loc\((#loc\d*)\)\s*$", ln)
        if op is None or not lm or not locs.get(lm.group(1)):
            continue
        used = _operands(ln.split(op, 1)[1])
        found = trace(used[0]) if used else set()
        if found:
            f, n = locs[lm.group(1)]
            out[f"{f}:{n}"] |= found
    return {k: sorted(v) for k, v in out.items()}
