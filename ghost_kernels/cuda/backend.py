"""The ``cuda`` backend: the CUDA C++ kernel, its op's fake and CPU implementations, the backend object.

The kernel is ``csrc/ghost_forward.cu`` (design note at its top), registered by ``python/bindings.cpp``
as ``torch.ops.ghost_kernels.cuda_forward``. Here:

* the extension is imported if it was built. An install without it (no nvcc) is normal: no warning,
  :data:`UNAVAILABLE_REASON` says "built without the CUDA extension". A broken or mismatched build
  never breaks ``import ghost_kernels`` either: it warns once, and the reason says what failed;
* ``register_fake`` gives the op its output shape, dtype and memory format without running it, so
  torch.compile and torch.export treat it as one op;
* a CPU implementation (plain PyTorch, the folded eval-mode math) makes the op usable, and
  ``torch.library.opcheck``-able, on machines without a GPU;
* :data:`BACKEND`: its limits (:data:`SUPPORT`, the table ``csrc/ghost_forward.cuh`` checks too) and
  its forward, BN folded on every call (``fold.fold_ghost``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.backend import Backend, Request, Support
from ..core.fold import FoldedGhost, fold_ghost
from ..core.layout import empty_output
from ..core.spec import GhostSpec

EXTENSION = "ghost_kernels._C"
NOT_BUILT = ("built without the CUDA extension ghost_kernels._C (the install found no nvcc or no CUDA build of "
             "torch, or GHOST_KERNELS_SKIP_CUDA_BUILD=1 was set; to build it: pip install --no-build-isolation -e . "
             "with CUDA_HOME set)")


def _load_extension():
    """(the extension module or None, why it is unavailable or None). Not built is a normal install
    (no warning); built but failing to load is a problem worth a warning."""
    try:
        found = EXTENSION in sys.modules or importlib.util.find_spec(EXTENSION) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return None, NOT_BUILT
    try:
        return importlib.import_module(EXTENSION), None
    except Exception as exc:   # an ImportError of a missing symbol or library, or anything the module raises
        reason = f"the CUDA extension ghost_kernels._C failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(f"ghost_kernels: {reason}; the 'cuda' backend is unavailable", stacklevel=3)
        return None, reason


_C, UNAVAILABLE_REASON = _load_extension()
BUILD_INFO: dict = {}

if _C is not None:
    BUILD_INFO = dict(_C.build_info())
    built, running = BUILD_INFO.get("torch", ""), torch.__version__
    if built.split("+")[0].split(".")[:2] != running.split("+")[0].split(".")[:2]:
        UNAVAILABLE_REASON = f"ghost_kernels._C was built against torch {built}, this is torch {running}: rebuild it"
        warnings.warn(f"ghost_kernels: {UNAVAILABLE_REASON}", stacklevel=2)
    elif not torch.cuda.is_available():
        UNAVAILABLE_REASON = "no CUDA GPU is visible"

OP = "ghost_kernels::cuda_forward"


def _op_defined() -> bool:
    try:
        torch.ops.ghost_kernels.cuda_forward
        return True
    except (AttributeError, RuntimeError):
        return False


if _C is not None and _op_defined():

    @torch.library.register_fake(OP)
    def _cuda_forward_fake(x, w1, scale1, shift1, wd, shift2, oup, stride, ratio, dw_size, relu):
        torch._check(x.dim() == 4, lambda: f"x must be 4-D, got {x.dim()}-D")
        return empty_output(x, oup, stride)

    @torch.library.impl(OP, "cpu")
    def _cuda_forward_cpu(x, w1, scale1, shift1, wd, shift2, oup, stride, ratio, dw_size, relu):
        # The same folded eval-mode math as the kernel, in plain PyTorch (fp32 accumulation).
        act = torch.relu if relu else (lambda t: t)
        m = w1.shape[0]
        z1 = F.conv2d(x.float(), w1.float()[:, :, None, None], stride=stride)
        y1 = act(z1 * scale1[:, None, None] + shift1[:, None, None]).to(x.dtype)
        y2 = F.conv2d(y1.float(), wd.view(-1, 1, dw_size, dw_size), padding=dw_size // 2, groups=m)
        y2 = act(y2 + shift2[:, None, None]).to(x.dtype)
        out = empty_output(x, oup, stride)
        return out.copy_(torch.cat([y1, y2], 1)[:, :oup])


def forward_folded(x: Tensor, folded: FoldedGhost, spec: GhostSpec) -> Tensor:
    """Run ``torch.ops.ghost_kernels.cuda_forward`` on folded parameters (x in the compute dtype).

    Equivalent PyTorch: see ``triton_halo.forward_folded`` (same contract, same folding).
    """
    if _C is None:
        raise RuntimeError(f"ghost_kernels: {UNAVAILABLE_REASON}")
    return torch.ops.ghost_kernels.cuda_forward(
        x, folded.w1, folded.scale1, folded.shift1, folded.wd, folded.shift2,
        spec.oup, spec.stride, spec.ratio, spec.dw_size, spec.act == "relu")


# Must equal csrc/ghost_forward.cuh's kSupported* tables (tests/test_cuda_backend.py checks).
SUPPORT = Support(strides=(1, 2), ratios=(2, 3, 4), dw_sizes=(1, 3, 5, 7), conv_bias=True, without_bn=True)


class CudaBackend(Backend):
    def environment_reason(self, device: Optional[torch.device] = None) -> Optional[str]:
        if device is not None and device.type != "cuda":
            return f"x is on {device.type}: the cuda backend needs a CUDA tensor"
        return UNAVAILABLE_REASON

    def forward(self, x: Tensor, req: Request) -> Tensor:
        dtype = req.compute_dtype   # under autocast: cast x before the launch, as nn.Conv2d would
        return forward_folded(x.to(dtype), fold_ghost(req.params, dtype), req.spec)


BACKEND = CudaBackend("cuda", "CUDA C++ v1 single pass (halo tiles, WMMA, y1 in shared memory); inference only",
                      support=SUPPORT)
