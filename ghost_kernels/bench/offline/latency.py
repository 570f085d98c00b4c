"""The latency term of the offline model: how long the programs of one launch take when each of
them waits for its own memory round trips, on an H200 (sm_90).

The instruction term (``issue_us``) charges issue slots and the HBM term (``hbm_us``) bytes; neither
sees a program that issues a load, waits for it, and only then issues the next one. This term does,
from the same SASS, in three steps.

1. **Resident programs per SM** (:func:`ctas_per_sm`): the fewest of what the registers allow
   (65536 per SM; a warp takes ``ceil(regs * 32 / 256) * 256``), what shared memory allows (228 KiB
   per SM, the kernel's ``shared`` plus 1 KiB the system reserves per CTA), 64 warps and 32 CTAs.
2. **One program's critical path** (:func:`simulate`): one warp walks the program's in-line SASS in
   address order, loops repeated by their trip counts (the weights the instruction model uses), the
   way the hardware issues it. Each instruction waits for the scoreboards in its control bits'
   wait mask (``sass.Ctrl``), issues, and holds the warp for its stall count. An instruction with a
   write scoreboard sets it to clear after its latency: global loads (``LDG``, ``LD``, ``ATOM``) after
   ``MEMORY_LATENCY_US``; ``cp.async`` (``LDGSTS``) groups committed by ``LDGDEPBAR`` clear
   ``MEMORY_LATENCY_US`` after their last copy, and ``DEPBAR.LE SBk, N`` waits until at most N are
   pending; TMA loads (``UTMALDG``) after ``MEMORY_LATENCY_US``, waited for by the next
   ``SYNCS...TRYWAIT`` in issue order (rings of buffers are filled and consumed in order; the loads
   after an mbarrier's expect-tx arrive, ``SYNCS.ARRIVE.TRANS64``, up to the next arrive or wait are
   one group); wgmma groups (``HGMMA`` ... ``gsb0``) after their tensor-core time,
   waited for by ``WARPGROUP.DEPBAR.LE gsb0, N``; shared-memory loads after ``SMEM_CYCLES``; any
   other variable-latency instruction (``S2R``, ``LDC``, ``MUFU``, ``SHFL``, conversions, a store's
   register read) after ``OTHER_CYCLES``; ``BAR.SYNC`` costs ``BARRIER_CYCLES`` (the other warps are
   assumed to arrive together: every warp of a CTA runs the same path). A load whose consumer comes
   later costs nothing extra; a prefetch issued a loop iteration ahead hides its latency behind that
   iteration -- exactly what the scoreboards say. A loop runs its first ``SIMULATED_TRIPS``
   iterations one by one (until the pipeline's steady state) and the rest at the last one's time.
   The walk yields ``issue_cycles`` (stall counts and fixed costs) and ``memory_wait_cycles`` (time
   spent waiting for global memory); ``round_trips = memory_wait_cycles / latency`` counts the
   dependent DRAM round trips on the path.
3. **Rounds.** A launch of P programs with R resident per SM runs ``rounds = ceil(P / (132 R))``
   waves; ``latency_us = rounds x`` one program's path. A persistent kernel (a top-level loop whose
   lower bound comes from the program id: the program's share of the tiles, ``mlir_loops``'
   ``persistent``) is costed per tile: on the GPU its grid is ``132 R`` programs (the launchers size
   it from the occupancy; the capture on the CPU does not), each running ``ceil(tiles / (132 R))``
   tiles, so the path is simulated with that trip count and ``rounds`` is that number of tiles.

**Bytes in flight.** ``bytes_in_flight_per_sm`` is the HBM traffic of the call per SM per dependent
round trip on the critical path (the bytes each SM has in flight while it waits), next to
``HBM_RATE x MEMORY_LATENCY_US / 132`` (``bytes_needed_in_flight``), the bytes per SM Little's law
asks for the HBM term to be the bound.

Assumptions (stated, not fitted per shape; the GPU lab checks them):

* ``MEMORY_LATENCY_US`` = 0.6 us: one loaded latency for *every* global load -- DRAM, and also L2
  and L1 hits (weights, a scratch slot just written), which come back sooner. It is the middle of
  the 0.5-0.8 us range of loaded DRAM latency the second review (``forward-performance.md``) assumed,
  and with it the term explains the v1 kernel's five H200 measurements within 30% (NOTES.md,
  2026-12-02; ``tests/test_offline_latency.py``).
* the programs of a launch run in lockstep rounds (no tail effect, no overlap of two rounds); all
  warps of a program follow one path; the warps of different resident programs only compete for
  issue slots, which is the instruction term's business: ``predicted_us = max(issue, hbm, latency)``.
* both sides of an ``if``/``else`` are walked (as the instruction model counts them), the
  out-of-line code after the last ``EXIT`` (wait retry stubs, called slow paths) is not, hardware
  wait loops are not (their wait is charged at the wait instruction).
* the SASS must carry its encodings (``nvdisasm -hex``): without control bits there is no term.
"""
from __future__ import annotations

