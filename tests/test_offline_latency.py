"""The offline model's latency term (ghost_kernels/bench/offline/latency.py): occupancy, the control
bits, the one-warp walk on small synthetic programs, the arguments a load reads, and the check against
the one GPU measurement of a kernel that still exists (v1 = triton_halo, H200, 2026-11-28).

Everything here is arithmetic on small inputs or on committed files: no compile (the compiled checks
of the walk on real SASS are in test_offline_model.py's child process)."""
import json
import math
import os

import pytest

pytest.importorskip("triton")
from ghost_kernels.bench import offline  # noqa: E402
from ghost_kernels.bench.offline import latency, report, rows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
L = latency._cycles(latency.MEMORY_LATENCY_US)      # DRAM latency, cycles
L2 = latency._cycles(latency.L2_LATENCY_US)
NONE = offline.sass.NO_BARRIER


def rec(kind, stall=1, wbar=NONE, rbar=NONE, wait=0, arg=None, loops=()):
    """One timing record (latency.timing_records' format)."""
    return [list(loops), kind, stall, wbar, rbar, wait, arg]


# --------------------------------------------------------------------------------------------------
# Occupancy and control bits

@pytest.mark.parametrize("regs,smem,warps,ctas,limit", [
    (168, 8704, 4, 3, "registers"),        # 168 x 32 = 5376 per warp: 65536 // (5376 x 4) = 3
    (202, 8704, 4, 2, "registers"),        # v1 under Triton 3.6: 6400 per warp -> 2
    (255, 0, 4, 2, "registers"),
    (128, 131096, 8, 1, "shared memory"),  # 228 KiB // (128 KiB + 1 KiB); registers would allow 2
    (24, 0, 4, 16, "warps"),               # 64 warps // 4
    (24, 0, 1, 32, "CTAs"),
])
def test_ctas_per_sm(regs, smem, warps, ctas, limit):
    assert offline.ctas_per_sm(regs, smem, warps) == (ctas, limit)


def test_control_bits_decode_and_parse():
    s2r = offline.Ctrl.decode(0x000E220000002500)     # S2R R0, SR_CTAID.X: sets SB0 after 1 cycle's stall
    assert (s2r.stall, s2r.yld, s2r.wbar, s2r.rbar, s2r.wait) == (1, True, 0, NONE, 0)
    call = offline.Ctrl.decode(0x001FEA0003C00000)    # waits on SB0, stalls 5
    assert (call.stall, call.wbar, call.rbar, call.wait) == (5, NONE, NONE, 0b1)
    text = ("        /*0000*/                   S2R R0, SR_CTAID.X ;          /* 0x0000000000007919 */\n"
            "                                                                 /* 0x000e220000002500 */\n"
            "        /*0010*/                   EXIT ;                        /* 0x000000000000794d */\n"
            "                                                                 /* 0x001fea0003c00000 */\n")
    instrs = offline.parse_sass(text)
    assert [i.opcode for i in instrs] == ["S2R", "EXIT"] and instrs[0].ctrl == s2r and instrs[1].ctrl == call
    assert offline.parse_sass(text.replace("/* 0x000e220000002500 */", ""))[0].ctrl is None


# --------------------------------------------------------------------------------------------------
# The walk

def test_a_load_waited_for_in_its_own_iteration_costs_a_round_trip_per_iteration():
    body = [rec("mem", wbar=0, loops=[0]), rec("other", wait=0b1, loops=[0])]
    res = offline.simulate(body, {0: 10})
    # each iteration: the load issues (1 cycle), the consumer waits until it lands (L after the load)
    assert res["cycles"] == pytest.approx(10 * (L + 1))
    assert res["round_trips"] == pytest.approx(10 * (L - 1) / L) and res["issue_cycles"] == pytest.approx(20)


def test_a_load_issued_one_iteration_ahead_hides_its_latency():
    work = 2 * L      # cycles of work between a load and its use, more than the latency
    prefetch = [rec("mem", wbar=0),                                         # prologue: the first load
                rec("other", wait=0b1, loops=[0]),                          # use this iteration's data
                rec("mem", wbar=0, loops=[0]),                              # load the next iteration's
                rec("other", stall=work, loops=[0])]
    res = offline.simulate(prefetch, {0: 10})
    assert res["round_trips"] == pytest.approx((L - 1) / L)                 # only the prologue's load
    assert res["cycles"] == pytest.approx(1 + (L - 1) + 10 * (2 + work))


