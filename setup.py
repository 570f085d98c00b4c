"""Build script. Package metadata lives in pyproject.toml; this file adds the CUDA C++ extension
``ghost_kernels._C`` (csrc/ kernels + python/ bindings) when it can be built:

* torch with CUDA is importable in the build environment (install with ``--no-build-isolation``);
* nvcc is found (``CUDA_HOME``, else /usr/local/cuda);
* ``GHOST_KERNELS_SKIP_CUDA_BUILD`` is not ``1``.

Otherwise the package installs without it and the "cuda" backend reports why it is unavailable.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default "8.0;9.0" when no GPU is visible);
``MAX_JOBS`` caps parallel compile jobs.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _skip(why):
    print(f"ghost_kernels: not building the CUDA extension: {why}")
    return {}


def cuda_build():
    if os.environ.get("GHOST_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return _skip("GHOST_KERNELS_SKIP_CUDA_BUILD=1")
    try:
        import torch
    except ImportError:
        return _skip("torch is not importable in the build environment (pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script
        os.environ["CUDA_HOME"] = os.path.realpath("/usr/local/cuda")
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return _skip("nvcc not found (set CUDA_HOME)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs")
    macros = [("GK_TORCH_VERSION", f'"{torch.__version__}"'), ("GK_CUDA_VERSION", f'"{torch.version.cuda}"'),
              ("GK_ARCH_LIST", f'"{archs}"')]
    ext = CUDAExtension(
        "ghost_kernels._C",
        sources=["python/bindings.cpp", "csrc/ghost_forward.cu"],
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},  # C++ standard: torch's default
    )
    print(f"ghost_kernels: building the CUDA extension for TORCH_CUDA_ARCH_LIST={archs} with {CUDA_HOME}")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_build())
