"""The offline performance model (ghost_kernels/bench/offline/), checked on small kernels of its own.

Pure parts (SASS parsing, loops, trip-count weighting, widths, ptxas/cuobjdump/MLIR parsing) run in
this process. Whatever compiles runs in a child process without TRITON_INTERPRET (the compiler does
not run under the interpreter): this file is also that child's script (``python
tests/test_offline_model.py checks``), and it is the ``--import`` file that registers the test's own
kernel family, ``offline_test_copy``, in the CLI's child. The family is registered only there (module
name from ``offline.load_module_file``), never in the pytest process, so no other test sees it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from ghost_kernels.bench import offline  # noqa: E402
from ghost_kernels.bench.offline import compiler, latency, report, specialize  # noqa: E402
from ghost_kernels.core.layout import empty_output  # noqa: E402
from ghost_kernels.triton import common as tc  # noqa: E402

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

# --------------------------------------------------------------------------------------------------
# The test's kernels and its family


@triton.jit
def _offline_copy_kernel(x_ptr, y_ptr, n_blocks, BLOCK: tl.constexpr):
    """Persistent streaming copy: a runtime loop with a runtime step (ptxas cannot unroll it)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for i in range(pid, n_blocks, nprog):
        o = i * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + o, tl.load(x_ptr + o))


@triton.jit
def _offline_strided_kernel(x_ptr, y_ptr, n, sx, sy, BLOCK: tl.constexpr):
    """Strided copy, for the specialization of pointers and integers."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o * sy, tl.load(x_ptr + o * sx, mask=o < n), mask=o < n)


@triton.jit
def _offline_sum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """A small runtime loop with a constant step: ptxas unrolls it (x4 body + remainder loop)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(0, n):
        acc += tl.load(x_ptr + o + k * BLOCK).to(tl.float32)
    tl.store(y_ptr + o, acc)


