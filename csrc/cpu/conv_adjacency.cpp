#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

namespace spectral_ext {
namespace {

// For a chunk of taps z, one batched GEMM (BLAS is the fastest way to form the
// inner products on a CPU) gives T[b, z, n, m] = sum_k V[b, k, z, n] U[b, k, m];
// squares are then summed into the output in the same pass that reads T, so only
// a bounded chunk of T ever exists.
at::Tensor conv_adjacency_cpu(const at::Tensor& U, const at::Tensor& V) {
  check_conv_adjacency(U, V);
  const int64_t B = U.size(0), c = U.size(1), M = U.size(2), K2 = V.size(2), N = V.size(3);
  auto out = at::zeros({B, N, M}, U.options());
  if (B == 0 || N == 0 || M == 0 || K2 == 0 || c == 0) return out;
  const auto Uc = U.contiguous();
  const auto Vt = V.permute({0, 2, 3, 1}).contiguous();  // (B, K2, N, c)
  constexpr int64_t kChunkElements = int64_t(1) << 22;
  const int64_t per_tap = B * N * M;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(K2, kChunkElements / per_tap));
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "conv_adjacency_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t z0 = 0; z0 < K2; z0 += chunk) {
      const int64_t zc = std::min(chunk, K2 - z0);
      const auto T = at::bmm(Vt.narrow(1, z0, zc).reshape({B, zc * N, c}), Uc);  // (B, zc*N, M)
      const scalar_t* t = T.data_ptr<scalar_t>();
      at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / N, n = row % N;
          scalar_t* dst = o + row * M;
          for (int64_t z = 0; z < zc; ++z) {
            const scalar_t* src = t + ((b * zc + z) * N + n) * M;
            for (int64_t m = 0; m < M; ++m) dst[m] += src[m] * src[m];
          }
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) { m.impl("conv_adjacency", &conv_adjacency_cpu); }

}  // namespace spectral_ext
