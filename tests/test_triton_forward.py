"""Every Triton kernel family's forward against the float64 reference (CPU interpreter here,
device="cuda" on a GPU): each test runs once per family (helpers.FAMILIES).

Every kernel output is NaN-poisoned before the launch, so an element the kernel forgets shows as NaN.
"""
import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    FAMILIES,
    FORMS,
    LAYOUTS,
    REDUCED,
    SWEEP,
    RandomGhost,
    assert_close_to_reference,
    check,
    eager_and_ref,
    make_x,
    poisoned_output,
    rel_err,
    run_poisoned,
)

import ghost_kernels as gk
from ghost_kernels import dispatch
from ghost_kernels.core.spec import ACTIVATIONS, distinct_ghostnet_100_specs

family = pytest.mark.parametrize("fam", FAMILIES)


def launcher(fam):
    return dispatch.BY_NAME[fam].launcher


# Every shape in both layouts; on a GPU every dtype too, in the interpreter the dtype rotates (each
# dtype meets every resolution and both layouts): the interpreter is slow, and the dtypes of one
# shape share all the code but the casts.
GHOSTNET_CASES = [(shape, dtype, layout) for i, shape in enumerate(distinct_ghostnet_100_specs())
                  for j, layout in enumerate(LAYOUTS)
                  for dtype in (DTYPES if DEVICE == "cuda" else [DTYPES[(i + j) % len(DTYPES)]])]


@family
@pytest.mark.parametrize("shape,dtype,layout", GHOSTNET_CASES,
                         ids=lambda v: f"{v.spec.inp}-{v.spec.oup}-{v.h}-{v.spec.act}" if hasattr(v, "spec") else str(v))
def test_ghostnet_100_configurations(fam, shape, dtype, layout):
    """Every distinct Ghost module of GhostNet 1.0x (channel counts from the stage table)."""
    hw = REDUCED[shape.h] if DEVICE == "cpu" else shape.h
    check(shape.spec, 2, hw, hw, dtype, layout, f"{fam} {shape.name} {dtype} {layout}", fam)


@family
@pytest.mark.parametrize("i,ratio,dw,stride,act", [(i,) + c for i, c in enumerate(SWEEP)])
def test_option_sweep(fam, i, ratio, dw, stride, act):
    """ratio x dw_size x stride x act, with an oup that forces the channel slice; dtype and layout rotate."""
    oup = 2 * ratio + 1 + 4 * (i % 5)  # odd and even oup; the slice drops ghost channels for most
    spec = gk.GhostSpec(5 + i % 7, oup, ratio=ratio, dw_size=dw, stride=stride, act=act)
    dtype, layout = DTYPES[i % 3], LAYOUTS[(i // 3) % 2]
    check(spec, 2, 9 + i % 4, 6 + i % 5, dtype, layout, f"{fam} {spec} {dtype} {layout}", fam)


@family
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_dtypes_and_layouts(fam, dtype, layout, stride):
    spec = gk.GhostSpec(24, 37, ratio=2, dw_size=3, stride=stride)  # m = 19: two channel blocks of 16
    check(spec, 3, 13, 11, dtype, layout, f"{fam} {dtype} {layout} stride {stride}", fam)


@family
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (2, 3), (5, 37), (40, 9), (33, 70)])
@pytest.mark.parametrize("dw", [3, 7])
def test_spatial_sizes(fam, hw, dw):
    """Tiny images (halo larger than the image) and images of several tiles in both directions."""
    spec = gk.GhostSpec(8, 12, dw_size=dw)
    check(spec, 2, *hw, torch.float32, LAYOUTS[hw[0] % 2], f"{fam} {hw} dw {dw}", fam)


@family
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(fam, layout):
    spec = gk.GhostSpec(8, 12)
    params = RandomGhost(spec, DEVICE)
    x = make_x(0, 8, 5, 6, torch.float32, layout)
    out = launcher(fam)(x, params.params, torch.float32)
    assert out.shape == (0, 12, 5, 6)


@family
def test_non_dense_input_strides(fam):
    """Any input strides work (a cropped view here); no copy of x is made."""
    spec = gk.GhostSpec(6, 10, ratio=3)
    params = RandomGhost(spec, DEVICE)
    base = torch.randn(2, 6, 12, 15, device=DEVICE)
    x = base[:, :, 1:10, 2:13]
    out = launcher(fam)(x, params.params, torch.float32)
    eager, ref = eager_and_ref(params, x)
    assert_close_to_reference(out, eager, ref, torch.float32, f"{fam} cropped view")


# every activation, each with two of the four affine forms (helpers.FORMS)
ACT_FORMS = [(act, form) for i, act in enumerate(ACTIVATIONS) for form in list(FORMS)[i % 2::2]]


