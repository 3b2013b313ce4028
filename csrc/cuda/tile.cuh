// The shared-memory tiled product that the CUDA kernels build on: a 64 x 64
// output tile per block of 16 x 16 threads, each thread holding 4 x 4
// accumulators in registers, operands staged through shared memory 16 deep.
// Each kernel supplies loaders (which gather, transpose or pad on the fly) and
// its own epilogue (square-and-sum, running max, store), so no operator
// materialises an intermediate larger than its output.
#pragma once
#include <cstdint>

namespace spectral_ext {
namespace cuda {

constexpr int kTile = 64;
constexpr int kTileK = 16;
constexpr int kSide = 16;  // threads per block side
constexpr int kPer = kTile / kSide;
constexpr int kThreads = kSide * kSide;

// acc[p][q] += sum_{k < K} A(k, ty + 16 p) * B(k, tx + 16 q), where load_a(k, r)
// and load_b(k, c) return the operands of the block's tile (0 outside the
// matrix). Consecutive r (and c) should be consecutive in memory: the 256
// threads then load each 16 x 64 panel coalesced.
template <typename acc_t, typename LoadA, typename LoadB>
__device__ __forceinline__ void tile_product(acc_t (&acc)[kPer][kPer], int64_t K,
                                             const LoadA& load_a, const LoadB& load_b,
                                             acc_t* As, acc_t* Bs) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kSide + tx;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    for (int l = tid; l < kTileK * kTile; l += kThreads) {
      const int kk = l / kTile, rr = l % kTile;
      const bool inside = k0 + kk < K;
      As[l] = inside ? load_a(k0 + kk, rr) : acc_t(0);
      Bs[l] = inside ? load_b(k0 + kk, rr) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t a[kPer], b[kPer];
#pragma unroll
      for (int p = 0; p < kPer; ++p) {
        a[p] = As[kk * kTile + ty + kSide * p];
        b[p] = Bs[kk * kTile + tx + kSide * p];
      }
#pragma unroll
      for (int p = 0; p < kPer; ++p)
#pragma unroll
        for (int q = 0; q < kPer; ++q) acc[p][q] += a[p] * b[q];
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace spectral_ext
