#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../interrupt.h"
#include "simd.h"

namespace spectral_ext {
namespace {

// Sinkhorn-Knopp scaling (seed 004 appendix D.2.1; POT's sinkhorn_knopp and
// sinkhorn_log): v = b / (K^T u), then u = a / (K v), per round, columns first.
// The iterate is kept as plan = diag(su) W diag(sv) with W = K exp(f_i + g_j), so
// a round is two matrix-vector products over a matrix that stays in cache, and
// the plan is written once at the end.
//
// Scale guards (issue 14.5): W starts as K over its column maxima (g = -log max),
// so entries near the dtype's maximum do not overflow the sums; a scaling that
// leaves [2^-e, 2^e] (e = a quarter of the exponent range) is absorbed into its
// row or column of W and into f or g; a row or column whose sum is no longer a
// normal number is recomputed from log K (log-sum-exp), as the log domain would.
// So su and sv stay representable, and the numbers are those of the explicit
// normalisation (or of the log-domain iteration) up to rounding. The log-domain
// variant (log_domain=true, the input is log K) differs only in forming W with
// exp and in where it restarts from: it costs the plain kernel plus n*m exps.
template <typename T>
struct Scaling {
  const T* K;  // K or log K, n x m
  T* W;        // the working matrix, n x m (the plan at the end)
  const T* a;
  const T* b;
  int64_t n, m;
  bool log_domain;
  std::vector<T> su, sv, f, g, e;

  T logk(int64_t i, int64_t j) const { return log_domain ? K[i * m + j] : std::log(K[i * m + j]); }

  const T hi = std::ldexp(T(1), std::numeric_limits<T>::max_exponent / 4), lo = T(1) / hi;
  SPECTRAL_EXT_ALWAYS_INLINE bool in_range(T s) const { return s >= lo && s <= hi; }

  void init() {
    su.assign(n, T(1)); sv.assign(m, T(1)); f.assign(n, T(0)); g.assign(m, T(0)); e.assign(m, T(0));
    std::vector<T> cmax(m, -std::numeric_limits<T>::infinity());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) cmax[j] = std::max(cmax[j], K[i * m + j]);
    for (int64_t j = 0; j < m; ++j) g[j] = log_domain ? -cmax[j] : -std::log(cmax[j]);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j)
        W[i * m + j] = log_domain ? std::exp(K[i * m + j] - cmax[j]) : K[i * m + j] / cmax[j];
  }

  // e = W^T su: the column sums of diag(su) W.
  SPECTRAL_EXT_ALWAYS_INLINE void column_sums() {
    constexpr int64_t lanes = 64 / sizeof(T);
    std::fill(e.begin(), e.end(), T(0));
    T* c = e.data();
    for (int64_t i = 0; i < n; ++i) {
      const T* row = W + i * m;
      const T ri = su[i];
      int64_t j = 0;
      for (; j + lanes <= m; j += lanes) store64(c + j, load64(c + j) + ri * load64(row + j));
      for (; j < m; ++j) c[j] += ri * row[j];
    }
  }

  // sv = b / e, guarded.
  SPECTRAL_EXT_ALWAYS_INLINE void update_columns() {
    for (int64_t j = 0; j < m; ++j) {
      const T s = b[j] / e[j];
      if (__builtin_expect(in_range(s), 1)) sv[j] = s; else absorb_column(j);
    }
  }

  // The rare paths, out of line so the loops above stay tight.
  __attribute__((noinline)) void absorb_column(int64_t j) {
    if (e[j] >= std::numeric_limits<T>::min() && std::isfinite(e[j])) {
      for (int64_t i = 0; i < n; ++i) W[i * m + j] = W[i * m + j] / e[j] * b[j];
      g[j] += std::log(b[j]) - std::log(e[j]);
    } else {  // v_j = log b_j - logsumexp_i(log K_ij + log u_i)
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, logk(i, j) + f[i] + std::log(su[i]));
      T acc = 0;
      for (int64_t i = 0; i < n; ++i) acc += std::exp(logk(i, j) + f[i] + std::log(su[i]) - mx);
      g[j] = std::log(b[j]) - mx - std::log(acc);
      for (int64_t i = 0; i < n; ++i) W[i * m + j] = std::exp(logk(i, j) + f[i] + g[j]);
    }
    sv[j] = T(1);
  }

  // su = a / (W sv), guarded.
  SPECTRAL_EXT_ALWAYS_INLINE void update_rows() {
    for (int64_t i = 0; i < n; ++i) {
      const T d = dot_contiguous(W + i * m, sv.data(), m);
      const T s = a[i] / d;
      if (__builtin_expect(in_range(s), 1)) su[i] = s; else absorb_row(i, d);
    }
  }

  __attribute__((noinline)) void absorb_row(int64_t i, T d) {
    T* row = W + i * m;
    if (d >= std::numeric_limits<T>::min() && std::isfinite(d)) {
      for (int64_t j = 0; j < m; ++j) row[j] = row[j] / d * a[i];
      f[i] += std::log(a[i]) - std::log(d);
    } else {
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < m; ++j) mx = std::max(mx, logk(i, j) + g[j] + std::log(sv[j]));
      T acc = 0;
      for (int64_t j = 0; j < m; ++j) acc += std::exp(logk(i, j) + g[j] + std::log(sv[j]) - mx);
      f[i] = std::log(a[i]) - mx - std::log(acc);
      for (int64_t j = 0; j < m; ++j) row[j] = std::exp(logk(i, j) + f[i] + g[j]);
    }
    su[i] = T(1);
  }

  // || plan^T 1 - b ||_2 from e = W^T su.
  SPECTRAL_EXT_ALWAYS_INLINE T column_error() const {
    T acc = 0;
    for (int64_t j = 0; j < m; ++j) {
      const T d = sv[j] * e[j] - b[j];
      acc += d * d;
    }
    return std::sqrt(acc);
  }

  void write_plan(T* log_u, T* log_v) {
    for (int64_t i = 0; i < n; ++i) {
      T* row = W + i * m;
      for (int64_t j = 0; j < m; ++j) row[j] = su[i] * row[j] * sv[j];
    }
    for (int64_t i = 0; i < n; ++i) log_u[i] = f[i] + std::log(su[i]);
    for (int64_t j = 0; j < m; ++j) log_v[j] = g[j] + std::log(sv[j]);
  }
};

