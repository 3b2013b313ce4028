#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace spectral_ext {
namespace {

constexpr int64_t kTile = 64;  // K is computed in 64 x 64 tiles: both operand panels stay in L2
constexpr int kRows = 8;       // rows of K per register block (one vector wide: x broadcast from memory into the multiply)

// One 64 x 64 tile of K. Inputs are packed per tile and zero-padded to whole
// tiles, Xp (N/64, C, S, 64) and Yp (N'/64, C, S, 64), so every tile is full
// and one channel's operands are two contiguous S x 64 panels. Channels go in
// chunks whose two panels fit in L1; within a chunk a kRows x (VecsPerRow
// vectors) block of K keeps its running max in registers, so (N, N', C)
// never exists. No BLAS call fits: the max over channels has to sit between
// the products and the store. Vectors are Bytes wide, the width the clone is
// compiled for (GCC scalarised the compares of wider emulated vectors).
// TrackNaN: the max propagates NaN like amax (issue 14.6); without it (inputs
// finite and too small to overflow, so no product or sum is NaN) the max is
// one vmaxps per vector. OneS: S == 1 (dense features), no sum over positions.
// v, kept from being fused into a following add: an FMA adds the exact product, so an overflowing
// product (inf as amax sees it) plus an opposite inf gives inf instead of amax's NaN.
template <typename V>
SPECTRAL_EXT_ALWAYS_INLINE V rounded(V v) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+v"(v));
#endif
  return v;
}

template <typename T, int Bytes, int VecsPerRow, bool TrackNaN, bool OneS>
SPECTRAL_EXT_ALWAYS_INLINE void gram_tile_impl(const T* Xp, const T* Yp, T* K, int64_t C, int64_t S, int64_t i0,
                                               int64_t j0, int64_t rows, int64_t cols, int64_t ldk, bool mirror,
                                               bool diagonal) {
  typedef T V __attribute__((vector_size(Bytes)));
  using M = decltype(V{} != V{});
  constexpr int kLanes = Bytes / sizeof(T);
  constexpr int kCols = VecsPerRow * kLanes;
  static_assert(kTile % kCols == 0 && kTile % kRows == 0, "a register block must divide the tile");
  const int64_t positions = OneS ? 1 : S;
  const int64_t chunk = std::max<int64_t>(1, 16384 / (2 * kTile * sizeof(T) * std::max<int64_t>(positions, 1)));  // two 8 KiB panels + the 16 KiB tile: L1
  alignas(64) T tile[kTile * kTile];
  std::fill(tile, tile + kTile * kTile, -std::numeric_limits<T>::infinity());
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t c1 = std::min(C, c0 + chunk);
    for (int64_t i = 0; i < kTile; i += kRows) {
      for (int64_t j = 0; j < kTile; j += kCols) {
        V best[kRows][VecsPerRow];
        M nan[kRows][VecsPerRow] = {};
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < VecsPerRow; ++v) __builtin_memcpy(&best[r][v], tile + (i + r) * kTile + j + v * kLanes, Bytes);
        const T* xc = Xp + c0 * positions * kTile + i;
        const T* yc = Yp + c0 * positions * kTile + j;
        for (int64_t c = c0; c < c1; ++c, xc += positions * kTile, yc += positions * kTile) {
          V acc[kRows][VecsPerRow] = {};  // S = 0: every sum is 0
          for (int64_t s = 0; s < positions; ++s) {
            V y[VecsPerRow];
            for (int v = 0; v < VecsPerRow; ++v) __builtin_memcpy(&y[v], yc + s * kTile + v * kLanes, Bytes);
            for (int r = 0; r < kRows; ++r) {
              const T xv = xc[s * kTile + r];
              for (int v = 0; v < VecsPerRow; ++v) {
                const V product = TrackNaN ? rounded(xv * y[v]) : xv * y[v];
                acc[r][v] = s == 0 ? product : acc[r][v] + product;
              }
            }
          }
          for (int r = 0; r < kRows; ++r)
            for (int v = 0; v < VecsPerRow; ++v) {
              best[r][v] = acc[r][v] > best[r][v] ? acc[r][v] : best[r][v];  // vmaxps: a NaN held stays
              if (TrackNaN) nan[r][v] |= acc[r][v] != acc[r][v];
            }
        }
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < VecsPerRow; ++v) {
            // a new NaN goes in once per chunk (written as a blend per channel, GCC scalarised it)
            if (TrackNaN) best[r][v] = nan[r][v] ? V{} + std::numeric_limits<T>::quiet_NaN() : best[r][v];
            __builtin_memcpy(tile + (i + r) * kTile + j + v * kLanes, &best[r][v], Bytes);
          }
      }
    }
  }
  if (diagonal)  // a self Gram's diagonal tile: its lower triangle from the upper, so K is exactly symmetric
    for (int64_t i = 0; i < kTile; ++i)
      for (int64_t j = 0; j < i; ++j) tile[i * kTile + j] = tile[j * kTile + i];
  for (int64_t i = 0; i < rows; ++i) std::copy(tile + i * kTile, tile + i * kTile + cols, K + (i0 + i) * ldk + j0);
  if (mirror)  // the self Gram's tile below the diagonal, written from L1 instead of a strided pass over K
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i < rows; ++i) K[(j0 + j) * ldk + i0 + i] = tile[i * kTile + j];
}

