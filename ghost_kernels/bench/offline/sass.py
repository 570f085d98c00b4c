"""SASS of one compiled kernel: parsing (``nvdisasm -c -gi -hex`` / ``cuobjdump -sass``), the
control-flow graph and its natural loops, and the static, trip-count-independent counts the model
weights (instructions, barriers, tensor-core instructions, global loads/stores by width, local
memory). With the instruction encodings in the text (``-hex``; ``cuobjdump -sass`` prints them),
each instruction also carries its scheduling control bits (:class:`Ctrl`), which the latency term
(``latency.py``) reads."""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from .errors import OfflineError

# Opcode families (the part of the opcode before the first '.')
GLOBAL_LOADS = {"LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LD"}
GLOBAL_STORES = {"STG", "UTMASTG", "ST"}
TENSOR_CORE = {"HGMMA", "HMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "DMMA", "OMMA", "UTCHMMA", "UTCQMMA"}
BARRIERS = {"BAR"}
# Hardware wait/retry ("spin") loops: a loop of at most WAIT_LOOP_MAX instructions, with no loop inside,
# around a wait instruction -- an mbarrier phase check (``SYNCS.PHASECHK.TRANS64.TRYWAIT``, the wait of a
# TMA load or of ``ttng.wait_barrier``) or ``NANOSLEEP`` -- whose other instructions only branch, compute
# integers/predicates or poll memory. ptxas emits them for the waits, not for source loops: they are not
# matched against ``loops=`` and count once per entry (see the package docstring).
WAIT_TOKENS = {"PHASECHK", "TRYWAIT", "TRY_WAIT", "TEST_WAIT", "TESTWAIT"}   # tokens of SYNCS.* waits
WAIT_OPS = {"NANOSLEEP"}
WAIT_LOOP_ALLOWED = {
    "BRA", "NOP", "BSSY", "BSYNC", "WARPSYNC", "YIELD", "BMOV", "BREAK", "DEPBAR",                     # control
    "IADD3", "IADD", "IMAD", "ISETP", "MOV", "SEL", "LOP3", "LOP", "PLOP3", "SHF", "SHL", "SHR", "LEA",   # integer
    "IMNMX", "P2R", "R2P", "S2R", "S2UR", "CS2R", "VOTE", "VOTEU", "ELECT", "FLO", "POPC", "R2UR", "UIADD3",
    "UISETP", "UMOV", "ULOP3", "USEL", "UPLOP3", "USHF", "ULEA", "UIMAD", "ULDC", "LDC",
    "LDG", "LD", "LDS", "ATOM", "ATOMG", "ATOMS", "CCTL", "CCTLL", "MEMBAR", "FENCE", "ERRBAR",          # polling
}
WAIT_LOOP_MAX = 32
_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "32": 32, "64": 64, "128": 128}


NO_BARRIER = 7          # the scoreboard index meaning "none" in the control bits


@dataclasses.dataclass(frozen=True)
class Ctrl:
    """The scheduling control bits ptxas writes into every sm_70+ instruction (bits 105-125 of the
    128-bit word, i.e. bits 41-61 of its upper 64-bit half): ``stall`` cycles before the warp's next
    instruction may issue, ``yield``, the scoreboard the instruction sets when its result is written
    (``wbar``; variable-latency instructions: memory, S2R, MUFU, ...) or when its source registers
    have been read (``rbar``; stores), 7 meaning none, and ``wait``: the mask of scoreboards (bit k =
    SB k) that must clear before it issues. This is how a warp waits on a load: the consumer's wait
    mask names the load's ``wbar``."""
    stall: int
    yld: bool
    wbar: int
    rbar: int
    wait: int

    @classmethod
    def decode(cls, high: int) -> "Ctrl":
        """From the upper 64-bit half of the instruction encoding."""
        return cls(stall=(high >> 41) & 0xF, yld=bool((high >> 45) & 1), wbar=(high >> 46) & 0x7,
                   rbar=(high >> 49) & 0x7, wait=(high >> 52) & 0x3F)


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str            # "" or "@P0", "@!P1", ...
    opcode: str          # "LDG.E.128"
    operands: str
    loc: Tuple[Tuple[str, int], ...]   # source location, innermost first (empty: none)
    target: Optional[int] = None       # branch target address
    ctrl: Optional[Ctrl] = None        # control bits (None: the text had no encodings)

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def predicated(self) -> bool:
        return bool(self.pred) and self.pred not in ("@PT", "@UPT")


_INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_HEX_TAIL_RE = re.compile(r"/\*\s*(0x[0-9a-fA-F]{16})\s*\*/\s*$")    # an encoding after the instruction
_HEX_ONLY_RE = re.compile(r"^\s*/\*\s*(0x[0-9a-fA-F]{16})\s*\*/\s*$")  # the encoding's upper half
_LABEL_RE = re.compile(r"^\s*(\.?[A-Za-z_$][\w.$]*):\s*$")
_LOC_RE = re.compile(r'"([^"]*)", line (\d+)')   # 'File "a.py", line 12 inlined at "b.py", line 30'
_TARGET_LABEL_RE = re.compile(r"`\(([^)]+)\)")
_TARGET_HEX_RE = re.compile(r"^(0x[0-9a-fA-F]+)\b")


_SECTION_RE = re.compile(r"^\s*(?://-+\s*\.text\.([\w$.]+)\s*-+|Function\s*:\s*([\w$.]+))\s*$")


def split_functions(text: str) -> Dict[str, str]:
    """The disassembly of each function (``.text.<name>`` section of nvdisasm, ``Function :`` of
    cuobjdump), in order; a text without headers is one function named ''."""
    out: Dict[str, List[str]] = {}
    cur = ""
    for line in text.splitlines():
        m = _SECTION_RE.match(line)
        if m:
            cur = m.group(1) or m.group(2)
            out.setdefault(cur, [])
            continue
        out.setdefault(cur, []).append(line)
    return {k: "\n".join(v) for k, v in out.items() if any(_INSTR_RE.match(x) for x in v)}


def parse_sass(text: str, function: Optional[str] = None) -> List[Instr]:
    """Instructions of one function (``function``, else the first) in ``nvdisasm -c [-g|-gi]`` or
    ``cuobjdump -sass`` text, with branch targets resolved to addresses and each instruction's source
    location. Other functions (``noinline`` callees) are not part of it."""
    funcs = split_functions(text)
    if funcs:
        text = funcs.get(function) if function in funcs else next(iter(funcs.values()))
    instrs: List[Instr] = []
    labels: Dict[str, int] = {}
    pending_labels: List[str] = []
    loc: Tuple[Tuple[str, int], ...] = ()
    loc_block_open = False
    low_pending = False     # the last instruction's line had the lower half of its encoding
    for line in text.splitlines():
        h = _HEX_ONLY_RE.match(line)
        if h:
            if low_pending:
                instrs[-1].ctrl = Ctrl.decode(int(h.group(1), 16))
            low_pending = False
            continue
        s = line.strip()
        if s.startswith("//##"):
            if not loc_block_open:  # the first line of a block is the full inline chain
                loc = tuple((f, int(n)) for f, n in _LOC_RE.findall(s))
                loc_block_open = True
            continue
        m = _INSTR_RE.match(line)
        if m:
            loc_block_open = False
            addr = int(m.group(1), 16)
            body = m.group(2).strip()
            if body.startswith("{"):  # dual-issue syntax of old architectures
                body = body.strip("{} ")
            pred = ""
            if body.startswith("@"):
                pred, _, body = body.partition(" ")
                body = body.strip()
            opcode, _, operands = body.partition(" ")
            for lab in pending_labels:
                labels[lab] = addr
            pending_labels = []
            instrs.append(Instr(addr, pred, opcode, operands.strip(), loc))
            low_pending = bool(_HEX_TAIL_RE.search(line))
            continue
        m = _LABEL_RE.match(line)
        if m:
            pending_labels.append(m.group(1))
    for ins in instrs:
        if ins.base in ("BRA", "BRX", "JMP", "JMX", "CALL", "BSSY", "BREAK", "SSY", "PBK", "PCNT"):
            t = _TARGET_LABEL_RE.search(ins.operands)
            if t and t.group(1) in labels:
                ins.target = labels[t.group(1)]
            else:
                h = _TARGET_HEX_RE.match(ins.operands.split(",")[-1].strip()) or _TARGET_HEX_RE.match(ins.operands)
                if h:
                    ins.target = int(h.group(1), 16)
    return instrs


_JUMPS = ("BRA", "JMP")                 # direct jumps with a target
_ENDS = ("EXIT", "RET", "KILL")          # end of the thread's path when not predicated