@family
@pytest.mark.parametrize("i,act,form", [(i,) + c for i, c in enumerate(ACT_FORMS)],
                         ids=[f"{a}-{f}" for a, f in ACT_FORMS])
def test_activations_and_deployed_forms(fam, i, act, form):
    """ReLU, SiLU, Hardswish, identity; convs with or without a bias, with or without a BatchNorm (folded
    in the kernel): dtype, layout, ratio and dw_size rotate (dw 5: Ultralytics' GhostConv)."""
    spec = gk.GhostSpec(6 + i, 9 + 2 * i, ratio=2 + i % 3, dw_size=(3, 5)[i % 2], act=act)
    dtype, layout = DTYPES[i % 3], LAYOUTS[(i // 3) % 2]
    check(spec, 2, 7, 6 + i % 3, dtype, layout, f"{fam} {act} {form} {dtype} {layout}", fam, **FORMS[form])


# k x k primary convs (Ultralytics' downsampling GhostConv: 3x3 stride 2, SiLU, 5x5 cheap conv):
# (inp, oup, k, stride, act, dtype, layout, form); inp 40 has a K loop, oup 70 several channel blocks
KXK = [(5, 9, 3, 2, "silu", torch.float32, "channels_last", "bn"),
       (6, 11, 3, 2, "none", torch.float16, "nchw", "bias"),
       (40, 16, 3, 1, "relu", torch.bfloat16, "channels_last", "bias+bn"),
       (7, 70, 5, 2, "hardswish", torch.float32, "nchw", "plain"),
       (12, 20, 3, 2, "silu", torch.bfloat16, "strided", "bn")]


@pytest.mark.parametrize("inp,oup,k,stride,act,dtype,layout,form", KXK)
def test_two_pass_runs_a_k_by_k_primary_conv(inp, oup, k, stride, act, dtype, layout, form):
    """triton_two_pass's pass 1 as an implicit GEMM over the k x k taps (zero padding k // 2, any
    stride, any input strides); the families without it decline with the reason."""
    spec = gk.GhostSpec(inp, oup, kernel_size=k, stride=stride, ratio=2, dw_size=5, act=act)
    if layout == "strided":   # a cropped channels_last view: no dense mode applies
        params = RandomGhost(spec, DEVICE, **FORMS[form])
        x = make_x(2, inp + 3, 11, 10, dtype, "channels_last")[:, 2:inp + 2, 1:, :9]
        out = run_poisoned(x, params, spec, "triton_two_pass")
        eager, ref = eager_and_ref(params, x)
        assert_close_to_reference(out, eager, ref, dtype, "k x k, strided view")
    else:
        check(spec, 2, 9, 7, dtype, layout, f"k{k} s{stride} {act} {dtype} {layout} {form}", "triton_two_pass",
              **FORMS[form])
    x = make_x(1, inp, 5, 5, dtype, "nchw")
    for fam in ("triton_band", "triton_halo"):
        params = RandomGhost(spec, DEVICE).params
        reasons = dispatch.not_supported_reasons(fam, gk.Request.make(x, params, False))
        assert any("kernel_size=" in r for r in reasons), (fam, reasons)
        with pytest.raises(ValueError, match=rf"{fam} cannot run this module: kernel_size={k} \(supported: \(1,\)\)"):
            # its launcher, called directly (the lab does): the family's table, checked by family.py
            dispatch.BY_NAME[fam].launcher(x, params, dtype)


@pytest.mark.parametrize("hw,stride,dtype,layout", [((8, 6), 1, torch.float32, "channels_last"),
                                                     ((7, 9), 1, torch.bfloat16, "nchw"),
                                                     ((11, 10), 2, torch.float16, "channels_last")])
def test_band_multiplies_the_attention_gate_into_its_stores(hw, stride, dtype, layout):
    """GhostNetV2's gate (N x oup x H'//2 x W'//2, upsampled nearest: odd sizes pick floor(i * GH / H'))
    multiplied into y1 and the ghost channels as they are stored; the stencil still reads ungated y1."""
    spec = gk.GhostSpec(6, 11, ratio=3, dw_size=3, stride=stride, act="relu")
    params = RandomGhost(spec, DEVICE)
    x = make_x(2, spec.inp, *hw, dtype, layout)
    ho, wo = spec.out_hw(*hw)
    gate = torch.sigmoid(torch.randn(2, spec.oup, ho // 2, wo // 2, device=DEVICE)).to(dtype)
    out = poisoned_output(x, spec)
    launcher("triton_band")(x, params.params, dtype, out=out, gate=gate)
    eager = params.to(dtype).reference(x, gate=gate)
    ref = params.to(torch.float64).reference(x.double(), gate=gate.double())
    assert not torch.isnan(out).any()
    assert_close_to_reference(out, eager, ref, dtype, f"gate {hw} {dtype}")


@family
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_nan_and_inf_propagate_like_eager(fam, act):
    spec = gk.GhostSpec(8, 12, act=act)
    params = RandomGhost(spec, DEVICE)
    x = torch.randn(1, 8, 9, 10, device=DEVICE)
    x[0, 3, 2, 2] = float("nan")
    x[0, 5, 6, 7] = float("inf")
    out = run_poisoned(x, params, spec, fam)
    eager = params.reference(x)
    assert torch.isnan(eager).any() and torch.isinf(eager).any()  # the test would catch a clamp
    assert torch.equal(torch.isnan(out), torch.isnan(eager))
    assert torch.equal(torch.isinf(out), torch.isinf(eager))
    finite = torch.isfinite(eager)
    ref = params.to(torch.float64).reference(x.double())
    assert rel_err(out[finite], ref[finite]) <= 2 * rel_err(eager[finite], ref[finite]) + 1e-6


@family
def test_many_tiles_and_programs(fam):
    """More tiles (bands, pixel blocks) than programs: every program runs several."""
    spec = gk.GhostSpec(16, 40, dw_size=5)
    check(spec, 3, 21, 35, torch.float16, "nchw", f"{fam} many tiles", fam)


@family
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_dtype_and_affine_free_bn(fam, dtype):
    """fp32 x and parameters computed in a half dtype (what autocast asks for), BN without affine."""
    spec = gk.GhostSpec(8, 13, ratio=3)
    params = RandomGhost(spec, DEVICE)
    params.bn1 = params.bn1._replace(weight=None, bias=None)
    x = make_x(2, 8, 7, 6, torch.float32, "channels_last")
    out = launcher(fam)(x, params.params, dtype)
    assert out.dtype == dtype
    with torch.autocast(x.device.type, dtype=dtype):
        eager = params.reference(x)
    ref = params.to(torch.float64).reference(x.double())
    assert eager.dtype == dtype
    assert_close_to_reference(out, eager, ref, dtype, f"{fam} autocast {dtype}")


@family
def test_no_stale_weights_after_in_place_edits(fam):
    """The kernels read the parameters on every call: an edit through .data shows at once."""
    spec = gk.GhostSpec(8, 12)
    params = RandomGhost(spec, DEVICE)
    x = make_x(1, 8, 6, 6, torch.float32, "nchw")
    launcher(fam)(x, params.params, torch.float32)
    params.bn2.running_var.data.fill_(4.0)
    params.w1.data.mul_(-1)
    out = launcher(fam)(x, params.params, torch.float32)
    eager, ref = eager_and_ref(params, x)
    assert_close_to_reference(out, eager, ref, torch.float32, f"{fam} after edits")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU with > 10 GB free")
@family
@pytest.mark.parametrize("layout", LAYOUTS)
def test_more_than_2_31_output_elements(fam, layout):
    """64-bit offsets: an output of 2^31 + elements (fp16: > 4 GiB)."""
    free, _ = torch.cuda.mem_get_info()
    spec = gk.GhostSpec(16, 16)
    n, h, w = 1040, 360, 360  # out: 1040 * 16 * 360 * 360 = 2.157e9 > 2^31 elements
    if free < 12 * 2**30:
        pytest.skip(f"only {free / 2**30:.1f} GiB free on the GPU")
    params = RandomGhost(spec, DEVICE)
    x = make_x(n, 16, h, w, torch.float16, layout)
    out = launcher(fam)(x, params.params, torch.float16)
    assert out.numel() > 2**31
    for i in (0, n // 2, n - 1):  # check whole images at the start, middle and end
        eager, ref = eager_and_ref(params, x[i:i + 1])
        assert_close_to_reference(out[i:i + 1], eager, ref, torch.float16, f"image {i}")
    del x, out
    torch.cuda.empty_cache()


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@family
@settings(max_examples=30 if DEVICE == "cuda" else 12, deadline=None, derandomize=True)
@given(inp=st.integers(1, 40), oup=st.integers(1, 50), ratio=st.integers(2, 4), dw=st.sampled_from([1, 3, 5, 7]),
       stride=st.sampled_from([1, 2]), act=st.sampled_from(["relu", "none"]), n=st.integers(1, 2),
       h=st.integers(1, 20), w=st.integers(1, 20), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS))
def test_random_configurations(fam, inp, oup, ratio, dw, stride, act, n, h, w, dtype, layout):
    """Random points of the whole supported space, fresh random weights and inputs each."""
    spec = gk.GhostSpec(inp, oup, ratio=ratio, dw_size=dw, stride=stride, act=act)
    check(spec, n, h, w, dtype, layout, f"{fam} {spec} n={n} {h}x{w} {dtype} {layout}", fam)