#define SPECTRAL_EXT_GRAM_ARGS                                                              \
  const T *Xp, const T *Yp, T *K, int64_t C, int64_t S, int64_t i0, int64_t j0, int64_t rows, \
      int64_t cols, int64_t ldk, bool mirror, bool diagonal
#define SPECTRAL_EXT_GRAM_PASS Xp, Yp, K, C, S, i0, j0, rows, cols, ldk, mirror, diagonal

template <typename T, bool TrackNaN, bool OneS>
SPECTRAL_EXT_TARGET_AVX512 void gram_tile_avx512(SPECTRAL_EXT_GRAM_ARGS) {
  gram_tile_impl<T, 64, 1, TrackNaN, OneS>(SPECTRAL_EXT_GRAM_PASS);
}
template <typename T, bool TrackNaN, bool OneS>
SPECTRAL_EXT_TARGET_AVX2 void gram_tile_avx2(SPECTRAL_EXT_GRAM_ARGS) {
  gram_tile_impl<T, 32, 1, TrackNaN, OneS>(SPECTRAL_EXT_GRAM_PASS);
}
template <typename T, bool TrackNaN, bool OneS>
void gram_tile_baseline(SPECTRAL_EXT_GRAM_ARGS) {
  gram_tile_impl<T, 16, 1, TrackNaN, OneS>(SPECTRAL_EXT_GRAM_PASS);
}

template <typename T, bool TrackNaN, bool OneS>
void gram_tile_isa(Isa isa, SPECTRAL_EXT_GRAM_ARGS) {
  if (isa == Isa::kAvx512)
    gram_tile_avx512<T, TrackNaN, OneS>(SPECTRAL_EXT_GRAM_PASS);
  else if (isa == Isa::kAvx2)
    gram_tile_avx2<T, TrackNaN, OneS>(SPECTRAL_EXT_GRAM_PASS);
  else
    gram_tile_baseline<T, TrackNaN, OneS>(SPECTRAL_EXT_GRAM_PASS);
}

template <typename T>
void gram_tile(Isa isa, bool track_nan, SPECTRAL_EXT_GRAM_ARGS) {
  if (track_nan)
    S == 1 ? gram_tile_isa<T, true, true>(isa, SPECTRAL_EXT_GRAM_PASS)
           : gram_tile_isa<T, true, false>(isa, SPECTRAL_EXT_GRAM_PASS);
  else
    S == 1 ? gram_tile_isa<T, false, true>(isa, SPECTRAL_EXT_GRAM_PASS)
           : gram_tile_isa<T, false, false>(isa, SPECTRAL_EXT_GRAM_PASS);
}

// No product or sum of S products can be NaN: every input finite and S max|X| max|Y| below the dtype's range.
bool cannot_make_nan(const at::Tensor& X, const at::Tensor& Y, int64_t S) {
  const auto big = [](const at::Tensor& t) {  // max |t| without an |t| copy (of an expanded t: its full size)
    if (t.numel() == 0) return 0.0;
    const auto [low, high] = at::aminmax(t);
    return std::max(-low.item<double>(), high.item<double>());
  };
  const double mx = big(X), my = big(Y);  // NaN or inf inputs make these NaN or inf
  const double limit = X.scalar_type() == at::kFloat ? std::numeric_limits<float>::max()
                                                     : std::numeric_limits<double>::max();
  return std::isfinite(mx) && std::isfinite(my) && mx * my * static_cast<double>(S) < 0.25 * limit;
}

