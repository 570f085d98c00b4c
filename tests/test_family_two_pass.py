"""``triton_two_pass`` (pass 1: pixel-major GEMM into out[:, :m]; pass 2: depthwise stencil into
out[:, m:oup]) against the float64 reference. CPU interpreter here, device="cuda" on a GPU.

Every output is NaN-poisoned before the launch (``torch.full(nan)`` in the output's memory format),
so an element the kernels forget shows as NaN; the error bound is the package's: at most twice
eager's error at the same dtype plus ``ERR_FLOOR``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, LAYOUTS, RandomGhost, assert_close_to_reference, eager_and_ref, make_x, poisoned_output

import ghost_kernels as gk
from ghost_kernels.triton import common as tc
from ghost_kernels.triton import family as triton_family
from ghost_kernels.triton import two_pass as tp

# The shared sweeps of every family (GhostNet shapes, options, sizes, NaN/Inf, autocast, opcheck) are
# in test_triton_forward.py, test_errors.py and test_compile.py; this file holds what is particular
# to the two-pass kernels: their configs, launch splitting, NCHW and generic-stride paths, loops.

# The interpreter's numpy warns about NaN/Inf arithmetic in lanes whose results are never stored
# (masked lanes, channel lanes that over-read ghost channels); stored results are checked below.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
GhostParams = RandomGhost


def kparams(rg, dtype=None) -> gk.GhostParams:
    """The kernel's parameter bundle from the tests' random module (cast to ``dtype`` if given)."""
    return (rg.to(dtype) if dtype is not None else rg).params


def poisoned(x, spec, dtype):
    return poisoned_output(x, spec, dtype)


def run_poisoned(x, rg, dtype=None, config=None, params_dtype=None):
    """The family into NaN-filled memory; params at ``params_dtype`` (default: the compute dtype)."""
    dtype = dtype or x.dtype
    out = poisoned(x, rg.spec, dtype)
    result = tp.forward(x, kparams(rg, params_dtype or dtype), dtype, out=out, config=config)
    assert result.data_ptr() == out.data_ptr()
    return out


def check(spec, n, h, w, dtype, layout, what, config=None):
    rg = GhostParams(spec, DEVICE)
    x = make_x(n, spec.inp, h, w, dtype, layout)
    out = run_poisoned(x, rg, config=config)
    eager, ref = eager_and_ref(rg, x)
    assert out.shape == eager.shape
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) elements"
    assert_close_to_reference(out, eager, ref, dtype, what)
    return out



def test_oup_one_and_no_ghost_kept():
    """oup = 1 (m = 1, every ghost channel sliced away): pass 2 is not launched."""
    spec = gk.GhostSpec(6, 1, ratio=2)
    with tc.capture_launches() as launches:
        tp.forward(torch.empty(1, 6, 4, 4), kparams(GhostParams(spec, "cpu")), torch.float32)
    assert len(launches) == 1
    check(spec, 2, 5, 4, torch.float32, "nchw", "oup 1")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_non_dense_input_strides(layout, stride):
    """Cropped and channel-sliced views and a transposed plane: any x strides work, no copy of x."""
    spec = gk.GhostSpec(6, 10, ratio=3, stride=stride)
    rg = GhostParams(spec, DEVICE)
    base = make_x(2, 9, 13, 15, torch.float32, layout)
    for what, x in (("crop", base[:, 1:7, 1:10, 2:13]), ("channel slice", base[:, 3:9]),
                    ("transposed plane", base[:, :6].transpose(2, 3)), ("batch stride", base[::2, :6])):
        out = run_poisoned(x, rg)
        eager, ref = eager_and_ref(rg, x)
        assert_close_to_reference(out, eager, ref, torch.float32, f"{what} {layout} stride {stride}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_with_any_strides(dtype):
    """A given ``out`` that is a view (plane not dense; channels strided) takes the generic paths."""
    spec = gk.GhostSpec(8, 13, ratio=2, dw_size=5)
    rg = GhostParams(spec, DEVICE)
    x = make_x(2, 8, 7, 9, dtype, "nchw")
    eager, ref = eager_and_ref(rg, x)
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # noqa: E731
    for what, out in (("padded plane", nan(2, 13, 9, 12)[:, :, 1:8, 2:11]),
                      ("channels_last, more channels", nan(2, 16, 7, 9).to(memory_format=torch.channels_last)[:, 2:15]),
                      ("every other channel", nan(2, 26, 7, 9)[:, ::2])):
        tp.forward(x, kparams(rg, dtype), dtype, out=out)
        assert not torch.isnan(out).any(), what
        assert_close_to_reference(out, eager, ref, dtype, what)



def _without_affine(rg):
    rg.bn1 = rg.bn1._replace(weight=None, bias=None)
    rg.bn2 = rg.bn2._replace(weight=None, bias=None)
    return rg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batchnorm_without_affine(dtype, layout):
    spec = gk.GhostSpec(10, 14, ratio=2)
    rg = _without_affine(GhostParams(spec, DEVICE))
    x = make_x(2, 10, 6, 7, dtype, layout)
    out = run_poisoned(x, rg)
    eager, ref = eager_and_ref(rg, x)
    assert_close_to_reference(out, eager, ref, dtype, f"affine=False {dtype} {layout}")


def test_bn_in_fp32_for_a_half_model():
    """BatchNorm tensors wider than the convs (fp32 BN in a bf16 model) are read in fp32."""
    spec = gk.GhostSpec(8, 12)
    rg = GhostParams(spec, DEVICE)
    x = make_x(2, 8, 6, 6, torch.bfloat16, "channels_last")
    params = gk.GhostParams(rg.w1.bfloat16(), rg.bn1, rg.wd.bfloat16(), rg.bn2, spec)
    out = poisoned(x, spec, torch.bfloat16)
    tp.forward(x, params, torch.bfloat16, out=out)
    eager, ref = eager_and_ref(rg, x)
    assert_close_to_reference(out, eager, ref, torch.bfloat16, "fp32 BN")


def test_output_layout_and_dtype():
    """Without ``out``: eager's shape and memory format, in the compute dtype; a wrong ``out`` is refused."""
    spec = gk.GhostSpec(8, 12, stride=2)
    rg = GhostParams(spec, DEVICE)
    for layout in LAYOUTS:
        x = make_x(2, 8, 7, 9, torch.float32, layout)
        out = tp.forward(x, kparams(rg), torch.float32)
        probe = torch.nn.functional.conv2d(x, x.new_zeros(12, 8, 1, 1), stride=2)
        assert out.shape == probe.shape and out.stride() == probe.stride(), layout
    with pytest.raises(ValueError, match="out must be"):
        tp.forward(x, kparams(rg), torch.float32, out=torch.empty(2, 12, 4, 6, dtype=torch.float16))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_multi_step_programs(layout):
    """Few programs with many steps each: several pixel tiles per pass-1 program (several channel blocks,
    a K loop of 3 masked steps) and several pixel steps per pass-2 program."""
    spec = gk.GhostSpec(40, 70, ratio=2)   # m = 35: 3 channel blocks of 16, pass 2 in blocks of 8/4
    half = layout == "channels_last"
    dtype = torch.bfloat16 if half else torch.float32
    base = tp.default_config(spec, 9, 10, dtype, half)
    cfg = base._replace(BLOCK_P=16, BLOCK_N=16, BLOCK_K=16, PROGS1=1, BLOCK_G=8, PROGS2=1)
    check(spec, 3, 9, 10, dtype, layout, f"multi-step {layout}", config=cfg)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dw", [3, 5])
