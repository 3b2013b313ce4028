#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "tile.cuh"

namespace spectral_ext {
namespace {
using namespace spectral_ext::cuda;

constexpr int kMeanBlock = 256;

// Mean receptive field per (image, channel) plane in one pass over x: a warp
// per input row forms the column-window sums of every horizontal tap, then the
// block sums them over the rows of every vertical tap.
template <typename scalar_t>
__global__ void __launch_bounds__(kMeanBlock)
    mean_receptive_field_kernel(const scalar_t* __restrict__ x,
                                at::acc_type<scalar_t, true>* __restrict__ colsum,
                                scalar_t* __restrict__ R, ConvGeometry g) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const acc_t inv_positions = acc_t(1) / acc_t(g.Ho * g.Wo);
  for (int64_t plane = blockIdx.x; plane < g.B * g.C; plane += gridDim.x) {
    const scalar_t* xp = x + plane * g.H * g.W;
    acc_t* cs = colsum + plane * g.H * g.kw;
    for (int64_t h = warp; h < g.H; h += warps) {
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, hi;
        const int64_t offset = j * g.dw - g.pw;
        valid_range(offset, g.sw, g.Wo, g.W, &lo, &hi);
        acc_t s = 0;
        for (int64_t q = lo + lane; q < hi; q += 32) s += acc_t(xp[h * g.W + offset + q * g.sw]);
        for (int d = 16; d > 0; d /= 2) s += __shfl_down_sync(0xffffffffu, s, d);
        if (lane == 0) cs[h * g.kw + j] = s;
      }
    }
    __syncthreads();
    for (int64_t t = threadIdx.x; t < g.kh * g.kw; t += blockDim.x) {
      const int64_t i = t / g.kw, j = t % g.kw;
      int64_t lo, hi;
      const int64_t offset = i * g.dh - g.ph;
      valid_range(offset, g.sh, g.Ho, g.H, &lo, &hi);
      acc_t s = 0;
      for (int64_t q = lo; q < hi; ++q) s += cs[(offset + q * g.sh) * g.kw + j];
      R[plane * g.kh * g.kw + t] = scalar_t(s * inv_positions);
    }
    __syncthreads();
  }
}

// Filters (V diag(s))^T as the A operand: scaled[q, i0 + r] is contiguous in i.
template <typename scalar_t, typename acc_t>
struct LoadFilter {
  const scalar_t* scaled;  // (C*kh*kw, r)
  int64_t r, i0;
  __device__ acc_t operator()(int64_t q, int rr) const {
    const int64_t i = i0 + rr;
    return i < r ? acc_t(scaled[q * r + i]) : acc_t(0);
  }
};

// The receptive-field entry q = (c, ki, kj) at output position p0 + rr,
// gathered from x on the fly (zero in the padding): consecutive positions read
// consecutive (or stride-spaced) columns of x.
template <typename scalar_t, typename acc_t>
struct LoadReceptiveField {
  const scalar_t* xb;  // x[b], (C, H, W)
  ConvGeometry g;
  int64_t p0;
  __device__ acc_t operator()(int64_t q, int rr) const {
    const int64_t p = p0 + rr;
    if (p >= g.Ho * g.Wo) return acc_t(0);
    const int64_t area = g.kh * g.kw;
    const int64_t c = q / area, ki = (q % area) / g.kw, kj = q % g.kw;
    const int64_t h = (p / g.Wo) * g.sh + ki * g.dh - g.ph;
    const int64_t w = (p % g.Wo) * g.sw + kj * g.dw - g.pw;
    if (h < 0 || h >= g.H || w < 0 || w >= g.W) return acc_t(0);
    return acc_t(xb[(c * g.H + h) * g.W + w]);
  }
};

// Implicit GEMM: out[b, i, p] = sum_q filters[i, q] * field[q, p], one block per
// (64 singular vectors) x (64 positions) tile, without an unfolded copy of x.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    signal_projection_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ scaled,
                             scalar_t* __restrict__ out, ConvGeometry g) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t As[kTileK * kTile];
  __shared__ acc_t Bs[kTileK * kTile];
  const int64_t positions = g.Ho * g.Wo, depth = g.C * g.kh * g.kw;
  const int64_t p0 = int64_t(blockIdx.x) * kTile, i0 = int64_t(blockIdx.y) * kTile;
  for (int64_t b = blockIdx.z; b < g.B; b += gridDim.z) {
    acc_t acc[kPer][kPer] = {};
    tile_product(acc, depth, LoadFilter<scalar_t, acc_t>{scaled, g.r, i0},
                 LoadReceptiveField<scalar_t, acc_t>{x + b * g.C * g.H * g.W, g, p0}, As, Bs);
#pragma unroll
    for (int p = 0; p < kPer; ++p) {
      const int64_t i = i0 + threadIdx.y + kSide * p;
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int64_t pos = p0 + threadIdx.x + kSide * q;
        if (i < g.r && pos < positions) out[(b * g.r + i) * positions + pos] = scalar_t(acc[p][q]);
      }
    }
  }
}

at::Tensor signal_projection_cuda(const at::Tensor& x, const at::Tensor& V, const at::Tensor& s,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation,
                                  std::optional<c10::string_view> reduce,
                                  at::OptionalIntArrayRef kernel_size) {
  const auto g = check_signal_projection(x, V, s, stride, padding, dilation, kernel_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto scaled = (V * s).contiguous();  // (C*kh*kw, r): column i is s_i v_i
  const auto xc = x.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (reduce_is_mean(reduce)) {
    auto R = at::empty({g.B, g.C * g.kh * g.kw}, x.options());
    if (R.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "signal_projection_mean_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, true>;
        auto colsum = at::empty({g.B * g.C * g.H * g.kw},
                                x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        const int grid = static_cast<int>(std::min<int64_t>(g.B * g.C, 1 << 20));
        mean_receptive_field_kernel<scalar_t><<<grid, kMeanBlock, 0, stream>>>(
            xc.data_ptr<scalar_t>(), colsum.data_ptr<acc_t>(), R.data_ptr<scalar_t>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return at::mm(R, scaled);
  }
  auto out = at::empty({g.B, g.r, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return out;
  const dim3 block(kSide, kSide);
  const dim3 grid((g.Ho * g.Wo + kTile - 1) / kTile, (g.r + kTile - 1) / kTile,
                  std::min<int64_t>(g.B, 65535));
  TORCH_CHECK(grid.y <= 65535, "signal_projection: r = ", g.r, " is too large for one launch");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "signal_projection_cuda", [&] {
    signal_projection_kernel<scalar_t><<<grid, block, 0, stream>>>(
        xc.data_ptr<scalar_t>(), scaled.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CUDA, m) { m.impl("signal_projection", &signal_projection_cuda); }

}  // namespace spectral_ext
