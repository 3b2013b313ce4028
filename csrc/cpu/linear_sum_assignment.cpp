#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "../interrupt.h"
#include "simd.h"

namespace spectral_ext {
namespace {

// The shortest augmenting path solver of scipy.optimize.linear_sum_assignment
// (Crouse 2016, "On implementing 2D rectangular assignment algorithms", Alg. 4;
// scipy/optimize/rectangular_lsap), in double precision like scipy, with the same
// Dijkstra step and tie rule (the closest column, an unassigned one first), so the
// same optimum. Hand-written because no library offers a batched, parallel
// solver callable from C++. Before the augmentations a column reduction (the first
// phase of Jonker-Volgenant 1987) assigns each column's cheapest row when that row
// is free: duals v_j = min_i c_ij, u = 0 are feasible and those pairs tight, so
// the augmentations start from a valid partial solution with fewer rows left.
// With ties the chosen optimum can then differ from scipy's (same cost).
struct Workspace {
  std::vector<double> u, v, spc, dist;
  std::vector<int64_t> path, col4row, row4col;
  std::vector<int64_t> SRlist, SClist;
  void resize(int64_t nr, int64_t nc) {
    u.assign(nr, 0); v.assign(nc, 0); spc.assign(nc, 0); dist.assign(nc, 0);
    path.assign(nc, -1); col4row.assign(nr, -1); row4col.assign(nc, -1);
    SRlist.clear(); SClist.clear();
    SRlist.reserve(nr); SClist.reserve(nc);
  }
};

constexpr double kInf = std::numeric_limits<double>::infinity();

// One Dijkstra step over all columns, vectorised: spc_j = min(spc_j, base + c_ij - v_j)
// (path_j = i where it improves), and the closest column not yet scanned, an
// unassigned one first on ties (scipy's rule), returned in *best. Scanned columns
// hold spc_j = -inf, which no candidate improves. scipy walks a list of the
// unscanned columns instead; one contiguous pass over all of them is faster.
template <typename T>
SPECTRAL_EXT_ALWAYS_INLINE T scan_impl(const T* row, const T* v, T* spc, int64_t* path, const int64_t* row4col,
                                       int64_t nc, T base, int64_t i, int64_t* best) {
  using V = typename Vec64<T>::type;
  using I = long __attribute__((vector_size(64)));
  constexpr int64_t lanes = 64 / sizeof(T);
  static_assert(sizeof(T) == sizeof(long), "the index lanes match the cost lanes");
  const V vbase = V{} + base, vinf = V{} + kInf, vneg = V{} - kInf;
  const I vi = I{} + i;
  V low = vinf;
  I low_idx = I{} - 1, low_taken = I{} - 1;  // per lane: the best column and whether it is assigned
  I idx;
  for (int64_t l = 0; l < lanes; ++l) idx[l] = l;
  int64_t j = 0;
  for (; j + lanes <= nc; j += lanes, idx += lanes) {
    const V r = vbase + load64(row + j) - load64(v + j);
    V d = load64(spc + j);
    const auto improves = r < d;
    d = improves ? r : d;
    store64(spc + j, d);
    I p, owner;
    __builtin_memcpy(&p, path + j, sizeof(p));
    p = improves ? vi : p;
    __builtin_memcpy(path + j, &p, sizeof(p));
    __builtin_memcpy(&owner, row4col + j, sizeof(owner));
    const V open = d == vneg ? vinf : d;
    const I taken = owner != -1;  // -1 where assigned
    const I better = (open < low) | ((open == low) & ~taken & low_taken);
    low = better ? open : low;
    low_idx = better ? idx : low_idx;
    low_taken = better ? taken : low_taken;
  }
  T lowest = kInf;
  int64_t arg = -1;
  bool arg_taken = true;
  auto consider = [&](T value, int64_t col, bool taken) {
    if (col < 0) return;
    if (value < lowest || (value == lowest && ((arg_taken && !taken) || (arg_taken == taken && col < arg)))) {
      lowest = value; arg = col; arg_taken = taken;
    }
  };
  for (int64_t l = 0; l < lanes; ++l) consider(low[l], low_idx[l], low_taken[l] != 0);
  for (; j < nc; ++j) {
    const T r = base + row[j] - v[j];
    if (r < spc[j]) { spc[j] = r; path[j] = i; }
    if (spc[j] != -kInf) consider(spc[j], j, row4col[j] != -1);
  }
  *best = lowest < kInf ? arg : -1;
  return lowest;
}

#define SPECTRAL_EXT_SCAN_ARGS                                                                       \
  const double *row, const double *v, double *spc, int64_t *path, const int64_t *row4col, int64_t nc, \
      double base, int64_t i, int64_t *best
SPECTRAL_EXT_TARGET_AVX512 double scan_avx512(SPECTRAL_EXT_SCAN_ARGS) {
  return scan_impl<double>(row, v, spc, path, row4col, nc, base, i, best);
}
SPECTRAL_EXT_TARGET_AVX2 double scan_avx2(SPECTRAL_EXT_SCAN_ARGS) {
  return scan_impl<double>(row, v, spc, path, row4col, nc, base, i, best);
}
double scan_baseline(SPECTRAL_EXT_SCAN_ARGS) { return scan_impl<double>(row, v, spc, path, row4col, nc, base, i, best); }
double scan(SPECTRAL_EXT_SCAN_ARGS) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return scan_avx512(row, v, spc, path, row4col, nc, base, i, best);
    case Isa::kAvx2: return scan_avx2(row, v, spc, path, row4col, nc, base, i, best);
    default: return scan_baseline(row, v, spc, path, row4col, nc, base, i, best);
  }
}

