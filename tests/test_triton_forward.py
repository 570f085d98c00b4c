"""The fused Triton forward against the float64 reference (CPU interpreter here, device="cuda" on a GPU).

Every kernel output is NaN-poisoned before the launch, so an element the kernel forgets shows as NaN.
"""
import contextlib
import itertools

import pytest
import torch
from helpers import DEVICE, GhostParams, assert_close_to_reference, eager_and_ref, rel_err

import ghost_kernels as gk
from ghost_kernels.spec import distinct_ghostnet_100_specs
from ghost_kernels import cuda_forward
from ghost_kernels.layout import output_memory_format
from ghost_kernels.triton_forward import ghost_forward_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]


def make_x(n, c, h, w, dtype, layout):
    x = torch.randn(n, c, h, w, device=DEVICE, dtype=torch.float32).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def run_poisoned(x, params, spec, backend="triton"):
    """Run a fused kernel into NaN-filled memory, so that unwritten output elements show as NaN."""
    n, _, h, w = x.shape
    ho, wo = spec.out_hw(h, w)
    out = torch.full((n, spec.oup, ho, wo), float("nan"), dtype=x.dtype, device=x.device)
    out = out.contiguous(memory_format=output_memory_format(x))
    if backend == "triton":
        result = ghost_forward_triton(x, params.fold(x.dtype), spec, out=out)
        assert result.data_ptr() == out.data_ptr()
        return out
    # The CUDA op allocates its own output: PyTorch's deterministic mode fills every fresh allocation
    # with NaN (torch.utils.deterministic.fill_uninitialized_memory), that output included.
    folded = params.fold(x.dtype)
    with nan_filled_allocations():
        assert torch.isnan(torch.empty(4, device=x.device, dtype=x.dtype)).all(), "allocations are not NaN-filled"
        return cuda_forward.ghost_forward_cuda(x, folded, spec)


@contextlib.contextmanager
def nan_filled_allocations():
    """Deterministic mode with NaN fill of uninitialized memory, restored afterwards."""
    mode, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def check(spec, n, h, w, dtype, layout, what, backend="triton"):
    params = GhostParams(spec, DEVICE)
    x = make_x(n, spec.inp, h, w, dtype, layout)
    out = run_poisoned(x, params, spec, backend)
    eager, ref = eager_and_ref(params, x)
    assert out.shape == eager.shape
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) elements"
    probe = torch.nn.functional.conv2d(x, x.new_zeros(spec.oup, spec.inp, 1, 1), stride=spec.stride)
    same = all(a == b for a, b, size in zip(out.stride(), probe.stride(), out.shape) if size > 1)
    assert same, f"{what}: output strides {out.stride()} differ from eager conv2d's {probe.stride()}"
    assert_close_to_reference(out, eager, ref, dtype, what)


# Reduced spatial size per GhostNet resolution: small for the interpreter, >1 tile where it matters.
REDUCED = {112: 12, 56: 9, 28: 6, 14: 5, 7: 3}


