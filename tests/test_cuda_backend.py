"""The CUDA C++ backend (ghost_kernels._C).

CPU (CI): the extension is built and imports, the op's schema, fake and CPU implementations pass
torch.library.opcheck, torch.export sees one op, and the cuda backend refuses CPU tensors clearly.
GPU: the same numerical sweep as the Triton kernel, NaN-poisoned, plus > 2^31 outputs and agreement
with the Triton backend.
"""
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    LAYOUTS,
    SWEEP,
    RandomGhost,
    assert_close_to_reference,
    check,
    eager_and_ref,
    make_x,
    randomize,
    rel_err,
    run_poisoned,
)

import ghost_kernels as gk
from ghost_kernels.core.spec import distinct_ghostnet_100_specs
from ghost_kernels.cuda import backend as cuda_backend

BUILT = cuda_backend._C is not None
# CI sets this: there, a silently skipped build is a failure, not a skip.
REQUIRED = os.environ.get("GHOST_KERNELS_REQUIRE_CUDA_EXT", "0") == "1"
needs_ext = pytest.mark.skipif(not BUILT and not REQUIRED, reason=f"not built: {cuda_backend.UNAVAILABLE_REASON}")
needs_gpu = pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs the extension and a CUDA GPU")


@needs_ext
def test_extension_built_and_loaded():
    assert BUILT, cuda_backend.UNAVAILABLE_REASON
    info = cuda_backend.BUILD_INFO
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cuda"] == torch.version.cuda and info["archs"]
    assert hasattr(torch.ops.ghost_kernels, "cuda_forward")


@needs_ext
def test_cpp_limits_equal_the_declared_table():
    """csrc/ghost_forward.cuh's kSupported* tables are the backend's declared Support, not a copy
    that can drift: the extension reports them and they must be equal."""
    built = cuda_backend.BUILD_INFO["supports"]
    declared = cuda_backend.BACKEND.support
    assert tuple(built["strides"]) == declared.strides
    assert tuple(built["ratios"]) == declared.ratios
    assert tuple(built["dw_sizes"]) == declared.dw_sizes


def op_args(spec, dtype, device, layout="nchw", n=2, h=7, w=9):
    p = RandomGhost(spec, device)
    f = p.fold(dtype)
    x = make_x(n, spec.inp, h, w, dtype, layout).to(device)
    return p, (x, f.w1, f.scale1, f.shift1, f.wd, f.shift2, spec.oup, spec.stride, spec.ratio, spec.dw_size,
               spec.act == "relu")


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", [gk.GhostSpec(8, 13, ratio=3, dw_size=5, stride=2), gk.GhostSpec(6, 12, act="none")])
def test_opcheck_on_the_cpu(spec, layout):
    """Schema, fake tensor, autograd registration and AOT dispatch checks of the op (CPU kernel)."""
    _, args = op_args(spec, torch.float32, "cpu", layout)
    torch.library.opcheck(torch.ops.ghost_kernels.cuda_forward.default, args)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_implementation_matches_reference(dtype):
    spec = gk.GhostSpec(8, 13, ratio=3, dw_size=3, stride=2)
    p, args = op_args(spec, dtype, "cpu", "channels_last")
    out = torch.ops.ghost_kernels.cuda_forward(*args)
    eager, ref = eager_and_ref(p, args[0])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(out, eager, ref, dtype, "cpu impl")


@needs_ext
def test_fake_implementation_and_export():
    mod = randomize(gk.GhostModule(8, 12)).eval()
    folded = gk.fold_ghost(gk.GhostParams.from_module(mod), torch.float32)

    class Fused(torch.nn.Module):
        def forward(self, x):
            return torch.ops.ghost_kernels.cuda_forward(x, folded.w1, folded.scale1, folded.shift1, folded.wd,
                                                         folded.shift2, 12, 1, 2, 3, True)

    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fout = torch.ops.ghost_kernels.cuda_forward(fx, *[mode.from_tensor(t) for t in folded], 12, 1, 2, 3, True)
        assert fout.shape == (2, 12, 6, 6) and fout.is_contiguous(memory_format=torch.channels_last)
    ep = torch.export.export(Fused(), (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["ghost_kernels.cuda_forward.default"], targets
    with torch.no_grad():
        assert rel_err(ep.module()(x), gk.GhostModule.from_module(mod, backend="torch")(x)) < 1e-5


def test_cuda_backend_refuses_cpu_tensors_clearly():
    mod = randomize(gk.GhostModule(8, 12, backend="cuda")).eval()
    with torch.no_grad(), pytest.raises(gk.BackendNotSupported, match="x is on cpu: the cuda backend needs a CUDA tensor"):
        mod(torch.randn(1, 8, 5, 5))
    req = gk.Request.make(torch.randn(1, 8, 5, 5), mod.params(), training=False)
    assert "x is on cpu" in gk.not_supported_reasons("cuda", req)[0]


# ---- GPU: the same sweep as the Triton kernel ---------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("shape", distinct_ghostnet_100_specs(), ids=lambda s: f"{s.spec.inp}-{s.spec.oup}-{s.h}-{s.spec.act}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_ghostnet_100_configurations(shape, dtype, layout):
    check(shape.spec, 2, shape.h, shape.w, dtype, layout, f"cuda {shape.name} {dtype} {layout}", backend="cuda")


@needs_gpu
@pytest.mark.parametrize("i,ratio,dw,stride,act", [(i,) + c for i, c in enumerate(SWEEP)])
def test_cuda_option_sweep(i, ratio, dw, stride, act):
    oup = 2 * ratio + 1 + 4 * (i % 5)
    spec = gk.GhostSpec(5 + i % 7 + 8 * (i % 2), oup, ratio=ratio, dw_size=dw, stride=stride, act=act)
    for dtype in DTYPES:
        for layout in LAYOUTS:
            check(spec, 2, 9 + i % 4, 6 + i % 5, dtype, layout, f"cuda {spec} {dtype} {layout}", backend="cuda")


@needs_gpu
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (5, 37), (40, 9), (33, 70)])
def test_cuda_spatial_sizes_and_empty_batch(hw):
    spec = gk.GhostSpec(16, 24, dw_size=5)
    check(spec, 2, *hw, torch.float16, LAYOUTS[hw[0] % 2], f"cuda {hw}", backend="cuda")
    x = make_x(0, 16, *hw, torch.float16, "channels_last")
    assert cuda_backend.forward_folded(x, RandomGhost(spec, DEVICE).fold(torch.float16), spec).shape[0] == 0