int64_t augmenting_path(int64_t nc, const double* cost, Workspace& w, int64_t i, double* min_val) {
  double minVal = 0;
  std::fill(w.spc.begin(), w.spc.end(), kInf);
  w.SRlist.clear();
  w.SClist.clear();
  int64_t sink = -1;
  while (sink == -1) {
    w.SRlist.push_back(i);
    int64_t j = -1;
    const double lowest = scan(cost + i * nc, w.v.data(), w.spc.data(), w.path.data(), w.row4col.data(), nc,
                               minVal - w.u[i], i, &j);
    if (lowest == kInf) return -1;  // cannot happen for finite costs
    minVal = lowest;
    w.dist[j] = lowest;
    w.spc[j] = -kInf;
    w.SClist.push_back(j);
    if (w.row4col[j] == -1) sink = j; else i = w.row4col[j];
  }
  *min_val = minVal;
  return sink;
}

// Jonker-Volgenant's initialisation for square problems: column reduction,
// reduction transfer and two passes of augmenting row reduction. It keeps every
// assigned row at a minimum of its reduced costs c_ij - v_j with v_j <= min_i c_ij,
// so u_i = c_i,x(i) - v_x(i) (0 for free rows) are feasible duals and the assigned
// pairs tight: a valid start for the augmentations. Most rows end up assigned.
void jv_initialise(int64_t n, const double* cost, Workspace& w) {
  std::vector<int64_t> matches(n, 0);
  for (int64_t j = n - 1; j >= 0; --j) {  // column reduction
    double best = cost[j];
    int64_t arg = 0;
    for (int64_t i = 1; i < n; ++i)
      if (cost[i * n + j] < best) { best = cost[i * n + j]; arg = i; }
    w.v[j] = best;
    if (matches[arg]++ == 0) { w.col4row[arg] = j; w.row4col[j] = arg; }
  }
  std::vector<int64_t> free_rows;
  for (int64_t i = 0; i < n; ++i) {
    if (matches[i] == 0) {
      free_rows.push_back(i);
    } else if (matches[i] == 1) {  // reduction transfer
      const int64_t j1 = w.col4row[i];
      double mn = kInf;
      for (int64_t j = 0; j < n; ++j)
        if (j != j1) mn = std::min(mn, cost[i * n + j] - w.v[j]);
      if (mn < kInf) w.v[j1] = cost[i * n + j1] - mn;  // row i's slack moves onto v_j1
    }
  }
  for (int pass = 0; pass < 2 && !free_rows.empty(); ++pass) {  // augmenting row reduction
    std::vector<int64_t> next;
    size_t k = 0;
    int64_t budget = 4 * n;  // ties can make this phase long; the augmentations finish the job
    while (k < free_rows.size() && budget-- > 0) {
      const int64_t i = free_rows[k++];
      const double* row = cost + i * n;
      double u1 = kInf, u2 = kInf;
      int64_t j1 = -1, j2 = -1;
      for (int64_t j = 0; j < n; ++j) {
        const double h = row[j] - w.v[j];
        if (h < u2) {
          if (h < u1) { u2 = u1; j2 = j1; u1 = h; j1 = j; } else { u2 = h; j2 = j; }
        }
      }
      if (j2 < 0) { j2 = j1; u2 = u1; }  // n == 1
      int64_t i0 = w.row4col[j1];
      if (u1 < u2) {
        w.v[j1] -= u2 - u1;
      } else if (i0 >= 0) {
        j1 = j2;
        i0 = w.row4col[j1];
      }
      if (i0 >= 0) w.col4row[i0] = -1;
      w.col4row[i] = j1;
      w.row4col[j1] = i;
      if (i0 >= 0) {
        if (u1 < u2) free_rows[--k] = i0; else next.push_back(i0);
      }
    }
    for (; k < free_rows.size(); ++k) next.push_back(free_rows[k]);
    free_rows.swap(next);
  }
  for (int64_t i = 0; i < n; ++i)
    w.u[i] = w.col4row[i] >= 0 ? cost[i * n + w.col4row[i]] - w.v[w.col4row[i]] : 0.0;
}