def test_pass2_bands_of_rows(layout, dw, monkeypatch):
    """Pass 2 walks bands of rows: several bands per image (d - 1 halo rows loaded before each band's
    loop, partial rows past its end never stored, the last band shorter), unit blocks that span images
    and end inside the batch; with and without the row ring (STAGES2 4 and 1) -- the same function."""
    monkeypatch.setattr(tp, "MIN_ROWS", 2)
    spec = gk.GhostSpec(8, 14, ratio=2, dw_size=dw, act="none")   # m = 7; d = 5: weights not hoisted
    half = layout == "channels_last"
    dtype = torch.bfloat16 if half else torch.float32
    base = tp.default_config(spec, 11, 6, dtype, half)
    with tc.capture_launches() as launches:
        tp.forward(make_x(3, 8, 11, 6, dtype, layout).cpu(), kparams(GhostParams(spec, "cpu"), dtype), dtype,
                   config=base._replace(BLOCK_G=8, PROGS2=64))
    assert launches[1].args[-2] > 1 and launches[1].loops[0] < 11        # several bands of rows
    for stages in (4, 1):
        cfg = base._replace(BLOCK_G=8, PROGS2=64, STAGES2=stages)
        check(spec, 3, 11, 6, dtype, layout, f"bands d={dw} {layout} stages {stages}", config=cfg)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lab_configs(layout):
    """Every config the GPU lab may time computes the same function (<= 6 per shape)."""
    spec = gk.GhostSpec(24, 40, act="none")
    half = layout == "channels_last"
    cfgs = tp.lab_configs(spec, 6, 12, torch.bfloat16, half)
    assert 1 <= len(cfgs) <= 6 and cfgs[0] == tp.default_config(spec, 6, 12, torch.bfloat16, half)
    assert len(set(cfgs)) == len(cfgs) and all(isinstance(c, tp.TwoPassConfig) for c in cfgs)
    for cfg in cfgs:
        check(spec, 2, 6, 12, torch.bfloat16, layout, f"{cfg}", config=cfg)