def test_loads_from_small_tensors_take_the_l2_latency():
    body = [rec("mem", wbar=0, arg=["w_ptr"]), rec("other", wait=0b1)]
    assert offline.simulate(body, {})["cycles"] == pytest.approx(L + 1)
    assert offline.simulate(body, {}, frozenset({"w_ptr"}))["cycles"] == pytest.approx(L2 + 1)
    two = [rec("mem", wbar=0, arg=["w_ptr", "x_ptr"]), rec("other", wait=0b1)]   # one of them is in DRAM
    assert offline.simulate(two, {}, frozenset({"w_ptr"}))["cycles"] == pytest.approx(L + 1)
    assert offline.l2_resident({"w_ptr": 4096, "x_ptr": 100 << 20}) == frozenset({"w_ptr"})


def test_cp_async_groups_and_depbar():
    """Two groups committed, DEPBAR.LE SB0, 1 waits for the first only, 0 for both."""
    prog = [rec("cp"), rec("commit", wbar=0), rec("other", stall=100), rec("cp"), rec("commit", wbar=0),
            rec("depbar", arg=[0, 1]), rec("other"), rec("depbar", arg=[0, 0])]
    w = latency._Warp(L, L2, frozenset())
    for r in prog[:6]:
        w.step(r)
    assert w.t == pytest.approx(L + 1)                  # the first cp.async landed L after its issue at 0
    for r in prog[6:]:
        w.step(r)
    assert w.t == pytest.approx(102 + L + 1)            # the second, issued at 102
    assert w.mem_wait == pytest.approx(w.t - w.issue)


def test_tma_group_and_mbarrier_wait():
    """Two TMA boxes behind one expect (one group), the phase check waits for the later one."""
    prog = [rec("tma"), rec("other", stall=10), rec("tma"), rec("mbar_wait", wbar=1), rec("other", wait=0b10)]
    res = offline.simulate(prog, {})
    assert res["cycles"] == pytest.approx(11 + L + 1)
    assert res["round_trips"] == pytest.approx((L - 2) / L)


def test_two_tma_rings_are_waited_for_in_issue_order():
    """x and w each in their own ring of mbarriers (an expect-tx arrive before each box): with two
    stages loaded ahead and a step of work longer than the latency, only the first step waits."""
    stage = [rec("mbar_expect", loops=[0]), rec("tma", loops=[0]), rec("mbar_expect", loops=[0]), rec("tma", loops=[0])]
    prologue = [r[:0] + [[]] + r[1:] for r in stage * 2]
    wait = [rec("mbar_wait", wbar=1, loops=[0]), rec("other", wait=0b10, loops=[0])]
    res = offline.simulate(prologue + wait * 2 + [rec("other", stall=2 * L, loops=[0])] + stage, {0: 4})
    assert res["round_trips"] == pytest.approx((L - 8) / L)   # the first x box: issued at cycle 1, awaited from 9


def test_wgmma_groups_wait_for_their_tensor_core_time():
    mma = latency._arg(offline.Instr(0, "", "HGMMA.64x64x16.F32.BF16", "R24, R120, gdesc[UR4], R24, gsb0", ()),
                       "mma", {})
    assert mma == [64 * 64 * 16 / latency.MMA_FMA_PER_CYCLE, True]
    res = offline.simulate([rec("mma", arg=mma), rec("mma_wait", arg=[0, 0])], {})
    assert res["cycles"] == pytest.approx(mma[0] + 1) and res["round_trips"] == 0


def test_nested_loops_and_fractional_trips():
    inner = [rec("other", stall=3, loops=[0, 1])]
    res = offline.simulate([rec("other", loops=[0])] + inner, {0: 4, 1: 2.5})
    assert res["cycles"] == pytest.approx(4 * (1 + 2.5 * 3))
    assert offline.simulate(inner, {0: 0.5, 1: 2})["cycles"] == pytest.approx(3)