// cost: nr x nc, nr <= nc, row-major double. Fills col4row (the column of each row).
void solve_one(int64_t nr, int64_t nc, const double* cost, Workspace& w, InterruptPoll& poll) {
  w.resize(nr, nc);
  if (nr == nc) jv_initialise(nr, cost, w);  // rectangular: scipy's start (v = 0) keeps it optimal
  for (int64_t cur = 0; cur < nr; ++cur) {
    if (w.col4row[cur] != -1) continue;
    if (poll.interrupted()) return;
    double minVal = 0;
    const int64_t sink = augmenting_path(nc, cost, w, cur, &minVal);
    TORCH_CHECK(sink >= 0, "linear_sum_assignment: the cost matrix is infeasible");
    w.u[cur] += minVal;
    for (const int64_t i : w.SRlist)
      if (i != cur) w.u[i] += minVal - w.dist[w.col4row[i]];
    for (const int64_t j : w.SClist) w.v[j] -= minVal - w.dist[j];
    for (int64_t j = sink;;) {
      const int64_t i = w.path[j];
      w.row4col[j] = i;
      std::swap(w.col4row[i], j);
      if (i == cur) break;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> linear_sum_assignment_cpu(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.dim() == 3, "linear_sum_assignment: cost must be (B, n, m), got ", cost.sizes());
  check_float(cost, "linear_sum_assignment: cost");
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  const int64_t k = std::min(n, m);
  auto opts = cost.options().dtype(at::kLong);
  auto rows = at::empty({B, k}, opts), cols = at::empty({B, k}, opts);
  if (B == 0 || k == 0) return {rows, cols};
  const bool transpose = n > m;  // solve with nr <= nc, as scipy does
  // One double copy with the short side as rows (and the sign for maximize): the
  // solver reads rows contiguously.
  const at::Tensor view = transpose ? cost.transpose(1, 2) : cost;
  const at::Tensor work = maximize ? view.to(at::kDouble).neg().contiguous()
                                   : view.to(at::kDouble).contiguous();
  const int64_t nr = transpose ? m : n, nc = transpose ? n : m;
  const double* c = work.data_ptr<double>();
  int64_t* ro = rows.data_ptr<int64_t>();
  int64_t* co = cols.data_ptr<int64_t>();
  InterruptPoll poll;
  std::atomic<bool> non_finite{false};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Workspace w;
    std::vector<int64_t> order(nr);
    for (int64_t b = begin; b < end && !poll.interrupted(); ++b) {
      // Finite costs, checked here while the problem is in cache (at::isfinite
      // over the whole batch cost more than solving easy problems).
      const double* cb_in = c + b * nr * nc;
      double probe = 0;
      for (int64_t k = 0; k < nr * nc; ++k) probe += cb_in[k] * 0.0;  // NaN unless every entry is finite
      if (probe != 0.0) { non_finite.store(true); continue; }
      solve_one(nr, nc, cb_in, w, poll);
      if (poll.interrupted()) return;
      int64_t* rb = ro + b * k;
      int64_t* cb = co + b * k;
      if (transpose) {  // rows sorted, as scipy returns them
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(),
                  [&](int64_t x, int64_t y) { return w.col4row[x] < w.col4row[y]; });
        for (int64_t i = 0; i < nr; ++i) { rb[i] = w.col4row[order[i]]; cb[i] = order[i]; }
      } else {
        for (int64_t i = 0; i < nr; ++i) { rb[i] = i; cb[i] = w.col4row[i]; }
      }
    }
  });
  poll.throw_if_interrupted();
  TORCH_CHECK(!non_finite.load(), "linear_sum_assignment: cost contains NaN or infinite values");
  return {rows, cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cpu);
}

}  // namespace spectral_ext