def test_batch_split_into_launches(monkeypatch):
    """More flattened pixels than one launch indexes (2^30 on a GPU; 60 here): the batch is split."""
    monkeypatch.setattr(tp, "MAX_PIXELS", 60)
    spec = gk.GhostSpec(8, 12)
    with tc.capture_launches() as launches:
        tp.forward(torch.empty(5, 8, 5, 6), kparams(GhostParams(spec, "cpu")), torch.float32)
    assert len(launches) == 2 * 3   # 2 images (60 pixels) per launch pair
    check(spec, 5, 5, 6, torch.float32, "channels_last", "split batch")


def test_launches_record_their_loops():
    """Both launches go through triton_common.launch with one trip count per runtime loop."""
    spec = gk.GhostSpec(48, 24)
    for layout in LAYOUTS:
        x = make_x(2, 48, 9, 9, torch.bfloat16, layout).cpu()
        with tc.capture_launches() as launches:
            tp.forward(x, kparams(GhostParams(spec, "cpu"), torch.bfloat16), torch.bfloat16)
        assert [len(L.loops) for L in launches] == [2, 1]
        assert launches[0].kernel is tp._pw_kernel
        assert launches[1].kernel is (tp._dw_kernel if layout == "channels_last" else tp._dw_nchw_kernel)
        assert all(t >= 1 for L in launches for t in L.loops)



OP_CASES = [(gk.GhostSpec(8, 12), torch.bfloat16, "channels_last"),
            (gk.GhostSpec(6, 11, ratio=3, dw_size=5, stride=2, act="none"), torch.float32, "nchw")]



def test_magic_division():
    """The kernels' multiply-high division is exact for every numerator below 2^30."""
    import random
    rnd = random.Random(0)
    for d in [1, 2, 3, 7, 14, 49, 112, 196, 3136, 12544, 2**20 + 7, 2**30 - 1]:
        magic, shift = tp._magic(d)
        assert 0 < magic < 2**31
        for p in [0, 1, d - 1, d, d + 1, 2**30 - 1, 2**30 - d] + [rnd.randrange(2**30) for _ in range(2000)]:
            if 0 <= p < 2**30:
                assert ((4 * p * magic) >> 32) >> shift == p // d, (d, p)