def test_rounds_of_a_launch_and_of_a_persistent_kernel():
    body = [rec("mem", wbar=0, loops=[0]), rec("other", wait=0b1, loops=[0])]
    # 1000 programs of one tile, 3 per SM: ceil(1000 / 396) = 3 rounds of one program's path
    flat = [rec("mem", wbar=0), rec("other", wait=0b1)]
    one = offline.launch_latency(flat, {}, 1000, 168, 0, 4)
    assert one["rounds"] == 3 and one["ctas_per_sm"] == 3
    assert one["latency_us"] == pytest.approx(3 * (L + 1) / latency.H200_CLOCK_HZ * 1e6)
    # persistent: 3 programs captured on the CPU, 5461.3 tiles each: on the GPU 396 programs of
    # ceil(16384 / 396) = 42 tiles
    pers = offline.launch_latency(body, {0: 16384 / 3}, 3, 168, 0, 4, tile_loop=0)
    assert pers["rounds"] == 42
    assert pers["latency_us"] == pytest.approx(42 * (L + 1) / latency.H200_CLOCK_HZ * 1e6)
    assert pers["round_trips"] == pytest.approx(42 * (L - 1) / L)
    assert offline.launch_latency(None, {}, 10, 168, 0, 4)["latency_us"] is None


def test_row_terms_and_prediction():
    launches = [dict(latency_us=10.0, ctas_per_sm=2, rounds=3, round_trips=4.0),
                dict(latency_us=30.0, ctas_per_sm=1, rounds=5, round_trips=6.0)]
    t = rows.latency_terms(launches, hbm=132 * 1000.0)
    assert t == dict(latency_us=40.0, ctas_per_sm=1, rounds=5, round_trips=10.0, bytes_in_flight_per_sm=100.0)
    assert rows.latency_terms(launches + [dict(latency_us=None)], 1.0)["latency_us"] is None
    instr, hbm = offline.ISSUE_RATE * 2e-6, offline.HBM_RATE * 3e-6            # 2 us of issue, 3 us of HBM
    assert offline.predicted_us(instr, hbm) == pytest.approx(3.0)
    assert offline.predicted_us(instr, hbm, 5.0) == pytest.approx(5.0)
    assert report.bound(dict(issue_us=2.0, hbm_us=3.0, latency_us=5.0, predicted_us=5.0)) == "latency"
    assert offline.BYTES_NEEDED_IN_FLIGHT == pytest.approx(offline.HBM_RATE * 0.6e-6 / 132)


# --------------------------------------------------------------------------------------------------
# Records from SASS, loads' arguments from TTGIR

def encoded(addr, text, stall=1, wbar=NONE, rbar=NONE, wait=0, label=None, line=None):
    """One instruction as ``nvdisasm -hex`` prints it: the lower encoding half (left 0 here) on its
    line, the upper half, which holds the control bits, on the next."""
    high = stall << 41 | 1 << 45 | wbar << 46 | rbar << 49 | wait << 52
    out = [f"{label}:"] if label else []
    out += [f'        //## File "/src/t.py", line {line}'] if line else []
    out += [f"        /*{addr:04x}*/                   {text} ;   /* 0x0000000000000000 */",
            f"                                                  /* 0x{high:016x} */"]
    return "\n".join(out)


# A load and its consumer, then a TMA load in a loop with its mbarrier wait, whose retry stub after
# the EXIT jumps back into the loop (as ptxas lays it out; test_offline_model.py has the same shape
# without encodings).
TIMED_SASS = "\n".join([
    encoded(0x00, "S2R R0, SR_CTAID.X", wbar=0),
    encoded(0x10, "LDG.E.128 R4, desc[UR4][R2.64]", wbar=2, rbar=3, line=8),
    encoded(0x20, "FMUL R5, R4, R4", stall=4, wait=0b100),
    encoded(0x30, "@UP2 UTMALDG.2D [UR8], [UR14]", rbar=0, label=".L_x_1", line=12),
    encoded(0x40, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x1000], RZ", wbar=1),
    encoded(0x50, "@!P0 BRA `(.L_x_0)", wait=0b10),
    encoded(0x60, "@P1 BRA `(.L_x_1)", label=".L_x_2", line=10),
    encoded(0x70, "EXIT"),
    encoded(0x80, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x1000], RZ", wbar=1, label=".L_x_0"),
    encoded(0x90, "@!P0 BRA `(.L_x_0)", wait=0b10),
    encoded(0xa0, "BRA `(.L_x_2)"),
])


