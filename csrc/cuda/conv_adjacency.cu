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

// V[b, k, z, n0 + r] at one tap z (contiguous in n).
template <typename scalar_t, typename acc_t>
struct LoadV {
  const scalar_t* Vb;  // V[b], (c, K2, N)
  int64_t K2, N, z, n0;
  __device__ acc_t operator()(int64_t k, int r) const {
    const int64_t n = n0 + r;
    return n < N ? acc_t(Vb[(k * K2 + z) * N + n]) : acc_t(0);
  }
};

// U[b, k, m0 + r] (contiguous in m).
template <typename scalar_t, typename acc_t>
struct LoadU {
  const scalar_t* Ub;  // U[b], (c, M)
  int64_t M, m0;
  __device__ acc_t operator()(int64_t k, int r) const {
    const int64_t m = m0 + r;
    return m < M ? acc_t(Ub[k * M + m]) : acc_t(0);
  }
};

// One block per (64 n) x (64 m) output tile of one batch entry: for every tap z
// the tile of inner products is formed in registers and only its square is kept.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    conv_adjacency_kernel(const scalar_t* __restrict__ U, const scalar_t* __restrict__ V,
                          scalar_t* __restrict__ out, int64_t B, int64_t c, int64_t M,
                          int64_t K2, int64_t N) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t As[kTileK * kTile];
  __shared__ acc_t Bs[kTileK * kTile];
  const int64_t n0 = int64_t(blockIdx.y) * kTile, m0 = int64_t(blockIdx.x) * kTile;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    acc_t total[kPer][kPer] = {};
    for (int64_t z = 0; z < K2; ++z) {
      acc_t dot[kPer][kPer] = {};
      tile_product(dot, c, LoadV<scalar_t, acc_t>{V + b * c * K2 * N, K2, N, z, n0},
                   LoadU<scalar_t, acc_t>{U + b * c * M, M, m0}, As, Bs);
#pragma unroll
      for (int p = 0; p < kPer; ++p)
#pragma unroll
        for (int q = 0; q < kPer; ++q) total[p][q] += dot[p][q] * dot[p][q];
    }
#pragma unroll
    for (int p = 0; p < kPer; ++p) {
      const int64_t n = n0 + threadIdx.y + kSide * p;
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int64_t m = m0 + threadIdx.x + kSide * q;
        if (n < N && m < M) out[(b * N + n) * M + m] = scalar_t(total[p][q]);
      }
    }
  }
}

at::Tensor conv_adjacency_cuda(const at::Tensor& U, const at::Tensor& V) {
  check_conv_adjacency(U, V);
  const c10::cuda::CUDAGuard guard(U.device());
  const int64_t B = U.size(0), c = U.size(1), M = U.size(2), K2 = V.size(2), N = V.size(3);
  auto out = at::empty({B, N, M}, U.options());
  if (out.numel() == 0) return out;
  const auto Uc = U.contiguous();
  const auto Vc = V.contiguous();
  const dim3 block(kSide, kSide);
  const dim3 grid((M + kTile - 1) / kTile, (N + kTile - 1) / kTile,
                  std::min<int64_t>(B, 65535));
  TORCH_CHECK(grid.y <= 65535, "conv_adjacency: N = ", N, " is too large for one launch");
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "conv_adjacency_cuda", [&] {
    conv_adjacency_kernel<scalar_t>
        <<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
            Uc.data_ptr<scalar_t>(), Vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, c, M,
            K2, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CUDA, m) { m.impl("conv_adjacency", &conv_adjacency_cuda); }

}  // namespace spectral_ext