def test_backend_object():
    assert tp.BACKEND.name == "triton_two_pass" and tp.BACKEND.launcher.unchecked is tp.forward
    assert triton_family.FAMILIES["triton_two_pass"] is tp.BACKEND
    assert tp.BACKEND.default_config is tp.default_config and tp.BACKEND.lab_configs is tp.lab_configs
    assert tp.BACKEND.support is not None and not tp.BACKEND.trains
    spec = gk.GhostSpec(16, 16)
    cfg = tp.default_config(spec, 112, 112, torch.bfloat16, True)
    assert type(cfg)(**cfg._asdict()) == cfg   # how choice.py rebuilds a measured config


# --------------------------------------------------------------------------------------------------
# Offline sm_90 compile (Triton's own ptxas; no GPU): the real launches' specialization, SASS checks.

COMPILE_CASES = [  # (dtype, layout, spec, H = W): the main GhostNet path, and the extremes of the options
    ("bf16", "channels_last", gk.GhostSpec(16, 16), 112),
    ("fp32", "nchw", gk.GhostSpec(24, 37, ratio=4, dw_size=7, stride=2, act="none"), 18),
]


def _compile_report(i: int) -> dict:
    """Capture the case's launches, specialize them as a GPU launch would, compile for sm_90 and read
    registers, spills and the widest global accesses from the cubin (run in a child process)."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    dtype_name, layout, spec, hw = COMPILE_CASES[i]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    x = torch.empty(256, spec.inp, hw, hw, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    rg = GhostParams(spec, "cpu").to(dtype)
    with tc.capture_launches() as launches:
        tp.forward(x, kparams(rg), dtype)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    rep = []
    for L in launches:
        k = L.kernel
        binder = create_function_from_signature(k.signature, k.params, backend)
        bound, specialization, opts = binder(*L.args, **L.kwargs)
        options, signature, constexprs, attrs = k._pack_args(backend, L.kwargs, bound, specialization, opts)
        compiled = triton.compile(ASTSource(k, signature, constexprs, attrs), target=target, options=options.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(bindir, "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=False).stdout
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
        os.unlink(f.name)
        regs = re.search(r"REG:(\d+)", res)
        ops = set(re.findall(r"\b((?:LDG|STG|LDGSTS|STL|LDL)[A-Z0-9_.]*)", sass))
        rep.append(dict(kernel=k.fn.__name__, regs=int(regs.group(1)) if regs else None,
                        spills=any(o.startswith(("STL", "LDL")) for o in ops), ops=sorted(ops),
                        wgmma="wgmma" in compiled.asm["ptx"]))
    return dict(launches=rep)


def _has_offline_compiler():
    try:
        import triton
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


@pytest.mark.skipif(not _has_offline_compiler(), reason="this Triton has no offline compiler / cuobjdump")
@pytest.mark.parametrize("i", range(len(COMPILE_CASES)), ids=lambda i: f"{COMPILE_CASES[i][0]}-{COMPILE_CASES[i][1]}")
def test_compiles_for_sm90(i):
    """Both kernels compile for sm_90 at a real launch's specialization (the interpreter checks none of
    this): no spills; channels_last half moves 16-byte vectors, pass 1 runs on wgmma and pass 2 loads
    its rows by cp.async (the row ring)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, json; sys.path.insert(0, 'tests'); import test_family_two_pass as t; "
            f"print(json.dumps(t._compile_report({i})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0 and ("ImportError" in res.stderr or "AttributeError" in res.stderr):
        pytest.skip(f"offline compile API differs: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    dtype_name, layout = COMPILE_CASES[i][:2]
    for L in rep["launches"]:
        assert not L["spills"], L
    if dtype_name != "fp32" and layout == "channels_last":
        pw, dw = rep["launches"]
        assert pw["wgmma"], pw
        assert any(o.startswith("LDGSTS") and o.endswith(".128") for o in pw["ops"]), pw
        assert "STG.E.128" in pw["ops"] and "STG.E.128" in dw["ops"] and "LDG.E.128" in dw["ops"], rep
        # pass 2's rows arrive a step ahead: 16-byte cp.async into the shared-memory ring (the band's
        # first rows, before the loop, are plain LDG.128)
        assert any(o.startswith("LDGSTS") and o.endswith(".128") for o in dw["ops"]), dw
