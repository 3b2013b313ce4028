#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "simd.h"

namespace spectral_ext {
namespace {

// dst[m] += sum_z src[z][m]^2 for one output row, the taps `tap_stride` apart.
template <typename T>
SPECTRAL_EXT_ALWAYS_INLINE void add_squares_impl(T* dst, const T* src, int64_t taps,
                                                 int64_t tap_stride, int64_t M) {
  constexpr int64_t lanes = 64 / sizeof(T);
  int64_t m = 0;
  for (; m + lanes <= M; m += lanes) {
    auto acc = load64(dst + m);
    for (int64_t z = 0; z < taps; ++z) {
      const auto t = load64(src + z * tap_stride + m);
      acc += t * t;
    }
    store64(dst + m, acc);
  }
  for (; m < M; ++m)
    for (int64_t z = 0; z < taps; ++z) dst[m] += src[z * tap_stride + m] * src[z * tap_stride + m];
}

SPECTRAL_EXT_ISA_CLONES(add_squares, add_squares_impl)

// For a chunk of taps z, one batched GEMM (BLAS forms the inner products
// fastest on a CPU) gives T[b, z, n, m] = sum_k V[b, k, z, n] U[b, k, m],
// reading V in place as a transposed operand; the squares are summed into the
// output in the pass that reads T, so only a bounded chunk of T ever exists.
at::Tensor conv_adjacency_cpu(const at::Tensor& U, const at::Tensor& V) {
  check_conv_adjacency(U, V);
  const int64_t B = U.size(0), c = U.size(1), M = U.size(2), K2 = V.size(2), N = V.size(3);
  auto out = at::zeros({B, N, M}, U.options());
  if (B == 0 || N == 0 || M == 0 || K2 == 0 || c == 0) return out;
  const auto Uc = U.contiguous();
  const auto Vc = V.contiguous();
  constexpr int64_t kChunkElements = int64_t(1) << 23;
  const int64_t per_tap = B * N * M;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(K2, kChunkElements / per_tap));
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "conv_adjacency_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t z0 = 0; z0 < K2; z0 += chunk) {
      const int64_t zc = std::min(chunk, K2 - z0);
      // (B, c, zc, N) viewed as (B, zc*N, c): a column-major operand BLAS takes as is.
      const auto Vz = Vc.narrow(2, z0, zc).reshape({B, c, zc * N}).transpose(1, 2);
      const auto T = at::bmm(Vz, Uc);  // (B, zc*N, M)
      const scalar_t* t = T.data_ptr<scalar_t>();
      at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / N, n = row % N;
          add_squares<scalar_t>(o + row * M, t + (b * zc * N + n) * M, zc, N * M, M);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) { m.impl("conv_adjacency", &conv_adjacency_cpu); }

}  // namespace spectral_ext