@dataclasses.dataclass
class SassLoop:
    id: int
    header: int                 # index of the header instruction
    latches: List[int]          # indices of the back-edge branches
    body: frozenset             # instruction indices in the loop
    parent: Optional[int] = None
    depth: int = 0
    wait: bool = False          # a hardware wait/retry loop (see WAIT_TOKENS), not a source loop

    def start(self, instrs) -> int:
        return instrs[min(self.body)].addr

    def end(self, instrs) -> int:
        return instrs[max(self.body)].addr


def _successors(instrs: List[Instr]) -> List[List[int]]:
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    succ: List[List[int]] = []
    for i, ins in enumerate(instrs):
        out = []
        falls = True
        if ins.base in _JUMPS and ins.target is not None:
            if ins.target in index:
                out.append(index[ins.target])
            falls = ins.predicated
        elif ins.base in _ENDS:
            falls = ins.predicated
        if falls and i + 1 < len(instrs):
            out.append(i + 1)
        succ.append(out)
    return succ


def is_wait(ins: Instr) -> bool:
    """An instruction that waits in hardware: an mbarrier phase check (try/test wait) or NANOSLEEP."""
    return ins.base in WAIT_OPS or (ins.base == "SYNCS" and bool(WAIT_TOKENS & set(ins.opcode.split(".")[1:])))


def _dominated_by(succ: List[List[int]], n: int, head: int) -> List[bool]:
    """Which instructions every path from the entry to them passes ``head`` on (``head`` included)."""
    seen = [False] * n
    if head != 0 and n:
        stack = [0]
        while stack:
            i = stack.pop()
            if seen[i] or i == head:
                continue
            seen[i] = True
            stack.extend(j for j in succ[i] if not seen[j])
    return [not v for v in seen]


def find_loops(instrs: List[Instr]) -> Tuple[List[SassLoop], List[bool]]:
    """Natural loops of the back edges -- backward branches (target address <= the branch's) whose
    target dominates them --, merged per header, with nesting, and which of them are hardware wait
    loops (``wait``); and which instructions are reachable from the entry. A backward branch whose
    target does not dominate it is no loop: it is the jump back of an out-of-line block (ptxas puts
    the retry path of an mbarrier wait after the last EXIT and jumps back to the instruction after
    the wait)."""
    succ = _successors(instrs)
    n = len(instrs)
    reach = [False] * n
    stack = [0] if n else []
    while stack:
        i = stack.pop()
        if reach[i]:
            continue
        reach[i] = True
        stack.extend(j for j in succ[i] if not reach[j])
    pred: List[List[int]] = [[] for _ in range(n)]
    for i in range(n):
        if reach[i]:
            for j in succ[i]:
                pred[j].append(i)
    by_header: Dict[int, List[int]] = defaultdict(list)
    dominated: Dict[int, List[bool]] = {}
    for i, ins in enumerate(instrs):
        if reach[i] and ins.base in _JUMPS and ins.target is not None and ins.target <= ins.addr:
            for j in succ[i]:
                if instrs[j].addr == ins.target:
                    if j not in dominated:
                        dominated[j] = _dominated_by(succ, n, j)
                    if dominated[j][i]:
                        by_header[j].append(i)
    loops: List[SassLoop] = []
    for h in sorted(by_header):
        body = {h}
        work = [l for l in by_header[h] if l != h]
        body.update(work)
        while work:
            k = work.pop()
            for p in pred[k]:
                if p not in body:
                    body.add(p)
                    work.append(p)
        loops.append(SassLoop(len(loops), h, by_header[h], frozenset(body)))
    loops.sort(key=lambda lp: (min(lp.body), -len(lp.body)))
    for k, lp in enumerate(loops):
        lp.id = k
    for lp in loops:
        containing = [o for o in loops if o is not lp and lp.header in o.body and len(o.body) > len(lp.body)]
        if containing:
            lp.parent = min(containing, key=lambda o: len(o.body)).id
    for lp in loops:
        d, p = 0, lp.parent
        while p is not None:
            d, p = d + 1, loops[p].parent
        lp.depth = d
    has_child = {lp.parent for lp in loops if lp.parent is not None}
    for lp in loops:
        if lp.id in has_child or len(lp.body) > WAIT_LOOP_MAX:
            continue
        body = [instrs[i] for i in lp.body]
        lp.wait = any(is_wait(ins) for ins in body) and all(is_wait(ins) or ins.base in WAIT_LOOP_ALLOWED
                                                            for ins in body)
    return loops, reach


