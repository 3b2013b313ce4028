#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace spectral_ext {
namespace {

constexpr int64_t kTile = 64;  // K is computed in 64 x 64 tiles; the running max of one stays in L1
constexpr int kRows = 4;       // rows of K per register block

// One 64 x 64 tile of K. Inputs are packed per tile and zero-padded to whole
// tiles, Xp (N/64, C, S, 64) and Yp (N'/64, C, S, 64), so every tile is full
// and one channel's operands are two contiguous S x 64 panels. Each channel's
// inner products live in a kRows x VecsPerRow register block until they meet
// the running max, so (N, N', C) never exists. No BLAS call fits: the max over
// channels has to sit between the products and the store.
template <typename T, int VecsPerRow>
SPECTRAL_EXT_ALWAYS_INLINE void gram_tile_impl(const T* Xp, const T* Yp, T* K, int64_t C,
                                               int64_t S, int64_t i0, int64_t j0, int64_t rows,
                                               int64_t cols, int64_t ldk) {
  using V = typename Vec64<T>::type;
  constexpr int kVecLanes = 64 / sizeof(T);
  constexpr int kLanes = VecsPerRow * kVecLanes;
  static_assert(kTile % kLanes == 0, "a register block must divide the tile");
  alignas(64) T best[kTile * kTile];
  std::fill(best, best + kTile * kTile, -std::numeric_limits<T>::infinity());
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = Xp + c * S * kTile;
    const T* yc = Yp + c * S * kTile;
    for (int64_t i = 0; i < kTile; i += kRows) {
      for (int64_t j = 0; j < kTile; j += kLanes) {
        V acc[kRows][VecsPerRow] = {};
        for (int64_t s = 0; s < S; ++s) {
          V y[VecsPerRow];
          for (int v = 0; v < VecsPerRow; ++v) y[v] = load64(yc + s * kTile + j + v * kVecLanes);
          for (int r = 0; r < kRows; ++r) {
            const T xv = xc[s * kTile + i + r];
            for (int v = 0; v < VecsPerRow; ++v) acc[r][v] += xv * y[v];
          }
        }
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < VecsPerRow; ++v) {
            T* b = best + (i + r) * kTile + j + v * kVecLanes;
            const V old = load64(b);
            // NaN-propagating max, as amax (issue 14.6): a NaN already held stays.
            store64(b, (old > acc[r][v]) | (old != old) ? old : acc[r][v]);
          }
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) std::copy(best + i * kTile, best + i * kTile + cols, K + (i0 + i) * ldk + j0);
}

#define SPECTRAL_EXT_GRAM_ARGS                                                              \
  const T *Xp, const T *Yp, T *K, int64_t C, int64_t S, int64_t i0, int64_t j0, int64_t rows, \
      int64_t cols, int64_t ldk
#define SPECTRAL_EXT_GRAM_PASS Xp, Yp, K, C, S, i0, j0, rows, cols, ldk

template <typename T>
SPECTRAL_EXT_TARGET_AVX512 void gram_tile_avx512(SPECTRAL_EXT_GRAM_ARGS) {
  gram_tile_impl<T, 2>(SPECTRAL_EXT_GRAM_PASS);
}
template <typename T>
SPECTRAL_EXT_TARGET_AVX2 void gram_tile_avx2(SPECTRAL_EXT_GRAM_ARGS) {
  gram_tile_impl<T, 1>(SPECTRAL_EXT_GRAM_PASS);
}
template <typename T>
void gram_tile_baseline(SPECTRAL_EXT_GRAM_ARGS) {
  gram_tile_impl<T, 1>(SPECTRAL_EXT_GRAM_PASS);
}

// (N, C, S) -> (tiles, C, S, 64), zero rows past N.
at::Tensor pack_tiles(const at::Tensor& X, int64_t tiles) {
  auto padded = at::zeros({tiles * kTile, X.size(1), X.size(2)}, X.options());
  padded.narrow(0, 0, X.size(0)).copy_(X);
  return padded.view({tiles, kTile, X.size(1), X.size(2)}).permute({0, 2, 3, 1}).contiguous();
}

at::Tensor max_kernel_gram_cpu(const at::Tensor& X, const std::optional<at::Tensor>& Y_opt) {
  const bool self = !Y_opt.has_value();
  const at::Tensor& Y = self ? X : *Y_opt;
  check_max_kernel_gram(X, Y);
  const int64_t N = X.size(0), Np = Y.size(0), C = X.size(1), S = X.size(2);
  auto K = at::empty({N, Np}, X.options());
  if (N == 0 || Np == 0) return K;
  const int64_t ti = (N + kTile - 1) / kTile, tj = (Np + kTile - 1) / kTile;
  const auto Xp = pack_tiles(X, ti);
  const auto Yp = self ? Xp : pack_tiles(Y, tj);
  // For the self Gram only tiles on or above the diagonal are computed, then mirrored.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t a = 0; a < ti; ++a)
    for (int64_t b = self ? a : 0; b < tj; ++b) tiles.emplace_back(a, b);
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "max_kernel_gram_cpu", [&] {
    using T = scalar_t;
    const T* xp = Xp.data_ptr<T>();
    const T* yp = Yp.data_ptr<T>();
    T* k = K.data_ptr<T>();
    const int64_t panel = C * S * kTile;
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i0 = tiles[t].first * kTile, j0 = tiles[t].second * kTile;
        const int64_t rows = std::min(kTile, N - i0), cols = std::min(kTile, Np - j0);
        if (isa == Isa::kAvx512)
          gram_tile_avx512<T>(xp + tiles[t].first * panel, yp + tiles[t].second * panel, k, C, S, i0, j0, rows, cols, Np);
        else if (isa == Isa::kAvx2)
          gram_tile_avx2<T>(xp + tiles[t].first * panel, yp + tiles[t].second * panel, k, C, S, i0, j0, rows, cols, Np);
        else
          gram_tile_baseline<T>(xp + tiles[t].first * panel, yp + tiles[t].second * panel, k, C, S, i0, j0, rows, cols, Np);
      }
    });
    if (self) {
      at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          for (int64_t j = 0; j < i; ++j) k[i * N + j] = k[j * N + i];
      });
    }
  });
  return K;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) { m.impl("max_kernel_gram", &max_kernel_gram_cpu); }

}  // namespace spectral_ext
