"""The training ops in the offline model (issue 17, item 3; ghost_kernels/bench/offline/train.py): rows
per module and phase with the inference rows' keys, the training floor, the torch ops counted by bytes,
and the CI budget of the rebuild -- over GhostNet 1.0x's 32 modules the training kernels move at most
1.6x the training floor, and every training kernel issues at most 0.3 warp-instructions per byte.

The network-wide numbers come from the committed result (benchmarks/results/2026-12-03-offline-sm90-
train.json, remade with the command in test_committed_result_is_todays), checked against hashes of the
training kernels and the model's files, as tests/test_offline_latency.py does for v1: the full run
compiles ~40 kernels (about 1.5 minutes on 2 cores). What is recomputed here is small: one capture
without a compile, and one compiled 8x8 module at batch 2."""
import json
import os

import pytest
import torch

pytest.importorskip("triton")
from ghost_kernels.bench.offline import train  # noqa: E402
from ghost_kernels.core.spec import GhostSpec, ModuleShape  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "2026-12-03-offline-sm90-train.json")
REMAKE = ("python -m ghost_kernels.bench --offline --train --workers 1 --out DIR, then copy DIR/offline-train.json "
          "and .md to benchmarks/results/2026-12-03-offline-sm90-train.{json,md}")

# The inference rows' keys (rows.make_row) every training row carries too, and the training ones
ROW_KEYS = ("regs", "spills", "smem", "warp_instr", "floor_bytes", "floor_us", "hbm_bytes", "instr_per_byte",
            "issue_us", "hbm_us", "latency_us", "bytes_in_flight_per_sm", "ctas_per_sm", "rounds", "round_trips",
            "predicted_us", "variants", "launches", "error")
TRAIN_KEYS = ("phase", "modules", "triton_bytes", "torch_bytes", "torch_small_bytes", "bytes_over_floor",
              "max_kernel_instr_per_byte", "worst_kernel")
PASSES = {"forward": ["F1", "F2", "F3", "F4"], "backward": ["B0", "B1", "B2", "B3", "B4", "B5"]}


def small():
    return ModuleShape("small", GhostSpec(16, 16), 8, 8)


@pytest.fixture(scope="module")
def result():
    with open(RESULT) as f:
        return json.load(f)


def triton_launches(data):
    return [(r, la) for r in data["rows"] for la in r["launches"] if la["kind"] == "triton"]


# --------------------------------------------------------------------------------------------------
# Recomputed: the floor, the capture, one compiled module

def test_floor_by_hand():
    """16->16 @8x8, batch 2, bf16 (m = 8 primary and 8 ghost channels, 3x3 depthwise): forward x + out
    = 2 x 16 x 64 x 2 B twice; backward dL/dout + x + dL/dx and the parameter gradients (w1 8 x 16,
    wd 8 x 9, four BN vectors of 8: 232 elements)."""
    spec = GhostSpec(16, 16)
    assert train.train_floor(spec, 2, 8, 8, 2, "forward") == 4096 + 4096
    assert train.train_floor(spec, 2, 8, 8, 2, "backward") == 4096 + 2 * 4096 + 2 * (128 + 72 + 32)
    with pytest.raises(ValueError):
        train.train_floor(spec, 2, 8, 8, 2, "step")


def test_capture_records_every_pass_and_counts_the_gemms_by_bytes():
    """No compile: the step's Triton launches are F1-F4 and B0-B5, each with declared bytes, and B6's
    two GEMMs are torch ops counted by hand: dL/dw1 = g_z1^T x reads g_z1 (128 pixels x 8) and x (128 x
    16) and writes 8 x 16; dL/dx = g_z1 w1 reads g_z1 and w1 and writes 128 x 16 (2 B each)."""
    from ghost_kernels.bench.offline.train_capture import torch_entries
    cap = train.capture_train(small(), torch.bfloat16, "channels_last", 2)
    spec = small().spec
    for phase, (launches, ops) in cap.items():
        assert [train.pass_name(la, phase) for la in launches] == PASSES[phase]
        for la in launches:
            t = train.triton_traffic(la, spec, 2, 8, 8, 2)
            assert t["read_bytes"] > 0 and t["write_bytes"] > 0 and t["traffic"]
    # F4 reads y1 (8 bf16 channels: 16 B a pixel, whole 32-byte sectors of channels_last) and wd (8 x 9
    # bf16), writes the 8 ghost channels
    f4 = train.triton_traffic(cap["forward"][0][3], spec, 2, 8, 8, 2)
    assert f4["read_bytes"] == 2 * 64 * 32 + 8 * 9 * 2 and f4["write_bytes"] == 2 * 8 * 64 * 2
    mm = next(e for e in torch_entries(cap["backward"][1], "backward") if e["kernel"] == "aten.mm")
    assert mm["kind"] == "torch" and mm["calls"] == 2 and mm["pass"].startswith("B6")
    assert mm["read_bytes"] == 2 * 2048 + 4096 + 256 and mm["write_bytes"] == 256 + 4096