import math
import re
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

from .sass import NO_BARRIER, Instr, find_loops, innermost_loops, is_wait, parse_sass

H200_SMS = 132
H200_CLOCK_HZ = 1.98e9
MEMORY_LATENCY_US = 0.6      # loaded DRAM latency (see the module docstring)
L2_LATENCY_US = 0.3          # loaded L2-hit latency: loads from tensors of at most L2_RESIDENT_BYTES
L2_RESIDENT_BYTES = 4 << 20  # weights, BN vectors, per-program scratch: re-read, they stay in the 50 MB L2
SMEM_CYCLES = 30             # shared-memory load (LDS, LDSM)
OTHER_CYCLES = 20            # other variable-latency results (S2R, LDC, MUFU, SHFL, conversions, register reads)
BARRIER_CYCLES = 20          # BAR.SYNC when every warp arrives together
MMA_FMA_PER_CYCLE = 2048     # wgmma: dense bf16/fp16 multiply-adds per clock per SM (989 TFLOP/s)
SIMULATED_TRIPS = 3          # loop iterations walked one by one before the steady state is assumed

# sm_90 resources per SM
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
WARPS_PER_SM = 64
CTAS_PER_SM = 32

MEMORY_OPS = {"LDG", "LD", "ATOM", "ATOMG"}
SMEM_OPS = {"LDS", "LDSM", "ATOMS"}
_MMA_SHAPE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")


def _cycles(us: float) -> float:
    return us * 1e-6 * H200_CLOCK_HZ


