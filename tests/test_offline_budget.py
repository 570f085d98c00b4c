"""The instruction budget, held offline (no GPU): for every distinct GhostNet 1.0x shape in bf16 and
fp16 channels_last at batch 256, the Triton family that ``backend="triton"`` chooses must compile for
sm_90 without spills, move its main global traffic in 128-bit vectors where the channel counts allow,
and issue at most 0.25 modelled warp-instructions per HBM byte of the floor (``choice.INSTRUCTION_BUDGET``,
the enforced instruction budget). The model: ghost_kernels/bench/offline/."""
from collections import defaultdict

import pytest
import torch

from ghost_kernels.core import choice
from ghost_kernels.core.spec import distinct_ghostnet_100_specs

pytest.importorskip("triton")
from ghost_kernels.bench import offline  # noqa: E402

BUDGET = choice.INSTRUCTION_BUDGET
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_bits(spec) -> int:
    """The widest vector every row of x, y1 and the ghost half can use in channels_last (2-byte types):
    128 bits needs 8 channels, 64 bits 4."""
    counts = (spec.inp, spec.m, spec.oup - spec.m, spec.oup)
    for bits, channels in ((128, 8), (64, 4), (32, 2)):
        if all(c % channels == 0 for c in counts):
            return bits
    return 16


@pytest.fixture(scope="module")
def rows():
    shapes = distinct_ghostnet_100_specs()
    chosen = defaultdict(list)
    for shape in shapes:
        for name, dtype in DTYPES.items():
            fam = choice.triton_family(shape.spec, shape.h, shape.w, dtype, True)
            chosen[fam].append((shape, name))
    out = []
    for fam, cases in chosen.items():
        for dtype in DTYPES:
            picked = [s for s, d in cases if d == dtype]
            if picked:
                out += offline.model_rows([fam], picked, [dtype], ["channels_last"], 256)
    assert len(out) == 2 * len(shapes)
    return out


def test_chosen_family_keeps_the_instruction_budget(rows):
    over = [(r["family"], r["name"], r["dtype"], round(r["instr_per_byte"], 3)) for r in rows
            if r.get("error") or not r["instr_per_byte"] <= BUDGET]
    assert not over, f"over {BUDGET} warp-instructions per byte (or failed): {over}"


def test_chosen_family_does_not_spill(rows):
    spills = [(r["family"], r["name"], r["dtype"], r["spills"]) for r in rows if r["spills"]]
    assert not spills, spills


def test_chosen_family_uses_wide_vectors(rows):
    by_name = {s.name: s.spec for s in distinct_ghostnet_100_specs()}
    narrow = []
    for r in rows:
        want = expected_bits(by_name[r["name"]])
        ld, st = r.get("ld_bits_main", r["ld_bits"]), r.get("st_bits_main", r["st_bits"])
        if r.get("tma_loads"):   # x arrives by TMA (bulk tensor copies): wider than any vector load
            ld = max(ld or 0, 128)
        if ld < want or st < want:
            narrow.append((r["family"], r["name"], r["dtype"], ld, st, want))
    assert not narrow, narrow


# Chosen rows the latency term still binds past 1.25x their HBM time (issue 15): (name, dtype) -> why
LATENCY_KNOWN_MISSES = {
    ("blocks.6.1.ghost1", "float16"): "two-pass's depthwise pass at 14x14: 1.27x (bf16: 1.24x)",
}


def test_chosen_family_is_within_the_latency_budget(rows):
    """Issue 15's latency budget: the latency-aware prediction of every chosen row is at most 1.25x its
    HBM time (the families reach the bandwidth rather than wait on dependent round trips); the known
    misses must still miss (fixing one should remove it here)."""
    ratio = {(r["name"], r["dtype"]): r["predicted_us"] / r["hbm_us"] for r in rows}
    over = {k: round(v, 3) for k, v in ratio.items() if v > 1.25 and k not in LATENCY_KNOWN_MISSES}
    assert not over, f"latency-bound past 1.25x HBM: {over}"
    fixed = [k for k in LATENCY_KNOWN_MISSES if ratio[k] <= 1.25]
    assert not fixed, f"now within the budget (remove from LATENCY_KNOWN_MISSES): {fixed}"