// (N, C, S) -> (tiles, C, S, 64), zero rows past N: one copy into the packed layout (no padded intermediate),
// read through X's strides (an expanded X is never materialised).
at::Tensor pack_tiles(const at::Tensor& X, int64_t tiles) {
  const int64_t N = X.size(0), full = N / kTile, rest = N - full * kTile;
  auto packed = at::empty({tiles, X.size(1), X.size(2), kTile}, X.options());
  if (full > 0)
    packed.narrow(0, 0, full).permute({0, 3, 1, 2}).copy_(X.narrow(0, 0, full * kTile).unflatten(0, {full, kTile}));
  if (rest > 0) {
    auto lanes = packed[full].permute({2, 0, 1});  // (64, C, S)
    lanes.narrow(0, 0, rest).copy_(X.narrow(0, full * kTile, rest));
    lanes.narrow(0, rest, kTile - rest).zero_();
  }
  return packed;
}

// K one entry at a time straight from X and Y through their strides, for a side with fewer than kTile / 2 rows:
// packing it into 64-row tiles would copy, and compute, up to 64 / N times what it holds (N = 2: 2 GiB and 10 s
// for a 32 MiB X). As the tiles do: each product rounded (this is compiled without FMA), summed over s in order,
// the max over channels propagating NaN like amax.
template <typename T>
void gram_pairs(const at::Tensor& X, const at::Tensor& Y, at::Tensor& K, bool self) {
  const int64_t N = X.size(0), Np = Y.size(0), C = X.size(1), S = X.size(2);
  const int64_t x0 = X.stride(0), x1 = X.stride(1), x2 = X.stride(2);
  const int64_t y0 = Y.stride(0), y1 = Y.stride(1), y2 = Y.stride(2);
  const T* x = X.data_ptr<T>();
  const T* y = Y.data_ptr<T>();
  T* k = K.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * S));
  at::parallel_for(0, N * Np, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = p / Np, j = p % Np;
      if (self && j < i) continue;  // mirrored from (j, i)
      T best = -std::numeric_limits<T>::infinity();
      bool nan = false;
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = x + i * x0 + c * x1;
        const T* yc = y + j * y0 + c * y1;
        T acc = 0;  // S = 0: every sum is 0
        for (int64_t s = 0; s < S; ++s) {
          const T product = xc[s * x2] * yc[s * y2];
          acc = s == 0 ? product : acc + product;
        }
        nan |= acc != acc;
        best = acc > best ? acc : best;
      }
      const T value = nan ? std::numeric_limits<T>::quiet_NaN() : best;
      k[i * Np + j] = value;
      if (self) k[j * Np + i] = value;
    }
  });
}

at::Tensor max_kernel_gram_cpu(const at::Tensor& X, const std::optional<at::Tensor>& Y_opt) {
  const bool self = !Y_opt.has_value();
  const at::Tensor& Y = self ? X : *Y_opt;
  check_max_kernel_gram(X, Y);
  const int64_t N = X.size(0), Np = Y.size(0), C = X.size(1), S = X.size(2);
  auto K = at::empty({N, Np}, X.options());
  if (N == 0 || Np == 0) return K;
  if (std::min(N, Np) < kTile / 2) {  // keep in step with _ops.max_kernel_gram's memory estimate
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "max_kernel_gram_pairs", [&] { gram_pairs<scalar_t>(X, Y, K, self); });
    return K;
  }
  const int64_t ti = (N + kTile - 1) / kTile, tj = (Np + kTile - 1) / kTile;
  const auto Xp = pack_tiles(X, ti);
  const auto Yp = self ? Xp : pack_tiles(Y, tj);
  // For the self Gram only tiles on or above the diagonal are computed, then mirrored.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t a = 0; a < ti; ++a)
    for (int64_t b = self ? a : 0; b < tj; ++b) tiles.emplace_back(a, b);
  const Isa isa = cpu_isa();
  const bool exact_max = cannot_make_nan(X, Y, S);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "max_kernel_gram_cpu", [&] {
    using T = scalar_t;
    const T* xp = Xp.data_ptr<T>();
    const T* yp = Yp.data_ptr<T>();
    T* k = K.data_ptr<T>();
    const int64_t panel = C * S * kTile;
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t a = tiles[t].first, b = tiles[t].second, i0 = a * kTile, j0 = b * kTile;
        const int64_t rows = std::min(kTile, N - i0), cols = std::min(kTile, Np - j0);
        const bool mirror = self && a != b;
        gram_tile<T>(isa, !exact_max, xp + a * panel, yp + b * panel, k, C, S, i0, j0, rows, cols, Np, mirror,
                     self && a == b);
      }
    });
  });
  return K;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) { m.impl("max_kernel_gram", &max_kernel_gram_cpu); }

}  // namespace spectral_ext