def test_timing_records_skip_out_of_line_code_and_carry_load_arguments():
    recs = offline.timing_records(TIMED_SASS, None, {"/src/t.py:12": ["x_desc"], "/src/t.py:8": ["w_ptr"]})
    assert [r[1] for r in recs] == ["other", "mem", "other", "tma", "mbar_wait", "other", "other", "other"]
    assert [r[0] for r in recs] == [[], [], [], [0], [0], [0], [0], []]      # nothing after the EXIT
    assert recs[1][6] == ["w_ptr"] and recs[3][6] == ["x_desc"] and recs[1][3:6] == [2, 3, 0]
    assert recs[2][2] == 4 and recs[2][5] == 0b100 and recs[4][3] == 1 and recs[5][5] == 0b10
    # the walk: the load's consumer waits for L2 (w_ptr is small), each TMA wait for DRAM
    res = offline.simulate(recs, {0: 2.0}, frozenset({"w_ptr"}))
    assert res["memory_wait_cycles"] == pytest.approx((L2 - 1) + 2 * (L - 2))
    assert offline.timing_records(TIMED_SASS.replace("/* 0x0000", "/* nope")) is None


TTGIR_LOADS = '''#loc = loc("/src/k.py":1:0)
#loc1 = loc("/src/k.py":20:12)
#loc2 = loc("/src/k.py":30:8)
#loc3 = loc("/src/k.py":40:8)
module {
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc("x_ptr"(#loc)), %w_ptr: !tt.ptr<bf16> loc("w_ptr"(#loc)), %x_desc: !tt.tensordesc<64x64xbf16> loc("x_desc"(#loc))) {
    %xs = tt.splat %x_ptr : !tt.ptr<bf16> -> tensor<64x!tt.ptr<bf16>> loc(#loc1)
    %xp = tt.addptr %xs, %off : tensor<64x!tt.ptr<bf16>>, tensor<64xi32> loc(#loc1)
    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%p = %xp, %a = %z) -> (tensor<64x!tt.ptr<bf16>>, f32) : i32 {
      %v = tt.load %p, %m : tensor<64x!tt.ptr<bf16>> loc(#loc1)
      %wi = tt.bitcast %w_ptr : !tt.ptr<bf16> -> !tt.ptr<i32> loc(#loc2)
      %ws = tt.splat %wi : !tt.ptr<i32> -> tensor<64x!tt.ptr<i32>> loc(#loc2)
      %w = tt.load %ws : tensor<64x!tt.ptr<i32>> loc(#loc2)
      ttng.async_tma_copy_global_to_local %x_desc[%i, %c0] %buf, %bar, %true : !tt.tensordesc<64x64xbf16>, !ttg.memdesc<1xi64> -> !ttg.memdesc<64x64xbf16> loc(#loc3)
      scf.yield %p, %a : tensor<64x!tt.ptr<bf16>>, f32
    } loc(#loc)
    tt.return
  } loc(#loc)
}
'''


def test_load_sources_trace_pointers_to_arguments():
    assert offline.load_sources(TTGIR_LOADS) == {"/src/k.py:20": ["x_ptr"], "/src/k.py:30": ["w_ptr"],
                                                 "/src/k.py:40": ["x_desc"]}


# --------------------------------------------------------------------------------------------------
# The v1 kernel against its H200 measurement

V1_RESULT = os.path.join(RESULTS, "2026-12-02-offline-sm90-triton3.6-v1.json")
V1_MEASURED = os.path.join(RESULTS, "2026-11-28-nvidia-h200-quick.json")
# The model files and kernel files the committed v1 result depends on (meta "sources")
V1_KERNEL_FILES = ("halo.py", "common.py")
# The one shape the latency term does not explain: the K loop of v1 at 14x14 costs ~2.5x what its SASS
# path shows (NOTES.md, 2026-12-02); strict: the test fails once the model explains it.
V1_KNOWN_MISSES = {"blocks.5.0.ghost2": "240->80 @14: the model predicts ~0.53x the measured time"}


@pytest.fixture(scope="module")
def v1():
    with open(V1_RESULT) as f:
        data = json.load(f)
    with open(V1_MEASURED) as f:
        measured = {r["name"]: r["median_ms"] * 1e3 for r in json.load(f)["rows"] if r["impl"] == "triton"}
    return data, measured


def test_v1_result_was_made_from_todays_model_and_kernel(v1):
    """The committed v1 result (Triton 3.6, the compiler of the measured run) must be remade when the
    model or the v1 kernel changes: ``PYTHONPATH=<triton 3.6> python -m ghost_kernels.bench.offline
    --families triton_halo --shapes quick --out DIR`` and copy DIR/offline.json to V1_RESULT."""
    meta = v1[0]["meta"]
    now = offline.source_hashes()
    assert meta["triton"].startswith("3.6"), meta["triton"]
    assert meta["sources"]["model"] == now["model"], "the model changed since the v1 result was made: remake it"
    for f in V1_KERNEL_FILES:
        assert meta["sources"]["kernels"][f] == now["kernels"][f], f"{f} changed since the v1 result was made"


