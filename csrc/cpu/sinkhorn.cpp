#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace spectral_ext {
namespace {

// Alternating column/row normalisation keeps the iterate in the form
// diag(r) P diag(c), so each round is two matrix-vector products with P
// (c = 1 / (P^T r), then r = 1 / (P c)) and the matrix is written once at the
// end: the same numbers as normalising explicitly, with a third of the traffic.
template <typename scalar_t>
void sinkhorn_one(const scalar_t* P, scalar_t* out, int64_t n, int64_t m, int64_t iters) {
  using acc_t = at::acc_type<scalar_t, false>;
  std::vector<acc_t> r(n, acc_t(1)), c(m, acc_t(1)), colsum(m);
  for (int64_t it = 0; it < iters; ++it) {
    std::fill(colsum.begin(), colsum.end(), acc_t(0));
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = P + i * m;
      const acc_t ri = r[i];
      for (int64_t j = 0; j < m; ++j) colsum[j] += ri * acc_t(row[j]);
    }
    for (int64_t j = 0; j < m; ++j) c[j] = acc_t(1) / colsum[j];
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = P + i * m;
      acc_t s = 0;
      for (int64_t j = 0; j < m; ++j) s += acc_t(row[j]) * c[j];
      r[i] = acc_t(1) / s;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) out[i * m + j] = scalar_t(r[i] * acc_t(P[i * m + j]) * c[j]);
}

at::Tensor sinkhorn_cpu(const at::Tensor& P, int64_t iters) {
  check_sinkhorn(P, iters);
  const auto Pc = P.contiguous();
  auto out = at::empty_like(Pc);
  const int64_t B = P.size(0), n = P.size(1), m = P.size(2);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "sinkhorn_cpu", [&] {
    const scalar_t* p = Pc.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) sinkhorn_one(p + b * n * m, o + b * n * m, n, m, iters);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) { m.impl("sinkhorn", &sinkhorn_cpu); }

}  // namespace spectral_ext