@pytest.mark.parametrize("shape", distinct_ghostnet_100_specs(), ids=lambda s: f"{s.spec.inp}-{s.spec.oup}-{s.h}-{s.spec.act}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ghostnet_100_configurations(shape, dtype, layout):
    """Every distinct Ghost module of GhostNet 1.0x (channel counts from the stage table)."""
    hw = REDUCED[shape.h] if DEVICE == "cpu" else shape.h
    check(shape.spec, 2, hw, hw, dtype, layout, f"{shape.name} {dtype} {layout}")


SWEEP = list(itertools.product([2, 3, 4], [1, 3, 5, 7], [1, 2], ["relu", "none"]))


@pytest.mark.parametrize("i,ratio,dw,stride,act", [(i,) + c for i, c in enumerate(SWEEP)])
def test_option_sweep(i, ratio, dw, stride, act):
    """ratio x dw_size x stride x act, with an oup that forces the channel slice; dtype and layout rotate."""
    oup = 2 * ratio + 1 + 4 * (i % 5)  # odd and even oup; the slice drops ghost channels for most
    spec = gk.GhostSpec(5 + i % 7, oup, ratio=ratio, dw_size=dw, stride=stride, act=act)
    dtype, layout = DTYPES[i % 3], LAYOUTS[(i // 3) % 2]
    check(spec, 2, 9 + i % 4, 6 + i % 5, dtype, layout, f"{spec} {dtype} {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_dtypes_and_layouts(dtype, layout, stride):
    spec = gk.GhostSpec(24, 37, ratio=2, dw_size=3, stride=stride)  # m = 19: two channel blocks of 16
    check(spec, 3, 13, 11, dtype, layout, f"{dtype} {layout} stride {stride}")


@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (2, 3), (5, 37), (40, 9), (33, 70)])
@pytest.mark.parametrize("dw", [3, 7])
def test_spatial_sizes(hw, dw):
    """Tiny images (halo larger than the image) and images of several tiles in both directions."""
    spec = gk.GhostSpec(8, 12, dw_size=dw)
    check(spec, 2, *hw, torch.float32, LAYOUTS[hw[0] % 2], f"{hw} dw {dw}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout):
    spec = gk.GhostSpec(8, 12)
    params = GhostParams(spec, DEVICE)
    x = make_x(0, 8, 5, 6, torch.float32, layout)
    out = ghost_forward_triton(x, params.fold(torch.float32), spec)
    assert out.shape == (0, 12, 5, 6)


def test_non_dense_input_strides():
    """Any input strides work (a cropped view here); no copy of x is made."""
    spec = gk.GhostSpec(6, 10, ratio=3)
    params = GhostParams(spec, DEVICE)
    base = torch.randn(2, 6, 12, 15, device=DEVICE)
    x = base[:, :, 1:10, 2:13]
    out = ghost_forward_triton(x, params.fold(torch.float32), spec)
    eager, ref = eager_and_ref(params, x)
    assert_close_to_reference(out, eager, ref, torch.float32, "cropped view")


@pytest.mark.parametrize("act", ["relu", "none"])
def test_nan_and_inf_propagate_like_eager(act):
    spec = gk.GhostSpec(8, 12, act=act)
    params = GhostParams(spec, DEVICE)
    x = torch.randn(1, 8, 9, 10, device=DEVICE)
    x[0, 3, 2, 2] = float("nan")
    x[0, 5, 6, 7] = float("inf")
    out = run_poisoned(x, params, spec)
    eager = params.reference(x)
    assert torch.isnan(eager).any() and torch.isinf(eager).any()  # the test would catch a clamp
    assert torch.equal(torch.isnan(out), torch.isnan(eager))
    assert torch.equal(torch.isinf(out), torch.isinf(eager))
    finite = torch.isfinite(eager)
    ref = params.to(torch.float64).reference(x.double())
    assert rel_err(out[finite], ref[finite]) <= 2 * rel_err(eager[finite], ref[finite]) + 1e-6


def test_persistent_loop_covers_many_tiles():
    """More tiles than programs: every program runs several tiles through its scratch slot."""
    spec = gk.GhostSpec(16, 40, dw_size=5)
    check(spec, 3, 21, 35, torch.float16, "nchw", "many tiles")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU with > 10 GB free")
def test_more_than_2_31_output_elements():
    """64-bit offsets: an output of 2^31 + elements (fp16: > 4 GiB)."""
    free, _ = torch.cuda.mem_get_info()
    spec = gk.GhostSpec(16, 16)
    n, h, w = 1040, 360, 360  # out: 1040 * 16 * 360 * 360 = 2.157e9 > 2^31 elements
    if free < 12 * 2**30:
        pytest.skip(f"only {free / 2**30:.1f} GiB free on the GPU")
    params = GhostParams(spec, DEVICE)
    x = torch.randn(n, 16, h, w, device=DEVICE, dtype=torch.float16)
    out = ghost_forward_triton(x, params.fold(torch.float16), spec)
    assert out.numel() > 2**31
    for i in (0, n // 2, n - 1):  # check whole images at the start, middle and end
        eager, ref = eager_and_ref(params, x[i:i + 1])
        assert_close_to_reference(out[i:i + 1], eager, ref, torch.float16, f"image {i}")


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, derandomize=True)
@given(inp=st.integers(1, 40), oup=st.integers(1, 50), ratio=st.integers(2, 4), dw=st.sampled_from([1, 3, 5, 7]),
       stride=st.sampled_from([1, 2]), act=st.sampled_from(["relu", "none"]), n=st.integers(1, 2),
       h=st.integers(1, 20), w=st.integers(1, 20), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS))
def test_random_configurations(inp, oup, ratio, dw, stride, act, n, h, w, dtype, layout):
    """Random points of the whole supported space, fresh random weights and inputs each."""
    spec = gk.GhostSpec(inp, oup, ratio=ratio, dw_size=dw, stride=stride, act=act)
    check(spec, n, h, w, dtype, layout, f"{spec} n={n} {h}x{w} {dtype} {layout}")