@pytest.mark.parametrize("name", ["blocks.0.0.ghost1", "blocks.1.0.ghost2", "blocks.3.0.ghost2",
                                  "blocks.5.0.ghost2", "blocks.7.0.ghost2"])
def test_v1_latency_term_explains_the_h200_measurement(v1, name, request):
    """One latency assumption for every shape (meta "latency"): predicted within 30% of measured."""
    if name in V1_KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=V1_KNOWN_MISSES[name]))
    data, measured = v1
    row = next(r for r in data["rows"] if r["name"] == name and r["family"] == "triton_halo")
    assert data["meta"]["latency"]["memory_latency_us"] == latency.MEMORY_LATENCY_US
    assert report.bound(row) == "latency"
    assert row["predicted_us"] == pytest.approx(measured[name], rel=0.30)


def test_v1_total_is_explained(v1):
    """Over the five shapes the model misses v1 by far less than the instruction roofline did
    (644 us predicted against 1311 us measured, NOTES.md 2026-11-29)."""
    data, measured = v1
    predicted = sum(r["predicted_us"] for r in data["rows"] if r["family"] == "triton_halo")
    assert predicted == pytest.approx(sum(measured.values()), rel=0.10)
    assert math.isclose(sum(measured.values()), 1311, rel_tol=0.01)


# --------------------------------------------------------------------------------------------------
# The lab's ncu phase: which term was right (the plumbing; ncu itself needs a GPU)

NCU_CSV = '''"ID","Kernel Name","gpu__time_duration.sum","smsp__inst_executed.sum","smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct","smsp__warp_issue_stalled_barrier_per_warp_active.pct","dram__throughput.avg.pct_of_peak_sustained_elapsed"
"","","nsecond","inst","%","%","%"
"0","_pw_kernel","10000","1,000","20","5","80"
"1","_dw_kernel","30000","3,000","60","1","40"
"2","_band_kernel","50000","5,000","70","10","30"
'''


def test_ncu_plan_profiles_band_old_and_new_buffering():
    from ghost_kernels.bench import lab_ncu
    assert {10, 18} <= set(lab_ncu.NCU_SHAPES)             # 240->80 and 672->112 @14
    plan = lab_ncu.ncu_plan("triton_band", lab_ncu.NCU_SHAPES)
    assert plan[:len(lab_ncu.NCU_SHAPES)] == [(i, None) for i in lab_ncu.NCU_SHAPES]
    assert plan[len(lab_ncu.NCU_SHAPES):] == [(10, "old_buffering"), (18, "old_buffering")]
    assert lab_ncu.ncu_plan("triton_two_pass", (0, 9)) == [(0, None), (9, None)]
    assert lab_ncu.offline_families(["triton_band", "triton_two_pass"]) == [
        "triton_band", "triton_two_pass", "triton_band:old_buffering"]
    assert {m: True for m in ("smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct",
                              "smsp__warp_issue_stalled_barrier_per_warp_active.pct",
                              "dram__throughput.avg.pct_of_peak_sustained_elapsed")}.keys() <= set(lab_ncu.METRICS)


def test_old_buffering_variant_is_the_hook():
    """The variant's config is band's default with 2 stages; where the default has 2 stages or fewer
    (no new buffering) there is nothing to compare and the call is skipped."""
    from collections import namedtuple

    from ghost_kernels.bench import lab_ncu
    from ghost_kernels.bench.offline import variants
    Cfg = namedtuple("Cfg", "BLOCK_K num_stages")
    assert variants.old_buffering(Cfg(64, 4)) == Cfg(64, 2) and variants.old_buffering(Cfg(64, 2)) is None

    class Fam:
        name = "triton_band"

        def __init__(self, stages):
            self.default_config = lambda spec, ho, wo, dtype, channels_last: Cfg(64, stages)
    import torch

    from ghost_kernels.core.spec import GhostSpec
    x = torch.empty(2, 240, 14, 14).to(memory_format=torch.channels_last)
    params = type("P", (), {"spec": GhostSpec(240, 80)})()
    assert lab_ncu._variant_config(Fam(4), "old_buffering", x, params, torch.bfloat16) == (Cfg(64, 2), True)
    assert lab_ncu._variant_config(Fam(2), "old_buffering", x, params, torch.bfloat16) == (None, False)
    assert lab_ncu._variant_config(Fam(4), None, x, params, torch.bfloat16) == (None, True)


