// Fused Ghost-module forward (eval mode, BN folded) in CUDA C++: one launch, x read once, the
// concatenated and sliced output written once. Same contract as ghost_kernels/triton_forward.py.
//
// Design note
// ===========
// Block = 256 threads = one 16 x 16 *halo* tile of output positions (one thread per halo pixel) of one
// image, and 16 intrinsic channels (blockIdx.y) with their 16 * (ratio - 1) ghost channels. With
// p = dw / 2 the tile's interior is (16 - 2p)^2 outputs (14 x 14 for a 3x3 cheap op); the p-wide
// ring around it is the depthwise halo, recomputed by the neighbouring tile as well.
//
//  1. Primary 1x1 conv as a GEMM  y1[16, 256] = w1[16, Cin] @ x[Cin, 256], K-loop over Cin in chunks
//     of BK (32 for fp16/bf16, 16 for fp32). The x chunk (BK x 256) and w1 chunk (16 x BK) are staged
//     in shared memory: channels_last inputs with Cin % 8 == 0 (fp32: % 4) are read with 16-byte
//     vector loads (8 channels of one pixel), others with coalesced scalar loads. fp16/bf16 run on
//     tensor cores (WMMA 16x16x16, fp32 accumulate; 8 warps x 2 fragments cover the 256 lanes);
//     fp32 runs exact fp32 FMA (16 accumulators per thread).
//  2. Epilogue per thread/pixel: BN1 scale + shift in fp32, act (ReLU that propagates NaN), and the
//     depthwise zero padding: halo pixels outside the image are set to 0 *after* the activation
//     (the cheap op pads y1, not x). y1 is rounded to the output dtype exactly as eager PyTorch does,
//     kept in shared memory (y1s, fp32 16 x 256), and its interior is stored to out[:, c0:c0+16]
//     (16-byte vector stores for channels_last outputs when the channel counts allow).
//  3. Depthwise conv from shared memory: each interior thread reads its dw x dw neighbourhood of
//     y1s (conflict-free: consecutive threads read consecutive words), the BN2-folded fp32 weights
//     are staged in shared memory once per block, and ghost channel j (reading y1 channel
//     j / (ratio-1)) goes to out[:, m + j]; channels past oup are never computed.
//
// Shared memory per block: x chunk 16 KiB + w1 chunk 1 KiB (fp32: 16 + 1) + y1s 16 KiB + depthwise
// weights 9.2 KiB = 42.2 KiB (static, under the 48 KiB default).
//
// Bytes per output pixel (ratio 2, b bytes per element): reads Cin * b of x (the halo ring, about
// 30% more lanes for a 3x3 cheap op, and the re-reads by the other 16-channel blocks of the same
// tile come from L2), writes oup * b once. HBM traffic is therefore the floor (Cin / s^2 + oup) * b
// per output pixel plus the weights. All global offsets are 64-bit.

