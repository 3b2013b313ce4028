#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "tile.cuh"

namespace spectral_ext {
namespace {
using namespace spectral_ext::cuda;

// Xt[c, s, i0 + r] of a channel-major copy (C, S, N): contiguous in i.
template <typename scalar_t, typename acc_t>
struct LoadChannel {
  const scalar_t* Xc;  // Xt[c], (S, N)
  int64_t N, i0;
  __device__ acc_t operator()(int64_t s, int r) const {
    const int64_t i = i0 + r;
    return i < N ? acc_t(Xc[s * N + i]) : acc_t(0);
  }
};

// One block per 64 x 64 tile of K; the inner products of each channel meet the
// running max in registers, so (N, N', C) never exists. For the self Gram only
// tiles on or above the diagonal run, and each writes its mirror image too.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    max_kernel_gram_kernel(const scalar_t* __restrict__ Xt, const scalar_t* __restrict__ Yt,
                           scalar_t* __restrict__ K, int64_t N, int64_t Np, int64_t C, int64_t S,
                           bool self) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t As[kTileK * kTile];
  __shared__ acc_t Bs[kTileK * kTile];
  if (self && blockIdx.y > blockIdx.x) return;
  const int64_t i0 = int64_t(blockIdx.y) * kTile, j0 = int64_t(blockIdx.x) * kTile;
  acc_t best[kPer][kPer];
#pragma unroll
  for (int p = 0; p < kPer; ++p)
#pragma unroll
    for (int q = 0; q < kPer; ++q) best[p][q] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < C; ++c) {
    acc_t dot[kPer][kPer] = {};
    tile_product(dot, S, LoadChannel<scalar_t, acc_t>{Xt + c * S * N, N, i0},
                 LoadChannel<scalar_t, acc_t>{Yt + c * S * Np, Np, j0}, As, Bs);
#pragma unroll
    for (int p = 0; p < kPer; ++p)
#pragma unroll
      for (int q = 0; q < kPer; ++q) best[p][q] = best[p][q] > dot[p][q] ? best[p][q] : dot[p][q];
  }
#pragma unroll
  for (int p = 0; p < kPer; ++p) {
    const int64_t i = i0 + threadIdx.y + kSide * p;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int64_t j = j0 + threadIdx.x + kSide * q;
      if (i < N && j < Np) {
        K[i * Np + j] = scalar_t(best[p][q]);
        if (self) K[j * Np + i] = scalar_t(best[p][q]);
      }
    }
  }
}

at::Tensor max_kernel_gram_cuda(const at::Tensor& X, const std::optional<at::Tensor>& Y_opt) {
  const bool self = !Y_opt.has_value();
  const at::Tensor& Y = self ? X : *Y_opt;
  check_max_kernel_gram(X, Y);
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t N = X.size(0), Np = Y.size(0), C = X.size(1), S = X.size(2);
  auto K = at::empty({N, Np}, X.options());
  if (K.numel() == 0) return K;
  const auto Xt = X.permute({1, 2, 0}).contiguous();  // (C, S, N)
  const auto Yt = self ? Xt : Y.permute({1, 2, 0}).contiguous();
  const dim3 block(kSide, kSide);
  const dim3 grid((Np + kTile - 1) / kTile, (N + kTile - 1) / kTile);
  TORCH_CHECK(grid.y <= 65535, "max_kernel_gram: N = ", N, " is too large for one launch");
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "max_kernel_gram_cuda", [&] {
    max_kernel_gram_kernel<scalar_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        Xt.data_ptr<scalar_t>(), Yt.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(), N, Np, C, S,
        self);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return K;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CUDA, m) { m.impl("max_kernel_gram", &max_kernel_gram_cuda); }

}  // namespace spectral_ext
