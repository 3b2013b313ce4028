#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"

namespace spectral_ext {
namespace {

constexpr int64_t kTileI = 16;   // rows of K per task
constexpr int64_t kTileJ = 128;  // columns of K per task; the running max tile stays in L1
constexpr int64_t kLanes = 16;   // accumulators held in registers across the S loop

// K[i0:i1, j0:j1] for one tile. Inputs are channel-major, Xt (C, S, N) and
// Yt (C, S, N'), so the innermost loop runs over contiguous j and vectorises;
// each channel's inner products live in registers only until they meet the
// running max, so (N, N', C) never exists.
template <typename scalar_t>
void gram_tile(const scalar_t* Xt, const scalar_t* Yt, scalar_t* K, int64_t N, int64_t Np,
               int64_t C, int64_t S, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  scalar_t best[kTileI * kTileJ];
  const int64_t tj = j1 - j0;
  std::fill(best, best + kTileI * kTileJ, -std::numeric_limits<scalar_t>::infinity());
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xc = Xt + c * S * N;
    const scalar_t* yc = Yt + c * S * Np;
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* brow = best + (i - i0) * kTileJ;
      int64_t j = j0;
      for (; j + kLanes <= j1; j += kLanes) {
        scalar_t acc[kLanes] = {};
        for (int64_t s = 0; s < S; ++s) {
          const scalar_t xv = xc[s * N + i];
          const scalar_t* y = yc + s * Np + j;
          for (int64_t l = 0; l < kLanes; ++l) acc[l] += xv * y[l];
        }
        for (int64_t l = 0; l < kLanes; ++l) brow[j - j0 + l] = std::max(brow[j - j0 + l], acc[l]);
      }
      for (; j < j1; ++j) {
        scalar_t acc = 0;
        for (int64_t s = 0; s < S; ++s) acc += xc[s * N + i] * yc[s * Np + j];
        brow[j - j0] = std::max(brow[j - j0], acc);
      }
    }
  }
  for (int64_t i = i0; i < i1; ++i)
    std::copy(best + (i - i0) * kTileJ, best + (i - i0) * kTileJ + tj, K + i * Np + j0);
}

at::Tensor max_kernel_gram_cpu(const at::Tensor& X, const std::optional<at::Tensor>& Y_opt) {
  const bool self = !Y_opt.has_value();
  const at::Tensor& Y = self ? X : *Y_opt;
  check_max_kernel_gram(X, Y);
  const int64_t N = X.size(0), Np = Y.size(0), C = X.size(1), S = X.size(2);
  auto K = at::empty({N, Np}, X.options());
  if (N == 0 || Np == 0) return K;
  const auto Xt = X.permute({1, 2, 0}).contiguous();
  const auto Yt = self ? Xt : Y.permute({1, 2, 0}).contiguous();
  const int64_t ti = (N + kTileI - 1) / kTileI, tj = (Np + kTileJ - 1) / kTileJ;
  // For the self Gram only tiles touching the upper triangle are computed, then mirrored.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t a = 0; a < ti; ++a)
    for (int64_t b = 0; b < tj; ++b)
      if (!self || (b + 1) * kTileJ > a * kTileI) tiles.emplace_back(a, b);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "max_kernel_gram_cpu", [&] {
    const scalar_t* xt = Xt.data_ptr<scalar_t>();
    const scalar_t* yt = Yt.data_ptr<scalar_t>();
    scalar_t* k = K.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i0 = tiles[t].first * kTileI, j0 = tiles[t].second * kTileJ;
        gram_tile(xt, yt, k, N, Np, C, S, i0, std::min(N, i0 + kTileI), j0,
                  std::min(Np, j0 + kTileJ));
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