#include "ghost_forward.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace ghost_kernels {
namespace {

constexpr int kHalo = 16;               // halo tile: kHalo x kHalo output positions
constexpr int kLanes = kHalo * kHalo;   // one thread per halo pixel
constexpr int kThreads = kLanes;
constexpr int kBM = 16;                 // intrinsic channels per block
constexpr int kMaxGhost = kBM * 3;      // ratio <= 4
constexpr int kMaxTaps = 49;            // dw_size <= 7

template <typename T> struct Traits;
template <> struct Traits<float> { static constexpr int BK = 16; static constexpr bool kTensorCores = false; };
template <> struct Traits<__half> { static constexpr int BK = 32; static constexpr bool kTensorCores = true; };
template <> struct Traits<__nv_bfloat16> { static constexpr int BK = 32; static constexpr bool kTensorCores = true; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T zero() { return from_float<T>(0.f); }

// ReLU written as a select so that NaN propagates as in eager PyTorch (fmaxf would drop it).
__device__ __forceinline__ float activate(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

struct Params {
  const void* x;
  void* out;
  const void* w1;
  const float* scale1;
  const float* shift1;
  const float* wd;
  const float* shift2;
  int64_t sxn, sxc, sxh, sxw;  // input strides (elements)
  int64_t son, soc, soh, sow;  // output strides (elements)
  int cin, ho, wo, m, oup, stride, ratio, dw;
  int tiles_w, tiles_per_image;
  bool relu;
  bool vec_x;   // 16-byte loads of x: channels contiguous, Cin and pixel offsets multiples of VEC
  bool vec_y1;  // 16-byte stores of y1: output channels contiguous, oup % VEC == 0
  bool vec_y2;  // 16-byte stores of y2: as vec_y1 and m % VEC == 0
};

template <typename T, int BK>
__device__ __forceinline__ void load_x_chunk(const Params& p, T (*xs)[kLanes], int64_t x_img, int k0, int oh0,
                                             int ow0) {
  const T* x = static_cast<const T*>(p.x);
  constexpr int VEC = 16 / sizeof(T);
  if (p.vec_x) {
    constexpr int kGroups = BK / VEC;
    for (int i = threadIdx.x; i < kLanes * kGroups; i += kThreads) {
      const int q = i / kGroups, g = i % kGroups, k = k0 + g * VEC;
      const int oh = oh0 + q / kHalo, ow = ow0 + q % kHalo;
      alignas(16) T v[VEC];
      if (k < p.cin && oh >= 0 && oh < p.ho && ow >= 0 && ow < p.wo) {
        const int64_t off = x_img + int64_t(oh) * p.stride * p.sxh + int64_t(ow) * p.stride * p.sxw + k;
        *reinterpret_cast<int4*>(v) = __ldg(reinterpret_cast<const int4*>(x + off));
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = zero<T>();
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) xs[g * VEC + e][q] = v[e];
    }
    return;
  }
  const bool channels_fastest = p.sxc == 1;  // channels_last: consecutive threads, consecutive channels
  for (int i = threadIdx.x; i < kLanes * BK; i += kThreads) {
    const int k = channels_fastest ? i % BK : i / kLanes;
    const int q = channels_fastest ? i / BK : i % kLanes;
    const int oh = oh0 + q / kHalo, ow = ow0 + q % kHalo;
    T v = zero<T>();
    if (k0 + k < p.cin && oh >= 0 && oh < p.ho && ow >= 0 && ow < p.wo) {
      v = x[x_img + int64_t(k0 + k) * p.sxc + int64_t(oh) * p.stride * p.sxh + int64_t(ow) * p.stride * p.sxw];
    }
    xs[k][q] = v;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* dst, const float (&vals)[VEC]) {
  alignas(16) T packed[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) packed[e] = from_float<T>(vals[e]);
  *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(packed);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ghost_forward_kernel(const Params p) {
  constexpr int BK = Traits<T>::BK;
  constexpr int VEC = 16 / sizeof(T);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  constexpr bool kTC = Traits<T>::kTensorCores && !std::is_same<T, __nv_bfloat16>::value;  // no bf16 MMA
#else
  constexpr bool kTC = Traits<T>::kTensorCores;
#endif
  __shared__ __align__(32) T xs[BK][kLanes];
  __shared__ __align__(32) T ws[kBM][BK];
  __shared__ __align__(32) float y1s[kBM][kLanes];
  __shared__ float wds[kMaxGhost * kMaxTaps];

  const int tid = threadIdx.x;
  const int pad = p.dw / 2;
  const int tile_h = kHalo - 2 * pad, tile_w = kHalo - 2 * pad;
  const int64_t n = int64_t(blockIdx.x) / p.tiles_per_image;
  const int t = int(int64_t(blockIdx.x) % p.tiles_per_image);
  const int oh0 = (t / p.tiles_w) * tile_h - pad, ow0 = (t % p.tiles_w) * tile_w - pad;
  const int c0 = blockIdx.y * kBM;
  const int hh = tid / kHalo, ww = tid % kHalo;
  const int oh = oh0 + hh, ow = ow0 + ww;
  const bool in_img = oh >= 0 && oh < p.ho && ow >= 0 && ow < p.wo;
  const bool interior = hh >= pad && hh < kHalo - pad && ww >= pad && ww < kHalo - pad;
  const int rm1 = p.ratio - 1, taps = p.dw * p.dw;
  const int j0 = c0 * rm1, n_ghost = kBM * rm1, kept = p.oup - p.m;

  // Depthwise weights of this block's ghost channels (BN2 scale folded in, fp32).
  for (int i = tid; i < n_ghost * taps; i += kThreads) {
    const int j = j0 + i / taps;
    wds[i] = j < p.m * rm1 ? p.wd[int64_t(j) * taps + i % taps] : 0.f;
  }

  // 1. primary 1x1 conv over the halo tile
  const T* w1 = static_cast<const T*>(p.w1);
  const int64_t x_img = n * p.sxn;
  const int warp = tid / 32;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];
  float accf[kBM];
  if constexpr (kTC) {
#pragma unroll
    for (int f = 0; f < 2; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.f);
  } else {
#pragma unroll
    for (int c = 0; c < kBM; ++c) accf[c] = 0.f;
  }
  for (int k0 = 0; k0 < p.cin; k0 += BK) {
    load_x_chunk<T, BK>(p, xs, x_img, k0, oh0, ow0);
    for (int i = tid; i < kBM * BK; i += kThreads) {
      const int c = i / BK, k = i % BK;
      ws[c][k] = (c0 + c < p.m && k0 + k < p.cin) ? w1[int64_t(c0 + c) * p.cin + k0 + k] : zero<T>();
    }
    __syncthreads();
    if constexpr (kTC) {
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> a;
        nvcuda::wmma::load_matrix_sync(a, &ws[0][kk], BK);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major> b;
          nvcuda::wmma::load_matrix_sync(b, &xs[kk][(warp * 2 + f) * 16], kLanes);
          nvcuda::wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
    } else {
#pragma unroll 4
      for (int k = 0; k < BK; ++k) {
        const float xv = to_float(xs[k][tid]);
#pragma unroll
        for (int c = 0; c < kBM; ++c) accf[c] = fmaf(to_float(ws[c][k]), xv, accf[c]);
      }
    }
    __syncthreads();  // the next chunk overwrites xs/ws
  }
  if constexpr (kTC) {
#pragma unroll
    for (int f = 0; f < 2; ++f)
      nvcuda::wmma::store_matrix_sync(&y1s[0][(warp * 2 + f) * 16], acc[f], kLanes, nvcuda::wmma::mem_row_major);
    __syncthreads();  // fragments scatter across the warp's lanes
  } else {
#pragma unroll
    for (int c = 0; c < kBM; ++c) y1s[c][tid] = accf[c];
  }

  // 2. BN1 + act, zero outside the image (the depthwise padding is on y1), round like eager, store.
  T* out = static_cast<T*>(p.out);
  const bool store = interior && in_img;
  const int64_t o_pix = n * p.son + int64_t(oh) * p.soh + int64_t(ow) * p.sow;
  float y1v[kBM];
#pragma unroll
  for (int c = 0; c < kBM; ++c) {
    const int cc = c0 + c;
    const float s = cc < p.m ? p.scale1[cc] : 0.f, b = cc < p.m ? p.shift1[cc] : 0.f;
    const float v = in_img ? activate(y1s[c][tid] * s + b, p.relu) : 0.f;
    y1v[c] = to_float(from_float<T>(v));
    y1s[c][tid] = y1v[c];
  }
  if (store) {
    if (p.vec_y1 && c0 + kBM <= p.m) {
#pragma unroll
      for (int g = 0; g < kBM; g += VEC) {
        float vals[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) vals[e] = y1v[g + e];
        store_vec<T, VEC>(out + o_pix + c0 + g, vals);
      }
    } else {
#pragma unroll
      for (int c = 0; c < kBM; ++c)
        if (c0 + c < p.m) out[o_pix + int64_t(c0 + c) * p.soc] = from_float<T>(y1v[c]);
    }
  }
  __syncthreads();  // the depthwise step reads the neighbours' y1

  // 3. depthwise conv + BN2 + act from shared memory; ghost channel j = c * (ratio-1) + r.
  if (!store) return;
  for (int g = 0; g < n_ghost && j0 + g < kept; g += VEC) {
    float vals[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int jj = g + e, j = j0 + jj;
      vals[e] = 0.f;
      if (j >= kept) continue;
      const float* wj = &wds[jj * taps];
      const float* src = &y1s[jj / rm1][tid - pad * kHalo - pad];
      float a = 0.f;
      for (int dy = 0; dy < p.dw; ++dy)
        for (int dx = 0; dx < p.dw; ++dx) a = fmaf(wj[dy * p.dw + dx], src[dy * kHalo + dx], a);
      vals[e] = activate(a + p.shift2[j], p.relu);
    }
    if (p.vec_y2 && j0 + g + VEC <= kept) {
      store_vec<T, VEC>(out + o_pix + p.m + j0 + g, vals);
    } else {
      for (int e = 0; e < VEC && j0 + g + e < kept; ++e)
        out[o_pix + int64_t(p.m + j0 + g + e) * p.soc] = from_float<T>(vals[e]);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

at::Tensor cuda_forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& scale1,
                        const at::Tensor& shift1, const at::Tensor& wd, const at::Tensor& shift2,
                        int64_t oup, int64_t stride, int64_t ratio, int64_t dw_size, bool relu) {
  const char* op = "ghost_kernels::cuda_forward: ";
  TORCH_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, op, "x must be 4-D (N, C, H, W), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              "x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(supported(kSupportedStrides, stride), op, "stride must be 1 or 2, got ", stride);
  TORCH_CHECK(supported(kSupportedRatios, ratio), op, "ratio must be 2, 3 or 4, got ", ratio);
  TORCH_CHECK(supported(kSupportedDwSizes, dw_size), op, "dw_size must be 1, 3, 5 or 7, got ", dw_size);
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h >= 1 && w >= 1, op, "x must have H, W >= 1, got ", x.sizes());
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == cin && w1.scalar_type() == dtype && w1.is_contiguous(), op,
              "w1 must be a contiguous [m, ", cin, "] ", dtype, " tensor, got ", w1.sizes(), " ", w1.scalar_type());
  const int64_t m = w1.size(0), n_new = m * (ratio - 1);
  TORCH_CHECK(oup >= 1 && m == (oup + ratio - 1) / ratio, op, "w1 has ", m, " rows but ceil(oup / ratio) = ",
              (oup + ratio - 1) / ratio);
  auto check_vec = [&](const at::Tensor& t, const char* name, int64_t len) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == len && t.scalar_type() == at::kFloat && t.is_contiguous(), op, name,
                " must be a contiguous float32 tensor of ", len, " elements, got ", t.sizes(), " ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, name, " is on ", t.device(), ", x on ", x.device());
  };
  check_vec(scale1, "scale1", m);
  check_vec(shift1, "shift1", m);
  check_vec(shift2, "shift2", n_new);
  TORCH_CHECK(wd.dim() == 2 && wd.size(0) == n_new && wd.size(1) == dw_size * dw_size &&
                  wd.scalar_type() == at::kFloat && wd.is_contiguous(),
              op, "wd must be a contiguous float32 [", n_new, ", ", dw_size * dw_size, "] tensor, got ", wd.sizes());
  TORCH_CHECK(w1.device() == x.device() && wd.device() == x.device(), op, "all tensors must be on ", x.device());

  c10::cuda::CUDAGuard guard(x.device());
  const int64_t ho = (h - 1) / stride + 1, wo = (w - 1) / stride + 1;
  at::Tensor out = at::empty({n, oup, ho, wo}, x.options().memory_format(x.suggest_memory_format()));
  if (out.numel() == 0) return out;

  const int pad = int(dw_size / 2), tile = kHalo - 2 * pad;
  const int64_t tiles_h = (ho + tile - 1) / tile, tiles_w = (wo + tile - 1) / tile;
  const int64_t blocks = n * tiles_h * tiles_w, cblocks = (m + kBM - 1) / kBM;
  TORCH_CHECK(blocks <= INT32_MAX && cblocks <= 65535, op, "input too large for one launch");

  Params p{};
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.w1 = w1.data_ptr();
  p.scale1 = scale1.data_ptr<float>();
  p.shift1 = shift1.data_ptr<float>();
  p.wd = wd.data_ptr<float>();
  p.shift2 = shift2.data_ptr<float>();
  p.sxn = x.stride(0), p.sxc = x.stride(1), p.sxh = x.stride(2), p.sxw = x.stride(3);
  p.son = out.stride(0), p.soc = out.stride(1), p.soh = out.stride(2), p.sow = out.stride(3);
  p.cin = int(cin), p.ho = int(ho), p.wo = int(wo), p.m = int(m), p.oup = int(oup);
  p.stride = int(stride), p.ratio = int(ratio), p.dw = int(dw_size);
  p.tiles_w = int(tiles_w), p.tiles_per_image = int(tiles_h * tiles_w);
  p.relu = relu;
  const int64_t vec = 16 / x.element_size();
  p.vec_x = x.stride(1) == 1 && cin % vec == 0 && x.stride(0) % vec == 0 && x.stride(2) % vec == 0 &&
            x.stride(3) % vec == 0 && aligned16(x.data_ptr());
  p.vec_y1 = out.stride(1) == 1 && oup % vec == 0 && aligned16(out.data_ptr());
  p.vec_y2 = p.vec_y1 && m % vec == 0;

  const dim3 grid{static_cast<unsigned>(blocks), static_cast<unsigned>(cblocks)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  switch (dtype) {
    case at::kFloat: ghost_forward_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    case at::kHalf: ghost_forward_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    default: ghost_forward_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace ghost_kernels
