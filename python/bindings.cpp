// ghost_kernels._C: registers the CUDA kernels with the PyTorch dispatcher (namespace ghost_kernels)
// and exposes the build information through pybind11. The kernels themselves live in csrc/ and do
// not include Python headers.
#include <torch/extension.h>
#include <torch/library.h>

#include <iterator>
#include <vector>

#include "ghost_forward.cuh"

#ifndef GK_TORCH_VERSION
#define GK_TORCH_VERSION "unknown"
#endif
#ifndef GK_CUDA_VERSION
#define GK_CUDA_VERSION "unknown"
#endif
#ifndef GK_ARCH_LIST
#define GK_ARCH_LIST "unknown"
#endif

TORCH_LIBRARY(ghost_kernels, m) {
  // Eval-mode fused forward with BN folded (see ghost_kernels/fold.py); fake and CPU
  // implementations are registered from Python (ghost_kernels/cuda_forward.py).
  m.def(
      "cuda_forward(Tensor x, Tensor w1, Tensor scale1, Tensor shift1, Tensor wd, Tensor shift2, "
      "int oup, int stride, int ratio, int dw_size, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(ghost_kernels, CUDA, m) { m.impl("cuda_forward", &ghost_kernels::cuda_forward); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ghost_kernels CUDA C++ kernels (ops under torch.ops.ghost_kernels)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch"] = GK_TORCH_VERSION;
    info["cuda"] = GK_CUDA_VERSION;
    info["archs"] = GK_ARCH_LIST;
    pybind11::dict supports;  // the kernel's limits, as ghost_kernels/cuda_backend.py declares them
    supports["strides"] = std::vector<int64_t>(std::begin(ghost_kernels::kSupportedStrides),
                                               std::end(ghost_kernels::kSupportedStrides));
    supports["ratios"] = std::vector<int64_t>(std::begin(ghost_kernels::kSupportedRatios),
                                              std::end(ghost_kernels::kSupportedRatios));
    supports["dw_sizes"] = std::vector<int64_t>(std::begin(ghost_kernels::kSupportedDwSizes),
                                                std::end(ghost_kernels::kSupportedDwSizes));
    info["supports"] = supports;
    return info;
  }, "torch and CUDA versions and the GPU architectures this extension was built for");
}