def ctas_per_sm(regs: Optional[int], smem: int, num_warps: int) -> Tuple[int, str]:
    """Resident CTAs (programs) per SM on sm_90, and what limits them."""
    per_warp = math.ceil((regs or 0) * 32 / 256) * 256
    limits = {"CTAs": CTAS_PER_SM, "warps": WARPS_PER_SM // num_warps}
    if per_warp:
        limits["registers"] = REGS_PER_SM // (per_warp * num_warps)
    if smem:
        limits["shared memory"] = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    limiter = min(limits, key=lambda k: limits[k])      # a tie names the first of CTAs, warps, registers
    return max(limits[limiter], 0), limiter


# --------------------------------------------------------------------------------------------------
# Timing records: the in-line instructions of a kernel, as the walk needs them (JSON-able)

def _kind(ins: Instr) -> str:
    """The instruction's role in the walk (see :func:`simulate`)."""
    b = ins.base
    if b in MEMORY_OPS:
        return "mem"
    if b == "LDGSTS":
        return "cp"
    if b == "LDGDEPBAR":
        return "commit"
    if b == "DEPBAR":
        return "depbar"
    if b.startswith("UTMALDG") or b == "UBLKCP":
        return "tma"
    if is_wait(ins) and b == "SYNCS":
        return "mbar_wait"
    if b == "SYNCS" and {"ARRIVE", "TRANS64"} <= set(ins.opcode.split(".")):
        return "mbar_expect"
    if b in SMEM_OPS:
        return "smem"
    if b == "BAR":
        return "bar"
    if b == "HGMMA":
        return "mma"
    if b == "WARPGROUP" and "DEPBAR" in ins.opcode:
        return "mma_wait"
    return "other"


def _arg(ins: Instr, kind: str, load_args: Dict[str, List[str]]):
    """The number a wait instruction waits down to (DEPBAR.LE SBk, N / WARPGROUP.DEPBAR.LE gsb0, N);
    an HGMMA's tensor-core cycles and whether it closes its group (``gsb0``); the kernel arguments a
    global load reads (from its source line, ``mlir.load_sources``; None: unknown)."""
    if kind in ("mem", "cp", "tma"):
        return load_args.get(f"{ins.loc[0][0]}:{ins.loc[0][1]}") if ins.loc else None
    if kind in ("depbar", "mma_wait"):
        m = re.search(r"(?:SB(\d)|gsb0)\s*,\s*(0x[0-9a-fA-F]+|\d+)", ins.operands)
        return [int(m.group(1)) if m and m.group(1) else 0, int(m.group(2), 0) if m else 0]
    if kind == "mma":
        m = _MMA_SHAPE.search(ins.opcode)
        fma = int(m.group(1)) * int(m.group(2)) * int(m.group(3)) if m else 64 * 64 * 16
        return [fma / MMA_FMA_PER_CYCLE, "gsb0" in ins.operands]
    return None


def timing_records(text: str, function: Optional[str] = None,
                   load_args: Optional[Dict[str, List[str]]] = None) -> Optional[List[list]]:
    """``[loops, kind, stall, wbar, rbar, wait, arg]`` per in-line instruction of the SASS in address
    order (``loops``: the ids of the loops around it, outermost first, as ``sass.analyze_sass``
    numbers them; hardware wait loops and the code after the last unconditional ``EXIT`` are left
    out). None when the text has no instruction encodings (no control bits)."""
    instrs = parse_sass(text, function)
    if not instrs or any(ins.ctrl is None for ins in instrs):
        return None
    loops, reach = find_loops(instrs)
    innermost = innermost_loops(loops, len(instrs))
    exits = [i for i, ins in enumerate(instrs) if reach[i] and ins.base == "EXIT" and not ins.predicated]
    end = exits[-1] if exits else len(instrs) - 1
    out = []
    for i, ins in enumerate(instrs[:end + 1]):
        chain = []
        lid = innermost[i]
        while lid is not None:
            chain.append(lid)
            lid = loops[lid].parent
        if not reach[i] or any(loops[l].wait for l in chain):
            continue
        kind = _kind(ins)
        c = ins.ctrl
        out.append([list(reversed(chain)), kind, c.stall, c.wbar, c.rbar, c.wait, _arg(ins, kind, load_args or {})])
    return out


# --------------------------------------------------------------------------------------------------
# The walk

class _Warp:
    """One warp's clock, and the scoreboards and asynchronous groups it may wait for."""

    def __init__(self, memory_cycles: float, l2_cycles: float, l2_args: frozenset):
        self.t = 0.0
        self.mem = memory_cycles
        self.l2 = l2_cycles
        self.l2_args = l2_args
        self.ready = [0.0] * 6            # when each scoreboard clears
        self.is_mem = [False] * 6         # ... and whether it waits for global memory
        self.cp_sb: Optional[int] = None  # the counting scoreboard of cp.async groups (LDGDEPBAR's)
        self.cp_open: Optional[float] = None
        self.tma_open = False
        self.groups = {k: deque() for k in ("cp", "tma", "mma")}   # clear times, oldest first
        self.mma_open = 0.0
        self.issue = 0.0
        self.mem_wait = 0.0

    def wait_until(self, when: float, memory: bool) -> None:
        if when > self.t:
            if memory:
                self.mem_wait += when - self.t
            self.t = when

    def shift(self, dt: float) -> None:
        """Move the clock and everything pending by ``dt`` (a loop's remaining steady-state trips)."""
        t = self.t
        self.t += dt
        self.ready = [r + dt if r > t else r for r in self.ready]
        for q in self.groups.values():
            for k, when in enumerate(q):
                if when > t:
                    q[k] = when + dt

    def step(self, rec) -> None:
        _, kind, stall, wbar, rbar, wait, arg = rec
        for sb in range(6):
            if wait >> sb & 1:
                if sb == self.cp_sb:       # every committed cp.async group
                    self._drain("cp", 0, True)
                self.wait_until(self.ready[sb], self.is_mem[sb])
        latency = getattr(self, "_" + kind)(arg)
        if kind == "commit":
            self.cp_sb = wbar if wbar != NO_BARRIER else self.cp_sb
        elif kind == "mbar_wait" and wbar == NO_BARRIER:
            self.wait_until(self.t + latency, True)
        elif wbar != NO_BARRIER:   # a phase check counts as a memory wait only while its TMA group is in flight
            self._set(wbar, self.t + latency, kind == "mem" or (kind == "mbar_wait" and latency > OTHER_CYCLES))
        if rbar != NO_BARRIER:
            self._set(rbar, self.t + OTHER_CYCLES, False)
        cost = max(stall, 1) + (BARRIER_CYCLES if kind == "bar" else 0)
        self.t += cost
        self.issue += cost

    def _set(self, sb: int, when: float, memory: bool) -> None:
        if self.ready[sb] > self.t:        # still pending: the scoreboard clears after both
            memory = memory or self.is_mem[sb]
            when = max(when, self.ready[sb])
        self.ready[sb] = when
        self.is_mem[sb] = memory

    def _drain(self, kind: str, keep: int, memory: bool) -> None:
        """Wait until at most ``keep`` groups of ``kind`` are pending."""
        q = self.groups[kind]
        while len(q) > keep:
            self.wait_until(q.popleft(), memory)

    def _load_latency(self, args) -> float:
        """L2 for a load whose every source argument is L2-resident, else DRAM (also when unknown)."""
        return self.l2 if args and all(a in self.l2_args for a in args) else self.mem

    # the instruction kinds: each returns the latency of its result (cycles after issue)
    def _mem(self, args) -> float:
        return self._load_latency(args)

    def _smem(self, _) -> float:
        return SMEM_CYCLES

    def _cp(self, args) -> float:
        self.cp_open = max(self.cp_open or 0.0, self.t + self._load_latency(args))
        return OTHER_CYCLES

    def _commit(self, _) -> float:
        self.groups["cp"].append(self.t if self.cp_open is None else self.cp_open)
        self.cp_open = None
        return OTHER_CYCLES

    def _depbar(self, arg) -> float:
        self._drain("cp", arg[1], True)
        return OTHER_CYCLES

    def _tma(self, args) -> float:
        q = self.groups["tma"]
        done = self.t + self._load_latency(args)
        if self.tma_open and q:            # another box of the same group (same mbarrier wait)
            q[-1] = max(q[-1], done)
        else:
            q.append(done)
        self.tma_open = True
        return OTHER_CYCLES

    def _mbar_expect(self, _) -> float:
        """An mbarrier's expect-tx arrive: the TMA loads after it are the next group."""
        self.tma_open = False
        return OTHER_CYCLES

    def _mbar_wait(self, _) -> float:
        """An mbarrier phase check: done when the oldest pending TMA group has landed."""
        self.tma_open = False
        q = self.groups["tma"]
        return max(OTHER_CYCLES, q.popleft() - self.t) if q else OTHER_CYCLES

    def _mma(self, arg) -> float:
        cycles, closes = arg
        self.mma_open = max(self.mma_open, self.t) + cycles
        if closes:
            self.groups["mma"].append(self.mma_open)
        return OTHER_CYCLES

    def _mma_wait(self, arg) -> float:
        self._drain("mma", arg[1], False)
        return OTHER_CYCLES

    def _other(self, _) -> float:
        return OTHER_CYCLES

    _bar = _other


def _tree(records: Sequence[list]) -> list:
    """Nest the records by their loops: a list of records and ``(loop id, [body])`` items."""
    root: list = []
    stack: List[Tuple[Optional[int], list]] = [(None, root)]
    for rec in records:
        chain = rec[0]
        depth = 0
        while depth + 1 < len(stack) and depth < len(chain) and stack[depth + 1][0] == chain[depth]:
            depth += 1
        del stack[depth + 1:]
        for lid in chain[depth:]:
            body: list = []
            stack[-1][1].append((lid, body))
            stack.append((lid, body))
        stack[-1][1].append(rec)
    return root


def _run(items: list, warp: _Warp, weights: Dict[int, float]) -> None:
    for it in items:
        if isinstance(it, tuple):
            _run_loop(it[1], warp, weights.get(it[0], 0.0), weights)
        else:
            warp.step(it)


def _run_loop(body: list, warp: _Warp, trips: float, weights: Dict[int, float]) -> None:
    """``trips`` iterations: the first ``SIMULATED_TRIPS`` walked, the rest at the last one's cost."""
    if trips <= 0:
        return
    walked = min(math.ceil(trips), SIMULATED_TRIPS)
    dt = di = dw = 0.0
    for _ in range(walked):
        t, i, w = warp.t, warp.issue, warp.mem_wait
        _run(body, warp, weights)
        dt, di, dw = warp.t - t, warp.issue - i, warp.mem_wait - w
    rest = trips - walked                 # negative for a fractional trip count
    if rest:
        warp.shift(rest * dt)
        warp.issue += rest * di
        warp.mem_wait += rest * dw


def simulate(records: Sequence[list], weights: Dict[int, float], l2_args: frozenset = frozenset(),
             memory_us: float = MEMORY_LATENCY_US, l2_us: float = L2_LATENCY_US) -> dict:
    """One warp's walk through a program: ``cycles`` (its critical path), ``issue_cycles``,
    ``memory_wait_cycles`` and ``round_trips`` (the memory waits in DRAM latencies). ``l2_args``:
    the kernel arguments whose loads hit L2."""
    mem = _cycles(memory_us)
    warp = _Warp(mem, _cycles(l2_us), frozenset(l2_args))
    _run(_tree(records), warp, weights)
    return dict(cycles=warp.t, issue_cycles=warp.issue, memory_wait_cycles=warp.mem_wait,
                round_trips=warp.mem_wait / mem if mem else 0.0)


def l2_resident(arg_bytes: Dict[str, int]) -> frozenset:
    """The kernel arguments (by name) small enough to be served from L2: at most ``L2_RESIDENT_BYTES``."""
    return frozenset(name for name, nbytes in arg_bytes.items() if nbytes <= L2_RESIDENT_BYTES)


def launch_latency(records: Optional[Sequence[list]], weights: Dict[int, float], programs: int, regs: Optional[int],
                   smem: int, num_warps: int, tile_loop: Optional[int] = None,
                   arg_bytes: Optional[Dict[str, int]] = None) -> dict:
    """The latency term of one launch (see the module docstring). ``tile_loop``: the SASS loop id of
    a persistent kernel's tile loop (None: one tile per program); ``arg_bytes``: the bytes of each
    tensor argument (by name), which decide DRAM or L2 latency for its loads."""
    ctas, limiter = ctas_per_sm(regs, smem, num_warps)
    out = dict(ctas_per_sm=ctas, occupancy_limit=limiter, latency_us=None, rounds=None, round_trips=None,
               path_us=None)
    if not records or ctas <= 0:
        return out
    slots = H200_SMS * ctas
    weights = dict(weights)
    if tile_loop is not None:     # persistent: slots programs, each running its share of the tiles
        tiles = programs * weights.get(tile_loop, 0.0)
        rounds = max(math.ceil(tiles / slots - 1e-9), 1) if tiles else 0
        weights[tile_loop] = float(rounds)
        passes = 1
    else:
        rounds = math.ceil(programs / slots)
        passes = rounds
    path = simulate(records, weights, l2_resident(arg_bytes or {}))
    cycles = path["cycles"] * passes
    out.update(rounds=rounds, latency_us=cycles / H200_CLOCK_HZ * 1e6, path_us=path["cycles"] / H200_CLOCK_HZ * 1e6,
               round_trips=path["round_trips"] * passes, issue_cycles=path["issue_cycles"] * passes,
               memory_wait_cycles=path["memory_wait_cycles"] * passes)
    return out