@triton.jit
def _offline_dot_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """A K loop with tl.dot: software-pipelined (cp.async) at num_stages=3."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _offline_tma_kernel(x_desc, y_ptr, n_rows, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Persistent copy (x2) of row blocks loaded by TMA: each load waits on an mbarrier (a hardware
    wait/retry loop in the SASS) inside a runtime loop."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    c = tl.arange(0, COLS)
    for i in range(pid, n_rows // ROWS, nprog):
        t = x_desc.load([i * ROWS, 0])
        r = i * ROWS + tl.arange(0, ROWS)
        tl.store(y_ptr + r[:, None] * COLS + c[None, :], t * 2)


@triton.jit
def _offline_tma_once_kernel(x_desc, y_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """One TMA box per program, no source loop: only the wait loop."""
    pid = tl.program_id(0)
    t = x_desc.load([pid * ROWS, 0])
    r = pid * ROWS + tl.arange(0, ROWS)
    tl.store(y_ptr + r[:, None] * COLS + tl.arange(0, COLS)[None, :], t)


COPY_PROGRAMS = 8
COPY_BLOCK = 1024


def copy_forward(x, params, dtype, out=None, config=None):
    """The test family's launcher (the family contract; it copies bytes, it is not a Ghost module)."""
    out = empty_output(x, params.spec.oup, params.spec.stride, dtype) if out is None else out
    n_blocks = max(min(x.numel(), out.numel()) // COPY_BLOCK, 1)
    programs = min(COPY_PROGRAMS, n_blocks)
    tc.launch(_offline_copy_kernel, (programs,), x, out, n_blocks, loops=[n_blocks / programs],
              BLOCK=COPY_BLOCK, num_warps=4)
    return out


if __name__ == "__main__" or __name__.startswith(offline.IMPORTED_PREFIX):
    from ghost_kernels.triton.family import TritonFamily
    BACKEND = TritonFamily("offline_test_copy", "offline model test: a persistent copy", launcher=copy_forward)


# --------------------------------------------------------------------------------------------------
# Pure parts

SASS = """
k:
.text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/               @P0 EXIT ;
.L_x_0:
	//## File "/src/k.py", line 10
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0050*/                   IADD3 R8, R8, 0x1, RZ ;
.L_x_1:
	//## File "/src/k.py", line 12 inlined at "/src/k.py", line 11
        /*0060*/                   FFMA R9, R9, R9, R9 ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
	//## File "/src/k.py", line 11
        /*0080*/               @P1 BRA `(.L_x_1) ;
	//## File "/src/k.py", line 10
        /*0090*/                   STG.E.U16 desc[UR4][R2.64], R4 ;
        /*00a0*/               @P2 BRA `(.L_x_0) ;
        /*00b0*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*00c0*/                   EXIT ;
.L_x_2:
        /*00d0*/                   BRA `(.L_x_2);
        /*00e0*/                   NOP;
"""


def test_sass_loops_nesting_and_reachability():
    instrs = offline.parse_sass(SASS)
    assert [i.addr for i in instrs][:3] == [0, 0x10, 0x20] and len(instrs) == 15
    assert instrs[8].target == 0x60 and instrs[10].target == 0x40
    assert instrs[6].loc == (("/src/k.py", 12), ("/src/k.py", 11))
    loops, reach = offline.find_loops(instrs)
    assert len(loops) == 2                                  # the trailing BRA-to-itself is unreachable
    outer, inner = loops
    assert outer.start(instrs) == 0x40 and outer.end(instrs) == 0xa0 and outer.parent is None
    assert inner.start(instrs) == 0x60 and inner.end(instrs) == 0x80 and inner.parent == outer.id
    assert reach[:13] == [True] * 13 and reach[13:] == [False, False]


def test_only_the_kernel_function_is_parsed():
    two = ("//--------------------- .text.k --------------------------\n" + SASS
           + "\n//--------------------- .text.helper --------------------------\n"
             "        /*0000*/                   FADD R1, R1, R1 ;\n        /*0010*/                   RET.REL.NODEC R20 ;\n")
    assert list(offline.split_functions(two)) == ["k", "helper"]
    assert len(offline.parse_sass(two)) == 15 and len(offline.parse_sass(two, "helper")) == 2


def test_trip_count_weighting_and_widths():
    a = offline.analyze_sass(SASS)
    assert a["static"] == dict(instrs=13, bar=1, mma=1)
    assert a["ld_bits"] == 128 and a["st_bits"] == 16
    # no source loops given (no TTGIR): loops= match the SASS loops by start address
    w, desc = offline.assign_trips(a, [], [5, 3])
    assert w == {0: 5.0, 1: 3.0} and desc[1]["line"] == "k.py:11"
    c = offline.weighted_counts(a, w)
    # 4 + 1 (HMMA) + 1 (EXIT) straight; outer body 4 (LDG, IADD3, STG, BRA) x 5; inner 3 x 5 x 3
    assert c["n"] == 6 + 4 * 5 + 3 * 15
    assert c["bar"] == 15 and c["ldg"] == 5 and c["stg"] == 5 and c["mma"] == 1


def test_loop_mismatch_is_a_clear_error():
    a = offline.analyze_sass(SASS)
    with pytest.raises(offline.LoopMismatch, match=r"loops= has 3 trip counts.*2 SASS loop"):
        offline.assign_trips(a, [], [5, 3, 2], "k")
    with pytest.raises(offline.LoopMismatch, match="passes no loops="):
        offline.assign_trips(a, [], None, "k")


def test_source_loops_match_sass_lines_and_static_range_copies():
    """Source loops (TTGIR) match SASS loops by line; a loop unrolled away takes no SASS loop."""
    a = offline.analyze_sass(SASS)
    src = [dict(line=["/src/k.py", 10], parent=None, const_trips=None, pipelined=False, stages=3, peeled=False),
           dict(line=["/src/k.py", 20], parent=0, const_trips=4, pipelined=False, stages=3, peeled=False),
           dict(line=["/src/k.py", 12], parent=0, const_trips=None, pipelined=False, stages=3, peeled=False)]
    # the inner loop's back edge is attributed to the call line 11 in this SASS: no match by line,
    # so the fallback (SASS order) applies when loops= has one entry per SASS loop
    w, desc = offline.assign_trips(a, src, [5, 3])
    assert w == {0: 5.0, 1: 3.0} and desc[0]["match"] == "SASS loops by start address"
    src[2]["line"] = ["/src/k.py", 11]
    w, desc = offline.assign_trips(a, src, [5, 4, 3])       # every source loop; loop 1 was unrolled away
    assert w == {0: 5.0, 1: 3.0} and desc[0]["match"] == "source loops"
    w, _ = offline.assign_trips(a, src, [5, 3])             # only the surviving ones
    assert w == {0: 5.0, 1: 3.0}
    w, desc = offline.assign_trips(a, src, [5, 1, 4, 3])    # a 1-trip loop the compiler removed
    assert w == {0: 5.0, 1: 3.0} and "removed" in desc[0]["match"]


# A TMA load in a loop as ptxas lays it out (sm_90): the in-line TRYWAIT, a branch to an out-of-line
# retry stub after the EXIT (a loop of its own), whose last BRA jumps back behind the wait -- a backward
# branch that is no loop (0x0050 does not dominate 0x00b0) -- and an in-line NANOSLEEP poll loop.
WAIT_SASS = """
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/               @P0 EXIT ;
.L_x_1:
	//## File "/src/t.py", line 12
        /*0020*/                   @UP2 UTMALDG.2D [UR8], [UR14] ;
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x1000], RZ ;
        /*0040*/              @!P0 BRA `(.L_x_0) ;
.L_x_2:
        /*0050*/                   FMUL R1, R1, R1 ;
        /*0060*/                   STG.E.128 desc[UR4][R2.64], R4 ;
	//## File "/src/t.py", line 10
        /*0070*/               @P1 BRA `(.L_x_1) ;
.L_x_4:
	//## File "/src/t.py", line 20
        /*0080*/                   NANOSLEEP 0x20 ;
        /*0090*/                   LDG.E.STRONG.GPU R5, desc[UR4][R6.64] ;
        /*00a0*/                   ISETP.NE.AND P2, PT, R5, RZ, PT ;
        /*00b0*/               @P2 BRA `(.L_x_4) ;
        /*00c0*/                   EXIT ;
.L_x_0:
	//## File "/src/t.py", line 13
        /*00d0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x1000], RZ ;
        /*00e0*/              @!P0 BRA `(.L_x_0) ;
        /*00f0*/                   BRA `(.L_x_2) ;
.L_x_3:
        /*0100*/                   BRA `(.L_x_3);
"""


def test_hardware_wait_loops_are_not_source_loops():
    instrs = offline.parse_sass(WAIT_SASS)
    assert instrs[-2].base == "BRA" and instrs[-2].target == 0x50 < instrs[-2].addr   # the stub's jump back
    loops, reach = offline.find_loops(instrs)
    assert [(lp.start(instrs), lp.end(instrs), lp.wait) for lp in loops] == [
        (0x20, 0xf0, False),     # the source loop, with the out-of-line stub it enters
        (0x80, 0xb0, True),      # the NANOSLEEP poll
        (0xd0, 0xe0, True)]      # the TRYWAIT retry, nested in the source loop
    assert loops[2].parent == loops[0].id and loops[1].parent is None and reach[-1] is False
    a = offline.analyze_sass(WAIT_SASS)
    src = [dict(line=["/src/t.py", 10], parent=None, const_trips=None, pipelined=False, stages=1, peeled=False)]
    w, desc = offline.assign_trips(a, src, [7])             # one trip count: the wait loops take none
    assert w == {0: 7.0, 1: 1.0, 2: 1.0} and desc[0]["match"] == "source loops"
    assert [d["wait"] for d in desc] == [False, True, True] and "hardware wait" in desc[2]["trips"]
    # straight: S2R, EXIT, EXIT; the loop body 6 + the stub 3, 7 times; the poll loop once
    assert offline.weighted_counts(a, w)["n"] == 3 + 9 * 7 + 4
    with pytest.raises(offline.LoopMismatch, match=r"hardware wait/retry loop: not matched"):
        offline.assign_trips(a, src, [7, 2], "t")
    # without the source loop's back edge: no source loop left, no loops= needed
    no_loop = WAIT_SASS.replace("@P1 BRA `(.L_x_1)", "@P1 BRA `(.L_x_4)")
    w, desc = offline.assign_trips(offline.analyze_sass(no_loop), [], None)
    assert w == {0: 1.0, 1: 1.0} and all(d["wait"] for d in desc)
    assert not offline.is_wait(offline.Instr(0, "", "SYNCS.ARRIVE.TRANS64", "", ()))
    assert offline.is_wait(offline.Instr(0, "", "SYNCS.PHASECHK.TRANS64.TRYWAIT", "", ()))


def test_tile_loop_is_the_persistent_loop_not_the_busiest():
    """A K loop that issues most instructions is no tile loop; a loop starting from the program id is."""
    from ghost_kernels.bench.offline import rows
    sass_loops = [dict(id=0, parent=None, wait=False, line=["k.py", 3]), dict(id=1, parent=0, wait=True),
                  dict(id=2, parent=None, wait=False, line=["k.py", 9])]
    src = [dict(persistent=False), dict(persistent=True)]
    assert rows._tile_loop(sass_loops, [dict(id=0, source=0), dict(id=2, source=1)], src) == 2
    assert rows._tile_loop(sass_loops, [dict(id=0, source=0), dict(id=2, source=None)], src) is None


def test_hbm_bytes_and_predicted_time():
    from ghost_kernels.core.spec import GhostSpec
    from ghost_kernels.triton import two_pass as triton_two_pass
    spec = GhostSpec(16, 24)
    floor = offline.floor_bytes(spec, 8, 56, 56, 2)
    extra = triton_two_pass.extra_hbm_bytes(spec, 8, 56, 56, 2, True)
    assert extra > 0 and offline.hbm_bytes("triton_two_pass", spec, 8, 56, 56, 2, True) == floor + extra
    assert offline.hbm_bytes("no_such_family", spec, 8, 56, 56, 2, True) == floor
    assert offline.ISSUE_RATE == pytest.approx(132 * 4 * 0.7 * 1.98e9)
    assert offline.HBM_RATE == pytest.approx(0.85 * 4.22e12)
    assert offline.predicted_us(offline.ISSUE_RATE * 2e-6, offline.HBM_RATE * 1e-6) == pytest.approx(2.0)
    assert offline.predicted_us(0, offline.HBM_RATE * 3e-6) == pytest.approx(3.0)


@pytest.mark.parametrize("opcode,bits", [
    ("LDG.E.128", 128), ("LDG.E.64.CONSTANT", 64), ("LDG.E", 32), ("LDG.E.U16", 16), ("LDG.E.S8", 8),
    ("LDGSTS.E.BYPASS.LTC128B.128", 128), ("LDGSTS.E.LTC128B", 32), ("UTMALDG.2D", 128), ("STG.E.128", 128),
    ("STG.E.U16", 16), ("STG.E.64", 64)])
def test_access_bits(opcode, bits):
    assert offline.access_bits(offline.Instr(0, "", opcode, "", ())) == bits


def test_ptxas_and_res_usage_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 384 bytes cmem[0]\n")
    assert offline.parse_ptxas_log(log) == dict(regs=255, spill_stores=16, spill_loads=8, stack=24)
    assert offline.parse_ptxas_log("") == dict(regs=None, spill_stores=None, spill_loads=None, stack=None)
    res = " Function k:\n  REG:96 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:576 TEXTURE:0\n"
    assert offline.parse_res_usage(res) == dict(regs=96, stack=0, shared=1024, local=0)
    a = offline.analyze_sass("/*0000*/ STL.64 [R1], R2 ;\n/*0010*/ STL [R1+0x8], R3 ;\n/*0020*/ LDL.128 R4, [R1] ;\n"
                             "/*0030*/ EXIT ;")
    assert a["local_store_bytes"] == 12 and a["local_load_bytes"] == 16


TTGIR = """#loc = loc("/src/k.py":4:1)
#loc5 = loc("/src/h.py":20:8)
#loc6 = loc("/src/k.py":30:4)
#loc7 = loc(callsite(#loc5 at #loc6))
#loc8 = loc("/src/k.py":12:4)
#loc9 = loc("acc"(#loc8))
module {
  tt.func public @k(%K: i32) {
    %pid = tt.get_program_id x : i32 loc(#loc)
    %first = arith.muli %pid, %per : i32 loc(#loc)
    %acc = scf.for %t = %first to %n step %nprog iter_args(%a = %c) -> (i32)  : i32 {
      %x = scf.for %k = %c0_i32 to %K step %c32_i32 iter_args(%b = %a) -> (i32)  : i32 {
        %y = ttg.async_copy_global_to_local %p, %q : tensor<1xi32>
        scf.yield %b : i32
      } loc(#loc7)
      %z = scf.for %d = %c0_i32 to %c3_i32 step %c1_i32 iter_args(%e = %x) -> (i32)  : i32 {
        scf.yield %e : i32
      } {tt.num_stages = 1 : i32} loc(#loc6)
      scf.yield %z : i32
    } loc(#loc9)
    tt.return
  } loc(#loc)
}
"""


def test_mlir_loops():
    loops = offline.mlir_loops(TTGIR)
    assert [l["line"] for l in loops] == [["/src/k.py", 12], ["/src/h.py", 20], ["/src/k.py", 30]]
    assert [l["parent"] for l in loops] == [None, 0, 0]
    assert [l["pipelined"] for l in loops] == [False, True, False]
    assert loops[2]["const_trips"] == 3 and loops[2]["stages"] == 1 and loops[1]["const_trips"] is None
    assert [l["persistent"] for l in loops] == [True, False, False]    # starts from the program id
    peeled = offline.source_loops(TTGIR.replace("to %K step", "to %K_2 step"),     # TTIR
                                  TTGIR.replace("to %K step", "to %KP step"), 3)    # TTGIR: another bound
    assert peeled[1]["peeled"] and not offline.source_loops(TTGIR, TTGIR, 3)[1]["peeled"]


def _row(family, name, inp, h, predicted, latency_us, chosen=False):
    """A minimal model row for the report."""
    return dict(family=family, name=name, inp=inp, oup=16, h=h, w=h, dtype="bfloat16", layout="channels_last",
                chosen=chosen, error=None, regs=128, spills=0, smem=0, ld_bits=128, st_bits=128, ld_bits_main=128,
                st_bits_main=128, barriers_per_tile=1.0, warp_instr=1e6, floor_bytes=1e6, instr_per_byte=1.0,
                floor_us=1.0, issue_us=1.0, hbm_us=2.0, latency_us=latency_us, predicted_us=predicted,
                ctas_per_sm=2, rounds=3, round_trips=4.0, bytes_in_flight_per_sm=8192.0, variants=1)


def test_markdown_orders_rows_by_shape_with_a_legend():
    """Rows come grouped by family from the model; the report orders them by shape, the families of a
    shape side by side (one summary line per shape, adjacent rows in the table), and explains its
    columns and the one budget figure."""
    rows = [_row("fam_a", "s1", 16, 112, 2.0, 1.5, chosen=True), _row("fam_a", "s2", 32, 56, 5.0, 5.0),
            _row("fam_b", "s1", 16, 112, 3.0, 3.0), _row("fam_b", "s2", 32, 56, 2.0, 1.0, chosen=True)]
    meta = dict(triton="3.8.0", target="sm_90", batch=256, chosen="", instruction_budget=0.25,
                latency=dict(memory_latency_us=0.6, l2_latency_us=0.3, l2_resident_bytes=4 << 20,
                             bytes_needed_in_flight_per_sm=16304))
    md = offline.markdown(rows, meta)
    summary = [ln for ln in md.splitlines() if ln.startswith("| s")]
    assert summary[:2] == ["| s1 | 16->16 @112 | bf16 | channels_last | 1.0 | 2.0 (h) | 3.0 (l) | fam_a |",
                           "| s2 | 32->16 @56 | bf16 | channels_last | 1.0 | 5.0 (l) | 2.0 (h) | fam_b |"]
    detail = [ln.split(" | ")[:2] for ln in md.splitlines() if ln.startswith("| fam_")]
    assert detail == [["| fam_a", "s1"], ["| fam_b", "s1"], ["| fam_a", "s2"], ["| fam_b", "s2"]]
    assert "instruction budget 0.25 warp-instructions per floor byte" in md
    legend = md.split("Legend", 1)[1]
    for column in ("bar/tile", "issue/floor", "hbm/floor", "pred us", "ld/st bits", "in parentheses", "smem",
                   "CTAs/SM", "rounds", "trips", "in flight KB", "latency us", "budget 0.25", "bytes"):
        assert column in legend, column
    assert report.bound(rows[0]) == "hbm" and report.bound(dict(rows[0], predicted_us=None)) is None


def test_one_budget_figure_everywhere():
    """0.25 warp-instructions per floor byte is the enforced budget: the docs state it, not another."""
    from ghost_kernels.core import choice
    assert offline.INSTRUCTION_BUDGET == choice.INSTRUCTION_BUDGET == 0.25
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    paragraph = readme.split("**Offline model**", 1)[1].split("\n\n", 1)[0]
    assert "0.25 warp-instructions" in paragraph.replace("\n", " ")
    texts = {"README.md": readme, "offline/__init__.py": offline.__doc__,
             "report.LEGEND": report.LEGEND, "test_offline_budget.py": open(os.path.join(ROOT, "tests",
                                                                                         "test_offline_budget.py")).read()}
    for name, text in texts.items():
        flat = " ".join(text.split())
        assert "0.15-0.2" not in flat and "about 0.2" not in flat, name


# --------------------------------------------------------------------------------------------------
# Compiled (in a child process without TRITON_INTERPRET)

def _child_checks() -> dict:
    """Everything that compiles, in one process (runs as ``python tests/test_offline_model.py checks``)."""
    from ghost_kernels.core.spec import GhostSpec, ModuleShape
    out = {}

    def model_one(launch, keep_sass=False):
        job = offline.specialize_launch(launch)
        res = offline.compile_job(job)
        rec = dict(job=dict(signature=job.signature, attrs={str(k): v for k, v in job.attrs.items()},
                            constexprs={str(k): v for k, v in job.constexprs.items()}, options=job.options))
        try:
            rec["model"] = offline.model_launch(res, launch, job)
        except offline.LoopMismatch as exc:
            rec["mismatch"] = str(exc)
        rec["res"] = {k: v for k, v in res.items() if k not in ("analysis",)}
        rec["analysis"] = res["analysis"]
        if keep_sass:
            import triton as _t
            from triton.compiler import ASTSource
            src = ASTSource(offline.resolve_kernel(job.kernel), job.signature,
                            {k: specialize._decode_const(v) for k, v in job.constexprs.items()}, job.attrs)
            compiled = _t.compile(src, target=offline.target(), options=dict(job.options))
            rec["sass"] = compiler._disassemble(compiled.asm["cubin"])[0]
        return rec

    # 1. the family launcher on a real shape, captured
    shape = ModuleShape("t", GhostSpec(16, 16), 112, 112)
    x, params = offline.make_inputs(shape, torch.bfloat16, "channels_last", 4)
    launches = offline.capture(copy_forward, x, params, torch.bfloat16)
    out["copy"] = model_one(launches[0], keep_sass=True)
    out["copy"]["n_blocks"] = launches[0].args[2]
    out["copy"]["programs"] = launches[0].grid[0]
    out["copy"]["loops"] = list(launches[0].loops)

    # 2. the same kernel on a view 2 bytes off 16-byte alignment
    flat = torch.empty(1 << 16, dtype=torch.bfloat16)
    with tc.capture_launches() as rec:
        tc.launch(_offline_copy_kernel, (8,), flat[1:], flat[1:], 60, loops=[7.5], BLOCK=1024, num_warps=4)
    out["odd"] = model_one(rec[0])

    # 3. loops= that do not fit the kernel
    with tc.capture_launches() as rec:
        tc.launch(_offline_copy_kernel, (8,), flat, flat, 64, loops=[4, 5], BLOCK=1024, num_warps=4)
        tc.launch(_offline_copy_kernel, (8,), flat, flat, 64, BLOCK=1024, num_warps=4)
    out["mismatch"] = [model_one(r).get("mismatch") for r in rec]

    # 4. a loop that ptxas unrolls
    with tc.capture_launches() as rec:
        tc.launch(_offline_sum_kernel, (16,), flat, flat, 64, loops=[64], BLOCK=128, num_warps=4)
    out["unrolled"] = model_one(rec[0])

    # 5. a software-pipelined K loop
    a = torch.empty(1 << 16, dtype=torch.bfloat16)
    with tc.capture_launches() as rec:
        tc.launch(_offline_dot_kernel, (1,), a, a, a, 256, loops=[8], BM=64, BN=64, BK=32, num_warps=4, num_stages=3)
    out["dot"] = model_one(rec[0])

    # 6. specialization: the binder path against Triton's own JITFunction.run (warmup=True with a
    #    stand-in sm_90 driver; its jit_cache_hook sees the compile request and skips the compile)
    cases = [((flat, flat, 4096, 1, 1), {}), ((flat[1:], flat[8:], 4097, 16, 48), {}),
             ((flat[3:], flat, 33, 7, 1), {"num_warps": 2}), ((flat.float()[:100], flat, 1, 32, 5), {"num_stages": 1})]
    out["spec"] = []
    for args, opts in cases:
        with tc.capture_launches() as rec:
            tc.launch(_offline_strided_kernel, (4,), *args, BLOCK=256, **opts)
        jobs = [offline.specialize_launch(rec[0], method=m) for m in ("binder", "run")]
        out["spec"].append([dict(key=j.key, signature=j.signature, options=repr(sorted(j.options.items())),
                                 constexprs={str(k): repr(v) for k, v in j.constexprs.items()},
                                 attrs={str(k): repr(specialize._tuplify(v)) for k, v in j.attrs.items()})
                            for j in jobs])
    # 7. TMA loads (host tensor descriptors): in a runtime loop, and once without a loop
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError as exc:
        out["tma"] = dict(skip=f"no triton.tools.tensor_descriptor ({exc})")
    else:
        xt = torch.empty(4096, 64, dtype=torch.bfloat16)
        desc = TensorDescriptor(xt, list(xt.shape), list(xt.stride()), [32, 64])
        with tc.capture_launches() as rec:
            tc.launch(_offline_tma_kernel, (8,), desc, xt, 4096, loops=[4096 / 32 / 8], ROWS=32, COLS=64,
                      num_warps=4)
            tc.launch(_offline_tma_once_kernel, (128,), desc, xt, loops=(), ROWS=32, COLS=64, num_warps=4)
        out["tma"] = model_one(rec[0], keep_sass=True)
        out["tma"]["loops"] = list(rec[0].loops)
        out["tma_once"] = model_one(rec[1], keep_sass=True)

    out["triton"] = triton.__version__
    out["regs_match"] = out["copy"]["res"]["regs"] == out["copy"]["res"]["ptxas_regs"] or \
        out["copy"]["res"]["ptxas_regs"] is None
    return out


@pytest.fixture(scope="module")
def child():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, HERE, "checks"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def test_copy_model_is_exact(child):
    """The persistent copy, counted by hand from its SASS: the loop body runs n_blocks / programs times
    per program, everything else (up to the EXIT after the loop) once."""
    c = child["copy"]
    instrs = offline.parse_sass(c["sass"])
    back = [i for i in instrs if i.base == "BRA" and i.target is not None and i.target <= i.addr and i.target != i.addr]
    assert len(back) == 1
    body = sum(1 for i in instrs if back[0].target <= i.addr <= back[0].addr)
    last_exit = next(i.addr for i in instrs if i.base == "EXIT" and i.addr > back[0].addr)
    straight = sum(1 for i in instrs if i.addr <= last_exit) - body
    trips = c["n_blocks"] / c["programs"]
    assert c["loops"] == [trips]
    m = c["model"]
    assert m["instr_per_warp"] == pytest.approx(straight + body * trips)
    assert m["warp_instr"] == pytest.approx((straight + body * trips) * 4 * c["programs"])
    assert m["ldg_warp_instr"] == pytest.approx(c["n_blocks"] * 4) and m["programs"] == c["programs"]
    assert m["ld_bits"] == 128 and m["st_bits"] == 128          # 16-byte aligned bf16: LDG.E.128 / STG.E.128
    assert m["ld_bits_main"] == 128 and m["ldg_by_bits"] == {"128": pytest.approx(c["n_blocks"] * 4)}
    assert m["sass_loops"][0]["match"] == "source loops"
    assert m["spills"] == 0 and m["regs"] and child["regs_match"]


def test_capture_specialization_of_the_launcher(child):
    """The captured launch specializes like Triton's JIT would: 16-byte aligned pointers and an int
    divisible by 16 carry tt.divisibility, the constexpr stays a constexpr, options are the launch's."""
    job = child["copy"]["job"]
    assert job["signature"] == {"x_ptr": "*bf16", "y_ptr": "*bf16", "n_blocks": "i32", "BLOCK": "constexpr"}
    div = [k for k, v in job["attrs"].items() if "tt.divisibility" in json.dumps(v)]
    assert sorted(div) == ["(0,)", "(1,)", "(2,)"]              # 4*16*112*112 // 1024 = 784 = 16 * 49
    assert job["constexprs"] == {"(3,)": 1024} and job["options"]["num_warps"] == 4


def test_odd_offset_gives_narrow_accesses(child):
    o = child["odd"]
    assert not any("tt.divisibility" in json.dumps(v) for k, v in o["job"]["attrs"].items() if k in ("(0,)", "(1,)"))
    assert o["model"]["ld_bits"] == 16 and o["model"]["st_bits"] == 16     # LDG.E.U16 / STG.E.U16
    assert o["model"]["ld_bits_main"] == 16


def test_specialization_equals_tritons_own_run(child):
    for binder, run in child["spec"]:
        assert binder == run
    sig = [case[0]["signature"] for case in child["spec"]]
    assert sig[0]["sx"] == sig[0]["sy"] == "constexpr"        # ints equal to 1
    assert sig[1]["sx"] == "i32" and child["spec"][1][0]["attrs"]["(3,)"] == "(('tt.divisibility', 16),)"
    assert child["spec"][1][0]["attrs"]["(0,)"] == "()"           # bf16 pointer 2 bytes off 16
    assert child["spec"][1][0]["attrs"]["(1,)"] == "(('tt.divisibility', 16),)"   # 16 bytes off: aligned
    assert sig[3]["x_ptr"] == "*fp32" and sig[3]["n"] == "constexpr"


def test_loops_mismatch_error_from_compiled_kernel(child):
    wrong, missing = child["mismatch"]
    assert wrong and "loops= has 2 trip counts" in wrong and "SASS loops" in wrong and "test_offline_model.py" in wrong
    assert missing and "passes no loops=" in missing


def test_ptxas_unrolled_loop(child):
    """ptxas unrolls the small loop into a U-times body and a remainder loop: both are one source loop,
    and the modelled count lies between the U-times body's per-iteration cost and the remainder's."""
    u = child["unrolled"]
    loops = u["model"]["sass_loops"]
    assert len(loops) >= 2 and any("unrolled x" in lp["trips"] for lp in loops)
    main = max(loops, key=lambda lp: lp["instrs"])
    rem = min(loops, key=lambda lp: lp["instrs"])
    unroll = int(main["trips"].split("unrolled x")[1].split(" ")[0])
    per = u["model"]["instr_per_warp"]
    assert 64 * main["instrs"] / unroll <= per <= 64 * rem["instrs"] + u["model"]["static_instrs"]


def test_pipelined_loop(child):
    d = child["dot"]["model"]
    lp = d["sass_loops"]
    assert len(lp) == 1 and "pipelined (3 stages" in lp[0]["trips"] and lp[0]["weight"] == 8.0
    assert d["ld_bits"] == 128 and d["mma_static"] > 0 and d["smem"] > 0   # cp.async 16 B, tensor cores


def test_latency_of_a_persistent_copy(child):
    """Each tile's load is consumed by its store in the same iteration: one dependent round trip per
    tile; the 784 tiles fit one round of the GPU's 16 x 132 resident programs (4 warps each)."""
    m = child["copy"]["model"]
    assert (m["ctas_per_sm"], m["occupancy_limit"], m["rounds"]) == (16, "warps", 1)
    wait_us = m["memory_wait_cycles"] / latency.H200_CLOCK_HZ * 1e6
    assert latency.L2_LATENCY_US * 0.95 <= wait_us <= latency.MEMORY_LATENCY_US    # one load, L2 or DRAM
    assert m["latency_us"] == pytest.approx(m["path_us"]) and m["latency_us"] > wait_us


def test_latency_of_a_pipelined_loop(child):
    """The 3-stage cp.async K loop loads two steps ahead (a and b: one 128 KiB tensor, L2-resident):
    with a short step, two loads in flight make a step wait about half a latency -- 8 steps wait about
    4-5 latencies (the prologue's first one in full), where a loop without prefetch would wait 8."""
    m = child["dot"]["model"]
    waits = m["memory_wait_cycles"] / latency._cycles(latency.L2_LATENCY_US)
    assert 8 / 2 <= waits < 8 - 1 and m["rounds"] == 1
    timing = child["dot"]["analysis"]["timing"]
    assert {tuple(r[6]) for r in timing if r[1] == "cp"} == {("a_ptr",), ("b_ptr",)}
    assert any(r[1] == "depbar" for r in timing) and any(r[1] == "commit" for r in timing)


def test_latency_of_a_tma_load(child):
    """The TMA load's wait is a round trip to L2 (x: 512 KiB), once per tile; one tile per program on
    the GPU's grid."""
    if "skip" in child["tma"]:
        pytest.skip(child["tma"]["skip"])
    m = child["tma"]["model"]
    timing = child["tma"]["analysis"]["timing"]
    assert [r[6] for r in timing if r[1] == "tma"] == [["x_desc"]]
    assert m["rounds"] == 1
    assert m["memory_wait_cycles"] == pytest.approx(latency._cycles(latency.L2_LATENCY_US), rel=0.05)


def _tma_parts(sass):
    """(instructions, the trap, the last EXIT before it, the out-of-line block between them)."""
    instrs = offline.parse_sass(sass)
    trap = next(i for i in instrs if i.base == "BRA" and i.target == i.addr)
    last_exit = max(i.addr for i in instrs if i.base == "EXIT" and not i.predicated and i.addr < trap.addr)
    stub = [i for i in instrs if last_exit < i.addr < trap.addr]
    return instrs, trap, last_exit, stub


def test_tma_wait_loop_in_a_runtime_loop(child):
    """A TMA load in a persistent loop: the mbarrier wait's retry stub (after the EXIT, jumping back
    into the loop) is a hardware wait loop, not a source loop; loops= has the one source loop, and the
    count is exact by hand: the loop body and the stub once per trip, the rest once."""
    if "skip" in child["tma"]:
        pytest.skip(child["tma"]["skip"])
    t = child["tma"]
    assert "mismatch" not in t, t.get("mismatch")
    instrs, trap, last_exit, stub = _tma_parts(t["sass"])
    assert any(i.base == "UTMALDG" for i in instrs)
    assert any(offline.is_wait(i) for i in stub) and stub[-1].base == "BRA" and stub[-1].target < stub[-1].addr
    back = [i for i in instrs if i.base == "BRA" and i.target is not None and i.target < i.addr <= last_exit]
    assert len(back) == 1                                       # the source loop's back edge
    head, latch = back[0].target, back[0].addr
    into_stub = [i for i in instrs if i.base == "BRA" and i.target == stub[0].addr and i.addr < last_exit]
    assert into_stub and all(head <= i.addr <= latch for i in into_stub)   # the wait is inside the loop
    body = sum(1 for i in instrs if head <= i.addr <= latch)
    straight = sum(1 for i in instrs if i.addr <= last_exit) - body
    trips = t["loops"][0]
    m = t["model"]
    loops = m["sass_loops"]
    waits = [lp for lp in loops if lp["wait"]]
    source = [lp for lp in loops if not lp["wait"]]
    assert len(source) == 1 and source[0]["weight"] == trips and source[0]["match"] == "source loops"
    assert waits and all(lp["weight"] == 1.0 and "hardware wait" in lp["trips"] for lp in waits)
    assert m["instr_per_warp"] == pytest.approx(straight + (body + len(stub)) * trips)
    assert m["ld_hist"].get("128") and m["programs"] == 8


def test_tma_wait_loop_without_source_loop(child):
    """One TMA box per program (as triton_band's x load when K is one step): loops=() fits."""
    if "skip" in child["tma"]:
        pytest.skip(child["tma"]["skip"])
    t = child["tma_once"]
    assert "mismatch" not in t, t.get("mismatch")
    instrs, trap, last_exit, stub = _tma_parts(t["sass"])
    m = t["model"]
    assert m["sass_loops"] and all(lp["wait"] and lp["weight"] == 1.0 for lp in m["sass_loops"])
    assert m["instr_per_warp"] == pytest.approx(sum(1 for i in instrs if i.addr < trap.addr))


# --------------------------------------------------------------------------------------------------
# The CLI and model_rows (under TRITON_INTERPRET the model runs in a child process)

REQUIRED = ("family", "name", "inp", "oup", "h", "w", "dtype", "layout", "regs", "spills", "smem", "ld_bits",
            "st_bits", "barriers", "warp_instr", "floor_bytes", "instr_per_byte", "chosen", "variants", "launches",
            "hbm_bytes", "issue_us", "hbm_us", "latency_us", "ctas_per_sm", "rounds", "round_trips",
            "bytes_in_flight_per_sm", "predicted_us")


def test_cli_writes_offline_json(tmp_path, capfd):
    rc = offline.main(["--out", str(tmp_path), "--families", "offline_test_copy", "--shapes", "0,21",
                       "--dtypes", "bfloat16,float32", "--layouts", "channels_last,nchw", "--batch", "4",
                       "--import", HERE])
    assert rc == 0
    data = json.loads((tmp_path / "offline.json").read_text())
    rows, meta = data["rows"], data["meta"]
    assert len(rows) == 8 and not any(r["error"] for r in rows)
    for r in rows:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert r["chosen"] is False and r["variants"] == 1 and r["warp_instr"] > 0
        assert r["instr_per_byte"] == pytest.approx(r["warp_instr"] / r["floor_bytes"])
        assert r["hbm_bytes"] == r["floor_bytes"]                # the family declares no extra_hbm_bytes
        assert r["issue_us"] == pytest.approx(1e6 * r["warp_instr"] / offline.ISSUE_RATE)
        assert r["hbm_us"] == pytest.approx(1e6 * r["hbm_bytes"] / offline.HBM_RATE)
        assert r["latency_us"] > 0 and r["rounds"] >= 1 and r["ctas_per_sm"] >= 1
        assert r["predicted_us"] == pytest.approx(max(r["issue_us"], r["hbm_us"], r["latency_us"]))
        assert r["launches"][0]["kernel"] == "_offline_copy_kernel"
    r0 = rows[0]
    assert (r0["inp"], r0["oup"], r0["h"], r0["dtype"], r0["layout"]) == (16, 16, 112, "bfloat16", "channels_last")
    assert r0["floor_bytes"] == 4 * 16 * 112 * 112 * 2 * 2
    # 4 variants: {bf16, fp32} x {n_blocks divisible by 16 or not}
    assert meta["variants"] == 4 and meta["batch"] == 4 and "chosen" in meta
    assert meta["latency"]["memory_latency_us"] == offline.MEMORY_LATENCY_US and meta["instruction_budget"] == 0.25
    assert set(meta["sources"]) == {"kernels", "model"} and "latency.py" in meta["sources"]["model"]
    out, err = capfd.readouterr()
    assert (tmp_path / "offline.md").exists() and "offline_test_copy" in out
    # progress names the family, the shape and the case, not a hash
    assert "compiled offline_test_copy 16->16 @112 (blocks.0.0.ghost1) bfloat16 channels_last" in err
    assert "[_offline_copy_kernel]" in err


def test_model_rows_with_module_shapes():
    """The lead's entry point: model_rows with ModuleShape objects, from the interpreter's process."""
    from ghost_kernels.core.spec import GhostSpec, ModuleShape
    shape = ModuleShape("custom", GhostSpec(24, 37, ratio=3, dw_size=5), 9, 9)
    rows = offline.model_rows(["offline_test_copy"], [shape], ["float16"], ["nchw"], batch=2, imports=[HERE])
    assert len(rows) == 1 and rows[0]["name"] == "custom" and rows[0]["oup"] == 37 and not rows[0]["error"]
    assert rows[0]["launches"][0]["loops"] == [1.0] and rows[0]["dtype"] == "float16"


def test_model_rows_reports_unknown_family():
    with pytest.raises(offline.OfflineError, match="unknown family"):
        offline.model_rows(["no_such_family"], "0", batch=2)


if __name__ == "__main__":
    if sys.argv[1:] == ["checks"]:
        try:
            result = _child_checks()
        except offline.TritonApiMismatch as exc:
            result = {"skip": str(exc)}
        print(json.dumps(result, default=str))