def innermost_loops(loops: List[SassLoop], n: int) -> List[Optional[int]]:
    """The id of the innermost loop around each of ``n`` instructions (None: none)."""
    innermost: List[Optional[int]] = [None] * n
    for lp in sorted(loops, key=lambda lp: -len(lp.body)):  # smaller bodies overwrite: innermost wins
        for i in lp.body:
            innermost[i] = lp.id
    return innermost


def access_bits(ins: Instr) -> int:
    """Bits moved per thread by a global/shared/local memory instruction (TMA: 128)."""
    if ins.base.startswith("UTMA") or ins.base == "UBLKCP":
        return 128
    bits = 32
    for tok in ins.opcode.split(".")[1:]:
        if tok in _WIDTH_TOKENS:
            bits = _WIDTH_TOKENS[tok]
    return bits


def _kind(ins: Instr) -> Optional[str]:
    if ins.base in GLOBAL_LOADS:     # generic LD/ST are counted as global (Triton emits ld.global)
        return "ldg"
    if ins.base in GLOBAL_STORES:
        return "stg"
    return None


def analyze_sass(text: str, function: Optional[str] = None) -> dict:
    """The static, trip-count-independent part of the model for one compiled kernel (JSON-able):
    loops, and per set of enclosing loops ("bucket") the counts of instructions, barriers,
    tensor-core instructions and global loads/stores (by width)."""
    instrs = parse_sass(text, function)
    if not instrs:
        raise OfflineError("no SASS instructions found in the disassembly")
    loops, reach = find_loops(instrs)
    innermost = innermost_loops(loops, len(instrs))
    buckets: Dict[Tuple[int, ...], Dict[str, int]] = {}
    static = defaultdict(int)
    hist: Dict[str, Dict[int, int]] = {"ldg": defaultdict(int), "stg": defaultdict(int)}
    ld_hist, st_hist = hist["ldg"], hist["stg"]
    local_store_bytes = local_load_bytes = 0
    for i, ins in enumerate(instrs):
        if not reach[i]:
            continue
        chain: List[int] = []
        lid = innermost[i]
        while lid is not None:
            chain.append(lid)
            lid = loops[lid].parent
        key = tuple(reversed(chain))
        b = buckets.setdefault(key, defaultdict(int))
        b["n"] += 1
        static["instrs"] += 1
        kind = _kind(ins)
        if kind is not None:
            bits = access_bits(ins)
            b[kind] += 1
            b[f"{kind}{bits}"] += 1
            hist[kind][bits] += 1
        if ins.base in BARRIERS:
            b["bar"] += 1
            static["bar"] += 1
        if ins.base in TENSOR_CORE:
            b["mma"] += 1
            static["mma"] += 1
        if ins.base.startswith("UTMALDG"):   # TMA: a bulk copy engine moves the box, not this thread
            static["tma_loads"] += 1
        if ins.base == "STL":
            local_store_bytes += access_bits(ins) // 8
        elif ins.base == "LDL":
            local_load_bytes += access_bits(ins) // 8
    sass_loops = []
    for lp in loops:
        latch = instrs[max(lp.latches)]
        own = sum(1 for i in lp.body if innermost[i] == lp.id and reach[i])
        latch_line = latch.loc[0] if latch.loc else None
        payload = sum(1 for i in lp.body if innermost[i] == lp.id and reach[i]
                      and (not instrs[i].loc or instrs[i].loc[0] != latch_line))
        sass_loops.append(dict(
            id=lp.id, parent=lp.parent, depth=lp.depth, start=lp.start(instrs), end=lp.end(instrs),
            line=list(latch_line) if latch_line else None,
            chain=[list(x) for x in latch.loc], own=own, payload=payload if latch_line else own,
            bar=sum(1 for i in lp.body if instrs[i].base in BARRIERS), wait=lp.wait))
    return dict(
        static=dict(static), sass_loops=sass_loops,
        buckets=[dict(loops=list(k), **v) for k, v in buckets.items()],
        ld_hist={str(k): v for k, v in sorted(ld_hist.items())},
        st_hist={str(k): v for k, v in sorted(st_hist.items())},
        ld_bits=max(ld_hist) if ld_hist else None, st_bits=max(st_hist) if st_hist else None,
        local_store_bytes=local_store_bytes, local_load_bytes=local_load_bytes,
    )

