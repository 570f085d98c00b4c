// Fused Ghost-module forward (eval mode, BN folded) in CUDA C++: declarations.
// Free of Python headers: C++ integrators include this and link the kernels in csrc/.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace ghost_kernels {

// What the kernel supports. ghost_kernels/cuda_backend.py declares the same table (Support), and
// tests/test_cuda_backend.py holds the two equal through _C.build_info()["supports"].
inline constexpr int64_t kSupportedStrides[] = {1, 2};
inline constexpr int64_t kSupportedRatios[] = {2, 3, 4};
inline constexpr int64_t kSupportedDwSizes[] = {1, 3, 5, 7};

template <size_t N>
constexpr bool supported(const int64_t (&table)[N], int64_t value) {
  for (size_t i = 0; i < N; ++i)
    if (table[i] == value) return true;
  return false;
}

// out = cat([y1, y2], 1)[:, :oup] with
//   y1 = act(conv1x1(x, w1, stride) * scale1 + shift1)      w1: [m, Cin] in x's dtype
//   y2 = act(dwconv(y1, wd, pad = dw_size / 2) + shift2)     wd: [m * (ratio - 1), dw_size^2] fp32
// x: [N, Cin, H, W] CUDA tensor, fp32/fp16/bf16, any strides. The output has x's dtype and the memory
// format eager conv2d would give (x.suggest_memory_format()). One launch; see ghost_forward.cu.
at::Tensor cuda_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& scale1,
                              const at::Tensor& shift1, const at::Tensor& wd, const at::Tensor& shift2,
                              int64_t oup, int64_t stride, int64_t ratio, int64_t dw_size, bool relu);

}  // namespace ghost_kernels