@needs_gpu
def test_cuda_and_triton_backends_agree():
    for shape in distinct_ghostnet_100_specs()[::3]:
        params = RandomGhost(shape.spec, DEVICE)
        x = make_x(4, shape.spec.inp, shape.h, shape.w, torch.bfloat16, "channels_last")
        a = run_poisoned(x, params, shape.spec, "triton_halo")
        b = run_poisoned(x, params, shape.spec, "cuda")
        eager, ref = eager_and_ref(params, x)
        assert rel_err(a, b) <= 2 * rel_err(eager, ref) + 1e-3, shape.name


@needs_gpu
def test_cuda_more_than_2_31_output_elements():
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"only {free / 2**30:.1f} GiB free on the GPU")
    spec = gk.GhostSpec(16, 16)
    n, h, w = 1040, 360, 360
    params = RandomGhost(spec, DEVICE)
    x = torch.randn(n, 16, h, w, device=DEVICE, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    out = cuda_backend.forward_folded(x, params.fold(torch.float16), spec)
    assert out.numel() > 2**31
    for i in (0, n // 2, n - 1):
        eager, ref = eager_and_ref(params, x[i:i + 1])
        assert_close_to_reference(out[i:i + 1], eager, ref, torch.float16, f"image {i}")


def _run_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items()}
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def test_install_without_the_extension_imports_quietly(tmp_path):
    """An install without nvcc has no ghost_kernels._C: the import is silent (it used to warn of a
    "circular import" on Python 3.11) and the cuda backend and info say it was built without it."""
    import shutil
    pkg = os.path.dirname(gk.__file__)
    shutil.copytree(pkg, tmp_path / "ghost_kernels", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    import site
    # -S: no .pth files, so an editable install's import hook does not map ghost_kernels to the checkout;
    # cwd: not the checkout either
    path = os.pathsep.join([str(tmp_path)] + site.getsitepackages())
    res = subprocess.run(
        [sys.executable, "-S", "-W", "error::UserWarning", "-c",
         "import ghost_kernels as gk, ghost_kernels.info as info\n"
         "assert gk.__file__.startswith(%r), gk.__file__\n"
         "print('REASON', gk.available_backends()['cuda'])\n"
         "info.main()\n" % str(tmp_path)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path), timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REASON built without the CUDA extension ghost_kernels._C" in res.stdout
    assert "circular" not in res.stdout + res.stderr and "Warning" not in res.stderr
    assert "cuda" in res.stdout.split("backends:")[1] and "built without the CUDA extension" in res.stdout.split("backends:")[1]


def test_broken_extension_warns_with_its_reason():
    out = _run_python(
        "import sys, importlib.abc, importlib.machinery\n"
        "class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ghost_kernels._C': return importlib.machinery.ModuleSpec(name, self)\n"
        "    def create_module(self, spec): raise ImportError('undefined symbol: _ZN3c10 (a stale build)')\n"
        "    def exec_module(self, module): pass\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import ghost_kernels as gk\n"
        "print('WARNINGS', sum('failed to load' in str(x.message) for x in w))\n"
        "print('REASON', gk.available_backends()['cuda'])\n")
    assert "WARNINGS 1" in out
    assert "REASON the CUDA extension ghost_kernels._C failed to load: ImportError: undefined symbol" in out


def test_mismatched_extension_warns_once_and_reports():
    out = _run_python(
        "import sys, types\n"
        "fake = types.ModuleType('ghost_kernels._C')\n"
        "fake.build_info = lambda: {'torch': '1.0.0', 'cuda': '9.0', 'archs': '7.0'}\n"
        "sys.modules['ghost_kernels._C'] = fake\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import ghost_kernels as gk\n"
        "    import ghost_kernels.cuda.backend\n"
        "print('WARNINGS', sum('rebuild it' in str(x.message) for x in w))\n"
        "print('REASON', gk.available_backends()['cuda'])\n")
    assert "WARNINGS 1" in out and "REASON ghost_kernels._C was built against torch 1.0.0" in out