// Runs one problem; returns the rounds done. err gets ||plan^T 1 - b|| after the
// rounds with index % check_every == 0 (POT's schedule); the loop stops after
// such a round when it is below stop_threshold (> 0).
template <typename T>
SPECTRAL_EXT_ALWAYS_INLINE int64_t sinkhorn_impl(Scaling<T>* s, int64_t iters, T stop_threshold,
                                                 int64_t check_every, T* err, InterruptPoll* poll) {
  s->init();
  int64_t done = 0;
  for (; done < iters; ++done) {
    if (poll->interrupted()) return done;
    s->column_sums();
    if (done > 0 && (done - 1) % check_every == 0) {  // the previous round's error, for free
      const T e = s->column_error();
      err[(done - 1) / check_every] = e;
      if (e < stop_threshold) return done;
    }
    s->update_columns();
    s->update_rows();
  }
  if (done > 0 && (done - 1) % check_every == 0) {
    s->column_sums();
    err[(done - 1) / check_every] = s->column_error();
  }
  return done;
}

template <typename T>
SPECTRAL_EXT_TARGET_AVX512 int64_t sinkhorn_avx512(Scaling<T>* s, int64_t iters, T thr, int64_t ce, T* err,
                                                   InterruptPoll* poll) {
  return sinkhorn_impl<T>(s, iters, thr, ce, err, poll);
}
template <typename T>
SPECTRAL_EXT_TARGET_AVX2 int64_t sinkhorn_avx2(Scaling<T>* s, int64_t iters, T thr, int64_t ce, T* err,
                                               InterruptPoll* poll) {
  return sinkhorn_impl<T>(s, iters, thr, ce, err, poll);
}
template <typename T>
int64_t sinkhorn_one(Scaling<T>* s, int64_t iters, T thr, int64_t ce, T* err, InterruptPoll* poll) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return sinkhorn_avx512<T>(s, iters, thr, ce, err, poll);
    case Isa::kAvx2: return sinkhorn_avx2<T>(s, iters, thr, ce, err, poll);
    default: return sinkhorn_impl<T>(s, iters, thr, ce, err, poll);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_scaling_cpu(
    const at::Tensor& K, const at::Tensor& a, const at::Tensor& b, int64_t iters, double stop_threshold,
    int64_t check_every, bool log_domain) {
  check_sinkhorn_scaling(K, a, b, iters, check_every);
  const int64_t B = K.size(0), n = K.size(1), m = K.size(2);
  const auto Kc = K.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  auto plan = at::empty_like(Kc);
  auto log_u = at::zeros({B, n}, K.options()), log_v = at::zeros({B, m}, K.options());
  auto rounds = at::zeros({B}, K.options().dtype(at::kLong));
  auto err = at::full({B, sinkhorn_checks(iters, check_every)}, std::numeric_limits<double>::quiet_NaN(),
                      K.options());
  if (plan.numel() == 0) return {plan, log_u, log_v, rounds, err};
  if (iters == 0) {
    plan.copy_(log_domain ? Kc.exp() : Kc);
    return {plan, log_u, log_v, rounds, err};
  }
  InterruptPoll poll;
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "sinkhorn_scaling_cpu", [&] {
    using T = scalar_t;
    const T* kp = Kc.data_ptr<T>();
    const T* ap = ac.data_ptr<T>();
    const T* bp = bc.data_ptr<T>();
    T* pp = plan.data_ptr<T>();
    T* up = log_u.data_ptr<T>();
    T* vp = log_v.data_ptr<T>();
    T* ep = err.data_ptr<T>();
    int64_t* rp = rounds.data_ptr<int64_t>();
    const int64_t checks = err.size(1);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scaling<T> s;
      for (int64_t p = begin; p < end && !poll.interrupted(); ++p) {
        s.K = kp + p * n * m; s.W = pp + p * n * m; s.a = ap + p * n; s.b = bp + p * m;
        s.n = n; s.m = m; s.log_domain = log_domain;
        rp[p] = sinkhorn_one<T>(&s, iters, static_cast<T>(stop_threshold), check_every, ep + p * checks, &poll);
        s.write_plan(up + p * n, vp + p * m);
      }
    });
  });
  poll.throw_if_interrupted();
  return {plan, log_u, log_v, rounds, err};
}

// The paper's form: a = b = 1, fixed rounds; only the plan.
at::Tensor sinkhorn_cpu(const at::Tensor& P, int64_t iters) {
  check_sinkhorn(P, iters);
  if (P.numel() == 0 || iters == 0) return P.contiguous().clone();
  const auto a = at::ones({P.size(0), P.size(1)}, P.options());
  const auto b = at::ones({P.size(0), P.size(2)}, P.options());
  return std::get<0>(sinkhorn_scaling_cpu(P, a, b, iters, 0.0, iters, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("sinkhorn_scaling", &sinkhorn_scaling_cpu);
}

}  // namespace spectral_ext
