"""The ``triton_band`` family (single pass, full-width row bands, stencil by in-register shifts) against
the float64 reference: CPU interpreter here, device="cuda" on a GPU.

Every output is NaN-poisoned before the launch (``torch.full(nan)`` in the output's memory format), so
an element the kernel forgets shows as NaN. Both tiling regimes run: whole images per program (the
default at the reduced sizes used here, several images per program for small planes) and bands of rows
with a recomputed halo (forced through ``config``).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    LAYOUTS,
    REDUCED,
    RandomGhost,
    assert_close_to_reference,
    eager_and_ref,
    make_x,
    poisoned_output,
)

import ghost_kernels as gk
from ghost_kernels.core.backend import Request
from ghost_kernels.core.spec import distinct_ghostnet_100_specs
from ghost_kernels.triton import band as tb
from ghost_kernels.triton import common as tc
from ghost_kernels.triton import family as triton_family

triton = tc.triton

# The shared sweeps of every family (GhostNet shapes, options, sizes, NaN/Inf, autocast, out
# validation, opcheck) are in test_triton_forward.py, test_errors.py and test_compile.py; this file
# holds what is particular to the band kernel: its geometries, bands, image packing, wide rows.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
GhostParams = RandomGhost


def kernel_params(p: RandomGhost) -> gk.GhostParams:
    return p.params


def poisoned_out(x, spec, dtype):
    return poisoned_output(x, spec, dtype)


def run_poisoned(x, params, dtype, config=None):
    out = poisoned_out(x, params.spec, dtype)
    result = tb.forward(x, kernel_params(params), dtype, out=out, config=config)
    assert result.data_ptr() == out.data_ptr()
    return out


def check(spec, n, h, w, dtype, layout, what, config=None, x=None):
    params = GhostParams(spec, DEVICE)
    x = make_x(n, spec.inp, h, w, dtype, layout) if x is None else x
    out = run_poisoned(x, params, dtype, config)
    eager, ref = eager_and_ref(params, x)
    assert out.shape == eager.shape
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) elements"
    assert_close_to_reference(out, eager, ref, dtype, what)
    return out


def band_configs(spec, ho, wo, dtype):
    """One config per tile geometry of this output size: whole images (if they fit) and bands."""
    return [tb.make_config(spec, ho, wo, dtype, geometry=g) for g, _ in tb.geometries(spec, ho, wo)]


def smallest_band(spec, ho, wo, dtype):
    """Bands of the fewest rows (at least one output row each), whatever the lane count."""
    p = spec.dw_size // 2
    geometry = (tc.next_pow2(wo + p), tc.next_pow2(2 * p + 1), p, 1)
    return tb.make_config(spec, ho, wo, dtype, geometry=geometry)


# --------------------------------------------------------------------------------------------------
# GhostNet 1.0x's large planes in bands of rows (the shared sweep runs them as whole images)


@pytest.mark.parametrize("shape", [s for s in distinct_ghostnet_100_specs() if s.h >= 28],
                         ids=lambda s: f"{s.spec.inp}-{s.spec.oup}-{s.h}-{s.spec.act}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ghostnet_100_multi_band(shape, layout):
    """The large-plane modules in the band regime: several bands per image, halo rows recomputed."""
    hw = REDUCED[shape.h] if DEVICE == "cpu" else shape.h
    dtype = torch.bfloat16 if layout == "channels_last" else torch.float16
    cfg = smallest_band(shape.spec, hw, hw, dtype)
    assert tb.n_bands_of(cfg, shape.spec, hw) > 1
    check(shape.spec, 2, hw, hw, dtype, layout, f"{shape.name} bands {cfg}", config=cfg)


# --------------------------------------------------------------------------------------------------
# Options: ratio x dw x stride x act, odd oup; every geometry on a few sizes




@pytest.mark.parametrize("dw", [1, 3, 5, 7])
def test_every_geometry(dw):
    """Every tile geometry of a 13 x 11 output (whole image, bands of each height), and the lab configs."""
    spec = gk.GhostSpec(12, 21, ratio=3, dw_size=dw)
    cfgs = band_configs(spec, 13, 11, torch.float32) + tb.lab_configs(spec, 13, 11, torch.float32)
    bands = [tb.n_bands_of(c, spec, 13) for c in cfgs]
    assert 1 in bands and max(bands) > 1, bands
    x = make_x(2, 12, 13, 11, torch.float32, "nchw")
    for cfg in cfgs:
        check(spec, 2, 13, 11, torch.float32, "nchw", f"dw {dw} {cfg}", config=cfg, x=x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_channel_blocks_and_several_images(dtype, layout, stride):
    """m = 19 over channel blocks of 8 (the last one partial), 3 images over programs of 2 and 4."""
    spec = gk.GhostSpec(24, 37, ratio=2, dw_size=3, stride=stride)
    x = make_x(3, 24, 13, 11, dtype, layout)
    ho, wo = spec.out_hw(13, 11)
    whole = [g for g, _ in tb.geometries(spec, ho, wo) if g[2] == 0][0]
    for imgs in (1, 2, 4):
        cfg = tb.make_config(spec, ho, wo, dtype, geometry=whole[:3] + (imgs,), block_m=8)
        check(spec, 3, 13, 11, dtype, layout, f"{dtype} {layout} stride {stride} {cfg}", config=cfg, x=x)


# --------------------------------------------------------------------------------------------------
# Sizes, strides, special values


@pytest.mark.parametrize("w,dw", [(61, 3), (100, 5), (130, 3)])
def test_wide_images(w, dw):
    """Rows of 64-256 lanes: the band regime (a whole image does not fit the tile)."""
    spec = gk.GhostSpec(8, 10, dw_size=dw, act="none")
    ho, wo = spec.out_hw(20, w)
    cfg = tb.default_config(spec, ho, wo, torch.float16, True)
    assert tb.n_bands_of(cfg, spec, ho) > 1, cfg
    check(spec, 1, 20, w, torch.float16, "channels_last", f"w={w} dw={dw}")


def test_too_wide_is_declared():
    """Rows wider than a tile can hold: extra_reasons says so (dispatch falls back); narrower rows run."""
    spec = gk.GhostSpec(8, 8, dw_size=7)
    params = kernel_params(GhostParams(spec, DEVICE))
    wide = torch.zeros(1, 8, 4, 300, device=DEVICE)
    reasons = tb.extra_reasons(Request.make(wide, params, training=False))
    assert reasons and "lanes" in reasons[0]
    assert tb.extra_reasons(Request.make(wide[..., :100], params, training=False)) == []
    assert tb.BACKEND.extra_reasons is tb.extra_reasons


def test_non_dense_input_strides():
    """Any input strides: a cropped view, a permuted one, and a stride-2 slice of channels_last."""
    spec = gk.GhostSpec(6, 10, ratio=3)
    base = torch.randn(2, 6, 12, 15, device=DEVICE)
    views = [base[:, :, 1:10, 2:13],
             base.permute(0, 1, 3, 2),
             base.to(memory_format=torch.channels_last)[:, :, ::2, 1::2],
             torch.randn(2, 12, 9, 8, device=DEVICE)[:, ::2]]
    for x in views:
        check(spec, 2, 0, 0, torch.float32, "nchw", f"strides {x.stride()}", x=x)



def test_batchnorm_without_affine():
    """affine=False: no weight or bias in either BN (folded_bn's BN_WEIGHT / BN_BIAS flags off)."""
    spec = gk.GhostSpec(10, 14, ratio=2, dw_size=5)
    params = GhostParams(spec, DEVICE)
    params.bn1 = params.bn1._replace(weight=None, bias=None)
    params.bn2 = params.bn2._replace(weight=None)
    x = make_x(2, 10, 8, 9, torch.float32, "channels_last")
    out = run_poisoned(x, params, torch.float32)
    eager = params.reference(x)
    p64 = params.to(torch.float64)
    ref = p64.reference(x.double())
    assert_close_to_reference(out, eager, ref, torch.float32, "affine=False")


def test_weights_of_any_strides():
    """w1 and wd as non-contiguous views (the kernel reads them through their strides)."""
    spec = gk.GhostSpec(8, 12, ratio=3, dw_size=3)
    params = GhostParams(spec, DEVICE)
    params.w1 = torch.randn(spec.inp, spec.m, 1, 1, device=DEVICE).transpose(0, 1)
    params.wd = torch.randn(spec.new, 1, 3, 3, device=DEVICE).transpose(2, 3)
    x = make_x(2, 8, 6, 7, torch.float32, "nchw")
    out = run_poisoned(x, params, torch.float32)
    eager, ref = eager_and_ref(params, x)
    assert_close_to_reference(out, eager, ref, torch.float32, "strided weights")


# --------------------------------------------------------------------------------------------------
# The op path, the backend object, the launch record


def test_backend_object():
    assert isinstance(tb.BACKEND, triton_family.TritonFamily)
    fam = triton_family.FAMILIES["triton_band"]
    # the launcher behind the family's table check (family._spec_checked)
    assert tb.BACKEND.name == "triton_band" and fam.launcher.unchecked is tb.forward
    spec = gk.GhostSpec(8, 12)
    params = kernel_params(GhostParams(spec, DEVICE))
    req = Request.make(torch.zeros(1, 8, 5, 5, device=DEVICE), params, training=False)
    assert tb.BACKEND.not_supported_reasons(req) == []


def test_older_triton_is_declared_and_triton_runs_another_family(monkeypatch):
    """Triton 3.2 has no tl.gather and no 8-channel tl.dot: the band family says so, and
    backend="triton" runs another family instead of failing in the compiler."""
    monkeypatch.setattr(tc, "triton_version", lambda: (3, 2))
    reason = tb.BACKEND.environment_reason()
    assert reason is not None and "needs Triton >= 3.3" in reason and "tl.gather" in reason
    assert gk.available_backends()["triton_band"] == reason
    m = gk.GhostModule(8, 12, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    with torch.no_grad():
        assert "family triton_band" not in m.explain(x) and "family triton_" in m.explain(x)
        m.backend = "torch"
        expected = m(x)
        m.backend = "triton"
        torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-4)
        m.backend = "triton_band"
        with pytest.raises(gk.BackendNotSupported, match="needs Triton >= 3.3"):
            m(x)
    monkeypatch.setattr(tc, "triton_version", lambda: (3, 3))
    assert tb.BACKEND.environment_reason() is None

def test_launch_record_and_compiled_variants():
    """Every launch goes through triton_common.launch with the K loop's trip count; the GhostNet 1.0x
    shapes compile a bounded number of variants (constexprs + Triton's own specialization)."""
    keys = set()
    for shape in distinct_ghostnet_100_specs():
        spec = shape.spec
        x = torch.empty(64, spec.inp, shape.h, shape.w, device="meta", dtype=torch.bfloat16)
        x = x.to(memory_format=torch.channels_last)
        params = kernel_params(GhostParams(spec, "cpu").to(torch.bfloat16))
        params = params._replace(w1=params.w1.to("meta"), wd=params.wd.to("meta"))
        with tc.capture_launches() as launches:
            tb.forward(x, params, torch.bfloat16)
        (launch,) = launches
        assert launch.kernel is tb._band_kernel
        steps = -(-spec.inp // launch.kwargs["BLOCK_K"])
        assert launch.loops == ((steps,) if steps > 1 else ())   # a one-step K loop folds away
        ints = tuple((v == 1, v % 16 == 0) for v in launch.args if isinstance(v, int) and not isinstance(v, bool))
        keys.add((tuple(sorted(launch.kwargs.items())), ints))
    assert len(keys) <= len(distinct_ghostnet_100_specs()), len(keys)




# --------------------------------------------------------------------------------------------------
# The K loop's pipeline (issue 15): x boxes in flight


def test_k_loop_buffers_in_the_policy():
    """A K loop over x by TMA runs X_BUFFERS + 1 stages (the 4-D box gets num_stages - 1 shared-memory
    buffers) where the programs that share an SM still fit its shared memory, at least 2 buffers
    anyway; no K loop, one stage; the lab also times the old 2 stages (one buffer)."""
    for shape in distinct_ghostnet_100_specs():
        spec = shape.spec
        ho, wo = spec.out_hw(shape.h, shape.w)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            cfg = tb.default_config(spec, ho, wo, dtype, True)
            if spec.inp <= cfg.BLOCK_K:
                assert cfg.num_stages == 1, (shape.name, cfg)
                continue
            assert 2 <= tb.x_buffers(cfg.num_stages, tma=True) <= tb.X_BUFFERS, (shape.name, cfg)
            es = torch.empty((), dtype=dtype).element_size()
            box = cfg.W_PAD * cfg.T_ROWS * cfg.IMGS * cfg.BLOCK_K * es
            assert tb.x_buffers(cfg.num_stages, tma=True) * box <= tb.SMEM_PER_SM // 2, (shape.name, cfg)
            if dtype == torch.bfloat16:
                assert cfg._replace(num_stages=2) in tb.lab_configs(spec, ho, wo, dtype, True)
    assert tb.x_buffers(4, tma=True) == 3 and tb.x_buffers(2, tma=False) == 2


def _ttgir_buffers(i: int) -> dict:
    """Compile the real launch of GhostNet shape ``i`` (bf16 channels_last, batch 256) for sm_90 and
    return the shared-memory buffers of each local_alloc in its TTGIR (run in a child process)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    shape = distinct_ghostnet_100_specs()[i]
    spec = shape.spec
    x = torch.empty(256, spec.inp, shape.h, shape.w, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    params = kernel_params(GhostParams(spec, "cpu").to(torch.bfloat16))
    with tc.capture_launches() as launches:
        tb.forward(x, params, torch.bfloat16)
    (L,) = launches
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    k = L.kernel
    bound, specialization, opts = create_function_from_signature(k.signature, k.params, backend)(*L.args, **L.kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, L.kwargs, bound, specialization, opts)
    ttgir = triton.compile(ASTSource(k, signature, constexprs, attrs), target=target, options=options.__dict__).asm["ttgir"]
    allocs = re.findall(r"local_alloc[^\n]*?-> !ttg.memdesc<([0-9x]+)bf16", ttgir)
    return dict(allocs=allocs, tma=len(re.findall(r"async_tma_copy_global_to_local", ttgir)),
                num_stages=L.kwargs["num_stages"])


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(getattr(triton, "__file__", "") or "."),
                                                    "backends", "nvidia", "bin", "ptxas")),
                    reason="this Triton has no offline compiler")
def test_x_and_w1_are_multi_buffered_for_sm90():
    """672->112 @14 (11 K steps): the TTGIR gives the x box (1x16x16x64) num_stages - 1 >= 2 buffers
    and w1's box (64x64) num_stages; both arrive by TMA (was: one x buffer, w1 by pointers)."""
    i = [s.name for s in distinct_ghostnet_100_specs()].index("blocks.6.4.ghost2")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys, json; sys.path.insert(0, 'tests'); import test_family_band as t; "
            f"print(json.dumps(t._ttgir_buffers({i})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0 and ("ImportError" in res.stderr or "AttributeError" in res.stderr):
        pytest.skip(f"offline compile API differs: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    stages = rep["num_stages"]
    x_bufs = [int(a.split("x")[0]) for a in rep["allocs"] if a.endswith("x16x16x64x")]
    w_bufs = [int(a.split("x")[0]) for a in rep["allocs"] if a.endswith("x64x64x")]
    assert stages == tb.X_BUFFERS + 1 and x_bufs == [stages - 1] and w_bufs == [stages], rep
    assert rep["tma"] >= 2 * stages, rep     # x and w1 boxes: prologue and loop