def test_variant_families_register_with_the_variant_config():
    """``--import offline/variants.py`` registers ``triton_band:old_buffering``, whose launcher runs
    band's launcher with the variant's config (captured here, not run)."""
    import torch

    from ghost_kernels.bench.offline import cases, variants
    from ghost_kernels.core.spec import distinct_ghostnet_100_specs
    from ghost_kernels.triton import common as tc
    from ghost_kernels.triton.family import FAMILIES
    names = variants.register()
    try:
        assert names == ["triton_band:old_buffering"]
        shape = distinct_ghostnet_100_specs()[10]
        x, params = cases.make_inputs(shape, torch.bfloat16, "channels_last", 2)
        with tc.capture_launches() as new:
            FAMILIES["triton_band"].launcher(x, params, torch.bfloat16)
        with tc.capture_launches() as old:
            FAMILIES[names[0]].launcher(x, params, torch.bfloat16)
        stages = new[0].kwargs.get("num_stages")
        assert old[0].kwargs.get("num_stages") == (2 if stages and stages > 2 else stages)
    finally:
        for n in names:
            FAMILIES.pop(n, None)


def test_ncu_rows_become_calls_beside_the_model_terms():
    from ghost_kernels.bench import lab_ncu
    rows = lab_ncu._parse(NCU_CSV)
    assert [r["Kernel Name"] for r in rows] == ["_pw_kernel", "_dw_kernel", "_band_kernel"]
    plan = [dict(shape_index=9, variant=None, kernels=2), dict(shape_index=10, variant="old_buffering", kernels=1)]
    kernels = lab_ncu.assign_kernels("fam", rows, plan)
    assert [(k["shape_index"], k["variant"]) for k in kernels] == [(9, None), (9, None), (10, "old_buffering")]
    assert all(k["shape_index"] is None for k in lab_ncu.assign_kernels("fam", rows, plan[:1]))   # counts differ
    calls = lab_ncu.calls(kernels)
    first = calls[0]
    assert first["time_us"] == pytest.approx(40.0) and first["inst_executed"] == pytest.approx(4000)
    assert first["long_sb_pct"] == pytest.approx((10 * 20 + 30 * 60) / 40)       # time-weighted
    assert first["dram_pct"] == pytest.approx((10 * 80 + 30 * 40) / 40)
    model_rows = [dict(family="fam", name="blocks.5.0.ghost1", warp_instr=4e3, issue_us=1.0, hbm_us=30.0,
                       latency_us=35.0, predicted_us=35.0),
                  dict(family="fam:old_buffering", name="blocks.5.0.ghost2", warp_instr=5e3, issue_us=1.0,
                       hbm_us=9.0, latency_us=20.0, predicted_us=20.0)]
    terms = lab_ncu.offline_terms(model_rows)
    assert terms[("fam", 9, None)]["bound"] == "latency" and ("fam", 10, "old_buffering") in terms
    lines = lab_ncu.table(calls, terms)
    assert lines[2] == "| fam | 40->240 @28 | default | 40.0 | 50 | 50 | 2 | -/- | 1.0 | 30.0 | 35.0 | 35.0 (l) |"
    assert lines[3].startswith("| fam | 240->80 @14 | old_buffering | 50.0 | 30 | 70 | 10 |")


def test_cuda_kernel_latency_term_against_its_measurement():
    """The CUDA kernel of the built extension (same sm_90 SASS reading, trip counts from its source):
    its latency term within 30% of its 2026-11-28 H200 time on four of the five shapes (NOTES.md)."""
    from ghost_kernels.bench.offline import cuda_ext
    if cuda_ext.extension_path(ROOT) is None:
        pytest.skip("the CUDA extension is not built here")
    with open(V1_MEASURED) as f:
        measured = {r["name"]: r["median_ms"] * 1e3 for r in json.load(f)["rows"] if r["impl"] == "cuda"}
    rows_ = cuda_ext.model_extension(offline.select_shapes("quick"), ROOT)
    ratios = {r["name"]: r["latency_us"] / measured[r["name"]] for r in rows_}
    assert all(r["ctas_per_sm"] == 4 and r["regs"] == 58 for r in rows_)
    assert sum(0.7 <= v <= 1.3 for v in ratios.values()) >= 4, ratios