def test_compiled_rows_have_the_inference_keys_for_both_phases():
    """One small module through the whole model (capture, sm_90 compile in a child process without the
    interpreter, rows): both phases, every key, Triton and torch launches, no spills at this shape."""
    rows, meta = train.model_train([(small(), 1)], ["bfloat16"], ["channels_last"], batch=2, workers=1)
    assert [r["phase"] for r in rows] == ["forward", "backward"]
    for r in rows:
        assert not r["error"], r["error"]
        assert all(k in r for k in ROW_KEYS + TRAIN_KEYS), [k for k in ROW_KEYS + TRAIN_KEYS if k not in r]
        assert r["floor_bytes"] == train.train_floor(small().spec, 2, 8, 8, 2, r["phase"])
        assert r["hbm_bytes"] == r["triton_bytes"] + r["torch_bytes"] > r["floor_bytes"]
        kinds = {la["kind"] for la in r["launches"]}
        assert kinds == {"triton", "torch"}
        assert [la["pass"] for la in r["launches"] if la["kind"] == "triton"] == PASSES[r["phase"]]
        assert r["spills"] == 0 and r["latency_us"] is not None and r["predicted_us"] > 0
    assert set(meta["summary"]) == {"forward", "backward", "step"}


def test_train_flag_on_both_command_lines():
    from ghost_kernels.bench.__main__ import parse_args
    from ghost_kernels.bench.offline.cli import build_parser
    assert parse_args(["--offline", "--train", "--workers", "1"]).train
    assert build_parser().parse_args(["--train"]).train
    with pytest.raises(SystemExit):
        parse_args(["--train"])           # only --offline reads it


# --------------------------------------------------------------------------------------------------
# The committed GhostNet run (bf16, channels_last, batch 256)

def test_committed_result_is_todays(result):
    """The committed result must be remade when the training kernels or the model change (REMAKE)."""
    now = train.source_hashes()
    meta = result["meta"]
    assert meta["triton"].startswith("3.8"), meta["triton"]
    assert meta["sources"]["model"] == now["model"], f"the model changed since the result was made: {REMAKE}"
    assert meta["sources"]["kernels"] == now["kernels"], f"a training kernel changed since the result: {REMAKE}"


def test_committed_rows_cover_the_network_in_both_phases(result):
    rows = result["rows"]
    assert result["meta"]["batch"] == 256 and result["meta"]["dtypes"] == ["bfloat16"]
    for phase in ("forward", "backward"):
        mine = [r for r in rows if r["phase"] == phase]
        assert sum(r["modules"] for r in mine) == 32 and len(mine) == 22
        for r in mine:
            assert not r["error"] and all(k in r for k in ROW_KEYS + TRAIN_KEYS)
            assert [la["pass"] for la in r["launches"] if la["kind"] == "triton"] == PASSES[phase]
    # the backward's cuBLAS GEMMs are in, by bytes
    assert all(any(la["kind"] == "torch" and la["kernel"] == "aten.mm" for la in r["launches"])
               for r in rows if r["phase"] == "backward")
    s = result["meta"]["summary"]["step"]
    assert s["floor_bytes"] == pytest.approx(6.02e9, rel=0.01)      # NOTES: 6.0 GB (2026-11-28)


def test_no_training_kernel_spills(result):
    """Under CI's Triton (the committed result) no training kernel spills. (Under Triton 3.6, the GPU
    image's, B2 still spills 4 bytes at 40->240 @28: NOTES.md.)"""
    assert not [(r["name"], la["pass"], la["spills"]) for r, la in triton_launches(result) if la["spills"]]


@pytest.mark.xfail(strict=True, reason="issue 17: the training step moves 3.7x the floor (the backward: 4.6x)")
def test_training_moves_at_most_the_budget_over_the_floor(result):
    s = result["meta"]["summary"]["step"]
    assert s["bytes_over_floor"] <= train.BYTES_BUDGET, f"{s['bytes_over_floor']:.2f}x the training floor"


@pytest.mark.xfail(strict=True, reason="issue 17: F1 / F3 issue up to 0.86 / 0.47 warp-instructions per byte, "
                   "the backward's passes up to 0.45 (B1, B3, B4 at 14x14 and 7x7)")
def test_every_training_kernel_keeps_the_instruction_budget(result):
    over = sorted({(la["pass"], r["name"], round(la["instr_per_byte"], 2)) for r, la in triton_launches(result)
                   if la["instr_per_byte"] > train.KERNEL_INSTR_BUDGET})
    assert not over, f"over {train.KERNEL_INSTR_BUDGET} warp-instructions per byte: {over}"
