#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
// scipy/optimize/rectangular_lsap), in double precision like scipy. Hand-written
// because no library offers a batched, parallel solver callable from C++.
//
// Two routes, one answer: scipy's own, ties included.
// - scipy's algorithm exactly (solve_exact): u = v = 0, rows augmented in order,
//   each Dijkstra step's reduced costs computed in scipy's order of operations
//   ((minVal + c_ij) - u_i) - v_j, and its tie rule: scipy scans the unscanned
//   columns in the order of a list that starts at nc-1, ..., 0 and loses each
//   scanned column by a swap with its last entry, keeps the first minimum and lets a
//   later equal unassigned column replace it. Here one contiguous vectorised pass
//   over all columns ranks the candidates by (value, key), key = ~position for an
//   unassigned column (the last in scipy's order wins) and position for an assigned
//   one (the first wins), which picks the same column.
// - square finite problems first take a faster route (solve_fast): Jonker-Volgenant's
//   initialisation (1987: column reduction, reduction transfer, augmenting row
//   reduction), which leaves valid duals and few free rows, then the augmentations.
//   Its optimum is scipy's when the optimum is unique, which the duals certify: with
//   reduced costs r_ij = c_ij - u_i - v_j >= 0, every other optimal (or within tol)
//   assignment differs from this one by alternating cycles of edges with r_ij <= tol,
//   i.e. by a cycle in the graph "row i -> the row holding column j" over such
//   edges. No cycle (the common case: random, weight-matching costs): done. A cycle
//   (ties: integer or constant costs): the problem is solved again by scipy's route.
//   tol = 1e-9 max|c_ij| is far above the rounding of either route, so a near-tie that
//   rounding could decide either way also goes to scipy's route.
// +inf entries (forbidden pairs) are allowed as in scipy; such a problem takes scipy's route.
struct Workspace {
  std::vector<double> u, v, spc, dist;
  std::vector<int64_t> path, col4row, row4col;
  std::vector<int64_t> SRlist, SClist, free_rows, next_rows, matches;
  std::vector<int64_t> remaining, pos;              // scipy's scan order (solve_exact)
  std::vector<int64_t> edge_start, edge_to, color;  // the tight graph (unique_optimum)
  std::vector<std::pair<int64_t, int64_t>> dfs;
  void resize(int64_t nr, int64_t nc) {
    u.assign(nr, 0); v.assign(nc, 0); spc.assign(nc, 0); dist.assign(nc, 0);
    path.assign(nc, -1); col4row.assign(nr, -1); row4col.assign(nc, -1);
    SRlist.clear(); SClist.clear();
    SRlist.reserve(nr); SClist.reserve(nc);
    remaining.resize(nc); pos.resize(nc);
  }
};

constexpr double kInf = std::numeric_limits<double>::infinity();
using Lanes = Vec64<double>::type;
using LaneIdx = long __attribute__((vector_size(64)));  // one int64 per double lane
constexpr int64_t kLanes = 64 / sizeof(double);
static_assert(sizeof(double) == sizeof(long), "the index lanes match the cost lanes");

SPECTRAL_EXT_ALWAYS_INLINE LaneIdx lane_iota() {
  LaneIdx idx;
  for (int64_t l = 0; l < kLanes; ++l) idx[l] = l;
  return idx;
}

// (h, col) into the two smallest so far, (b[0], k[0]) <= (b[1], k[1]) in lexicographic
// order; col < 0 is an empty lane. (Functions, not lambdas: GCC left lambdas out
// of line, compiled for the baseline ISA, which made the AVX-512 solver 10x slower.)
SPECTRAL_EXT_ALWAYS_INLINE void insert_top2(double h, int64_t col, double* b, int64_t* k) {
  if (col < 0) return;
  if (h < b[0] || (h == b[0] && col < k[0])) { b[1] = b[0]; k[1] = k[0]; b[0] = h; k[0] = col; }
  else if (h < b[1] || (h == b[1] && (k[1] < 0 || col < k[1]))) { b[1] = h; k[1] = col; }
}

// The two smallest (h_j, j) in lexicographic order of h_j = row_j - v_j, j < n:
// (*u1, *j1) the minimum at its first column, (*u2, *j2) the next (j2 = -1 when
// n == 1). Per-lane top-2 then a merge, which equals the scalar scan's answer.
SPECTRAL_EXT_ALWAYS_INLINE void two_smallest(const double* row, const double* v, int64_t n, double* u1,
                                             int64_t* j1, double* u2, int64_t* j2) {
  Lanes a1 = Lanes{} + kInf, a2 = a1;
  LaneIdx i1 = LaneIdx{} - 1, i2 = i1, idx = lane_iota();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes, idx += kLanes) {
    const Lanes h = load64(row + j) - load64(v + j);
    const auto lt1 = h < a1, lt2 = h < a2;
    a2 = lt1 ? a1 : (lt2 ? h : a2);
    i2 = lt1 ? i1 : (lt2 ? idx : i2);
    a1 = lt1 ? h : a1;
    i1 = lt1 ? idx : i1;
  }
  double b[2] = {kInf, kInf};
  int64_t k[2] = {-1, -1};
  for (int64_t l = 0; l < kLanes; ++l) { insert_top2(a1[l], i1[l], b, k); insert_top2(a2[l], i2[l], b, k); }
  for (; j < n; ++j) insert_top2(row[j] - v[j], j, b, k);
  *u1 = b[0]; *j1 = k[0]; *u2 = b[1]; *j2 = k[1];
}

// The smallest (value, key) so far.
struct KeyedClosest {
  double lowest = kInf;
  long key = std::numeric_limits<long>::max();
  int64_t arg = -1;
  SPECTRAL_EXT_ALWAYS_INLINE void consider(double value, long k, int64_t col) {
    if (value < lowest || (value == lowest && k < key)) { lowest = value; key = k; arg = col; }
  }
};

// One Dijkstra step over all columns: spc_j = min(spc_j, r) with r = ((minVal + c_ij)
// - u_i) - v_j (scipy's order of operations, so scipy's rounding), path_j = i where it
// improves; returns the smallest spc_j over unscanned columns (scanned ones hold
// -inf) and, in *best, the column picked among those at that value: the smallest key.
// Exact (scipy's pick): key = ~pos_j for an unassigned column, pos_j for an assigned
// one, pos_j its place in scipy's list of unscanned columns. Otherwise: an unassigned
// column first, then the lowest index. Two passes: the vectorised update and minimum,
// then the columns at the minimum (GCC scalarised a one-pass argmin, which mixes
// double comparisons with integer masks, to 3-5 ns a column; this is about 1.5).
template <bool Exact>
SPECTRAL_EXT_ALWAYS_INLINE double scan(const double* row, double ui, const double* v, double* spc, int64_t* path,
                                       const int64_t* row4col, const int64_t* pos, int64_t nc, double minVal,
                                       int64_t i, int64_t* best) {
  const Lanes vmin = Lanes{} + minVal, vu = Lanes{} + ui, vinf = Lanes{} + kInf, vneg = Lanes{} - kInf;
  const LaneIdx vi = LaneIdx{} + i;
  Lanes low = vinf;
  int64_t j = 0;
  for (; j + kLanes <= nc; j += kLanes) {
    const Lanes r = ((vmin + load64(row + j)) - vu) - load64(v + j);
    Lanes d = load64(spc + j);
    const auto improves = r < d;
    d = improves ? r : d;
    store64(spc + j, d);
    LaneIdx p;
    __builtin_memcpy(&p, path + j, sizeof(p));
    p = improves ? vi : p;
    __builtin_memcpy(path + j, &p, sizeof(p));
    const Lanes open = d == vneg ? vinf : d;
    low = open < low ? open : low;
  }
  double lowest = kInf;
  for (int64_t l = 0; l < kLanes; ++l) lowest = low[l] < lowest ? low[l] : lowest;
  for (; j < nc; ++j) {
    const double r = ((minVal + row[j]) - ui) - v[j];
    if (r < spc[j]) { spc[j] = r; path[j] = i; }
    if (spc[j] != -kInf && spc[j] < lowest) lowest = spc[j];
  }
  KeyedClosest c;
  for (j = 0; j < nc; ++j) {
    if (spc[j] != lowest) continue;
    const bool open = row4col[j] == -1;
    c.consider(lowest, Exact ? (open ? ~pos[j] : pos[j]) : (open ? j - nc : j), j);
  }
  *best = c.arg;
  return lowest;
}

// scipy's Dijkstra step as scipy writes it, over its list of unscanned columns
// (scalar: cheaper than scan<true>'s passes over all columns once most are scanned).
SPECTRAL_EXT_ALWAYS_INLINE double scan_list(const double* row, double ui, const double* v, double* spc,
                                            int64_t* path, const int64_t* row4col, const int64_t* remaining,
                                            int64_t num_remaining, double minVal, int64_t i, int64_t* best) {
  double lowest = kInf;
  int64_t index = -1;
  for (int64_t it = 0; it < num_remaining; ++it) {
    const int64_t j = remaining[it];
    const double r = ((minVal + row[j]) - ui) - v[j];
    if (r < spc[j]) { path[j] = i; spc[j] = r; }
    if (spc[j] < lowest || (spc[j] == lowest && row4col[j] == -1)) { lowest = spc[j]; index = it; }
  }
  *best = index < 0 ? -1 : remaining[index];
  return lowest;
}

// The vectorised pass over all columns is used while more than 1/kSparseScan of them are unscanned.
constexpr int64_t kSparseScan = 3;

// The shortest augmenting path from free row i (Crouse's Alg. 4). Exact: scipy's
// scan order and tie rule; otherwise any optimum.
template <bool Exact>
SPECTRAL_EXT_ALWAYS_INLINE int64_t augmenting_path(int64_t nc, const double* cost, Workspace& w, int64_t i,
                                                   double* min_val) {
  double minVal = 0;
  std::fill(w.spc.begin(), w.spc.end(), kInf);
  w.SRlist.clear();
  w.SClist.clear();
  int64_t num_remaining = nc;
  if (Exact) {  // scipy fills its list in reverse order (scipy issue 11602: identity on constant costs)
    for (int64_t it = 0; it < nc; ++it) { w.remaining[it] = nc - it - 1; w.pos[nc - it - 1] = it; }
  }
  int64_t sink = -1;
  while (sink == -1) {
    w.SRlist.push_back(i);
    int64_t j = -1;
    const double lowest =
        Exact && num_remaining * kSparseScan < nc
            ? scan_list(cost + i * nc, w.u[i], w.v.data(), w.spc.data(), w.path.data(), w.row4col.data(),
                        w.remaining.data(), num_remaining, minVal, i, &j)
            : scan<Exact>(cost + i * nc, w.u[i], w.v.data(), w.spc.data(), w.path.data(), w.row4col.data(),
                          w.pos.data(), nc, minVal, i, &j);
    if (lowest == kInf || j < 0) return -1;  // no finite path: the problem is infeasible
    minVal = lowest;
    w.dist[j] = lowest;
    w.spc[j] = -kInf;
    w.SClist.push_back(j);
    if (Exact) {  // scipy's removal: the last entry of the list takes the scanned column's place
      const int64_t at = w.pos[j], last = w.remaining[--num_remaining];
      w.remaining[at] = last;
      w.pos[last] = at;
    }
    if (w.row4col[j] == -1) sink = j; else i = w.row4col[j];
  }
  *min_val = minVal;
  return sink;
}

// Column reduction, read row by row (contiguous, vectorised): v_j = min_i c_ij
// at its first row arg_j (kept in w.path for now).
SPECTRAL_EXT_ALWAYS_INLINE void column_minima(int64_t n, const double* cost, Workspace& w) {
  double* v = w.v.data();
  int64_t* arg = w.path.data();
  std::copy(cost, cost + n, v);
  std::fill(arg, arg + n, 0);
  for (int64_t i = 1; i < n; ++i) {
    const double* row = cost + i * n;
    const LaneIdx vi = LaneIdx{} + i;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const Lanes c = load64(row + j), m = load64(v + j);
      const auto lt = c < m;
      store64(v + j, lt ? c : m);
      LaneIdx a;
      __builtin_memcpy(&a, arg + j, sizeof(a));
      a = lt ? vi : a;
      __builtin_memcpy(arg + j, &a, sizeof(a));
    }
    for (; j < n; ++j)
      if (row[j] < v[j]) { v[j] = row[j]; arg[j] = i; }
  }
}

// Jonker-Volgenant's initialisation for square problems: column reduction,
// reduction transfer and two passes of augmenting row reduction. It keeps every
// assigned row at a minimum of its reduced costs c_ij - v_j with v_j <= min_i c_ij,
// so u_i = c_i,x(i) - v_x(i) (0 for free rows) are feasible duals and the assigned
// pairs tight: a valid start for the augmentations. Most rows end up assigned.
SPECTRAL_EXT_ALWAYS_INLINE void jv_initialise(int64_t n, const double* cost, Workspace& w) {
  column_minima(n, cost, w);
  w.matches.assign(n, 0);
  for (int64_t j = n - 1; j >= 0; --j) {  // the last column of a row with several minima keeps it
    const int64_t arg = w.path[j];
    if (w.matches[arg]++ == 0) { w.col4row[arg] = j; w.row4col[j] = arg; }
  }
  w.free_rows.clear();
  for (int64_t i = 0; i < n; ++i)
    if (w.matches[i] == 0) w.free_rows.push_back(i);
  // Every row holds its own column minimum (common on weight-matching costs): the
  // assignment is complete and tight for u = 0, v = column minima, so optimal.
  if (w.free_rows.empty()) return;
  double u1, u2;
  int64_t j1, j2;
  for (int64_t i = 0; i < n; ++i) {
    if (w.matches[i] == 1) {  // reduction transfer: row i's slack moves onto v_x(i)
      const int64_t x = w.col4row[i];
      two_smallest(cost + i * n, w.v.data(), n, &u1, &j1, &u2, &j2);
      const double mn = j1 == x ? u2 : u1;  // min over j != x of c_ij - v_j
      if (mn < kInf) w.v[x] = cost[i * n + x] - mn;
    }
  }
  for (int pass = 0; pass < 2 && !w.free_rows.empty(); ++pass) {  // augmenting row reduction
    auto& free_rows = w.free_rows;
    auto& next = w.next_rows;
    next.clear();
    size_t k = 0;
    // Ties can make this phase long; the augmentations finish the job (4n row
    // scans a pass was the fastest of 0-8n and unbounded on random 300 x 300 costs).
    int64_t budget = 4 * n;
    while (k < free_rows.size() && budget-- > 0) {
      const int64_t i = free_rows[k++];
      two_smallest(cost + i * n, w.v.data(), n, &u1, &j1, &u2, &j2);
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

enum Status { kSolved = 0, kInvalid = 1, kInfeasible = 2 };

// What scipy checks before solving: NaN or -inf make the problem invalid; +inf
// entries are forbidden pairs, which JV's column reduction cannot take (v_j = inf).
// The common all-finite case is one vectorised pass: x * 0 is NaN unless x is finite.
SPECTRAL_EXT_ALWAYS_INLINE Status classify(const double* c, int64_t count, bool* has_inf) {
  Lanes probe = Lanes{};
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) probe += load64(c + k) * 0.0;
  double total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += probe[l];
  for (; k < count; ++k) total += c[k] * 0.0;
  *has_inf = false;
  if (total == 0.0) return kSolved;
  for (k = 0; k < count; ++k) {
    if (c[k] != c[k] || c[k] == -kInf) return kInvalid;
    *has_inf |= c[k] == kInf;
  }
  return kSolved;
}

// Integer costs spanning fewer than 4n values (counts, small integer weights) nearly
// always have several optimal assignments: the fast route would run in vain before
// scipy's (on 300 x 300 costs in 0..9 it cost 2.8x scipy's route alone). A guess that
// only picks the route: the answer is scipy's either way.
SPECTRAL_EXT_ALWAYS_INLINE bool likely_ties(int64_t n, const double* c) {
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: (x + kRound) - kRound is x rounded, |x| < 2^51
  Lanes lo = Lanes{} + kInf, hi = Lanes{} - kInf, off = Lanes{};
  int64_t k = 0;
  for (; k + kLanes <= n * n; k += kLanes) {
    const Lanes x = load64(c + k);
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
    const Lanes d = ((x + kRound) - kRound) - x;
    off += d * d;
  }
  double low = kInf, high = -kInf, fraction = 0;
  for (int64_t l = 0; l < kLanes; ++l) { low = std::min(low, lo[l]); high = std::max(high, hi[l]); fraction += off[l]; }
  for (; k < n * n; ++k) {
    low = std::min(low, c[k]);
    high = std::max(high, c[k]);
    const double d = ((c[k] + kRound) - kRound) - c[k];
    fraction += d * d;
  }
  return fraction == 0 && high - low < 4.0 * static_cast<double>(n);
}

// Augment every free row in order (rows already assigned by an initialisation are skipped).
template <bool Exact>
SPECTRAL_EXT_ALWAYS_INLINE void augment_rows(int64_t nr, int64_t nc, const double* cost, Workspace& w,
                                             InterruptPoll* poll, Status* status) {
  for (int64_t cur = 0; cur < nr; ++cur) {
    if (w.col4row[cur] != -1) continue;
    if (poll->interrupted()) return;
    double minVal = 0;
    const int64_t sink = augmenting_path<Exact>(nc, cost, w, cur, &minVal);
    if (sink < 0) { *status = kInfeasible; return; }
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

// True when the complete assignment in w (square, n x n, with feasible duals u, v)
// is the only one within tol of the optimum: no cycle row i -> row4col[j] over the
// edges (i, j), j != col4row[i], with reduced cost c_ij - u_i - v_j <= tol.
SPECTRAL_EXT_ALWAYS_INLINE bool unique_optimum(int64_t n, const double* cost, Workspace& w) {
  Lanes big = Lanes{};
  int64_t k = 0;
  for (; k + kLanes <= n * n; k += kLanes) {
    const Lanes c = load64(cost + k);
    const Lanes a = c < 0 ? -c : c;
    big = a > big ? a : big;
  }
  double scale = 0;
  for (int64_t l = 0; l < kLanes; ++l) scale = std::max(scale, big[l]);
  for (; k < n * n; ++k) scale = std::max(scale, std::fabs(cost[k]));
  const double tol = 1e-9 * scale;
  w.edge_start.assign(n + 1, 0);
  w.edge_to.clear();
  for (int64_t i = 0; i < n; ++i) {
    const double* row = cost + i * n;
    const double ui = w.u[i];
    const int64_t x = w.col4row[i];
    for (int64_t j = 0; j < n; ++j)
      if (row[j] - ui - w.v[j] <= tol && j != x) w.edge_to.push_back(w.row4col[j]);
    w.edge_start[i + 1] = static_cast<int64_t>(w.edge_to.size());
  }
  if (w.edge_to.empty()) return true;
  // Iterative depth-first search: 0 unseen, 1 on the current path, 2 done.
  w.color.assign(n, 0);
  std::vector<std::pair<int64_t, int64_t>>& stack = w.dfs;
  for (int64_t s = 0; s < n; ++s) {
    if (w.color[s] != 0) continue;
    w.color[s] = 1;
    stack.assign(1, {s, w.edge_start[s]});
    while (!stack.empty()) {
      auto& [node, next] = stack.back();
      if (next == w.edge_start[node + 1]) {
        w.color[node] = 2;
        stack.pop_back();
        continue;
      }
      const int64_t t = w.edge_to[next++];
      if (w.color[t] == 1) return false;
      if (w.color[t] == 0) {
        w.color[t] = 1;
        stack.push_back({t, w.edge_start[t]});
      }
    }
  }
  return true;
}

// cost: nr x nc, nr <= nc, row-major double. Fills col4row (the column of each row)
// and *status. T is double (the template lets SPECTRAL_EXT_ISA_CLONES compile it per ISA).
template <typename T>
SPECTRAL_EXT_ALWAYS_INLINE void solve_impl(int64_t nr, int64_t nc, const T* cost, Workspace* ws,
                                           InterruptPoll* poll, Status* status) {
  Workspace& w = *ws;
  bool has_inf = false;
  *status = classify(cost, nr * nc, &has_inf);
  if (*status != kSolved) return;
  if (nr == nc && !has_inf && !likely_ties(nr, cost)) {  // the fast route, kept when its optimum is the only one
    w.resize(nr, nc);
    jv_initialise(nr, cost, w);
    augment_rows<false>(nr, nc, cost, w, poll, status);
    if (*status != kSolved || poll->interrupted()) return;
    if (unique_optimum(nr, cost, w)) return;
  }
  w.resize(nr, nc);  // scipy's route: u = v = 0, nothing assigned
  augment_rows<true>(nr, nc, cost, w, poll, status);
}
SPECTRAL_EXT_ISA_CLONES(solve_one, solve_impl)

// Problem b of cost as nr x nc row-major doubles with the short side as rows (and
// the sign for maximize), copied into buf, which stays in cache for the solver.
template <typename scalar_t>
void load_problem(const at::Tensor& cost, int64_t b, bool transpose, bool maximize, std::vector<double>& buf) {
  const scalar_t* p = cost.data_ptr<scalar_t>() + b * cost.stride(0);
  const int64_t s1 = cost.stride(1), s2 = cost.stride(2);
  const int64_t nr = transpose ? cost.size(2) : cost.size(1), nc = transpose ? cost.size(1) : cost.size(2);
  const int64_t sr = transpose ? s2 : s1, sc = transpose ? s1 : s2;
  const double sign = maximize ? -1.0 : 1.0;
  buf.resize(nr * nc);
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t j = 0; j < nc; ++j) buf[i * nc + j] = sign * static_cast<double>(p[i * sr + j * sc]);
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
  const int64_t nr = transpose ? m : n, nc = transpose ? n : m;
  // Contiguous float64 minimisation problems are read in place; any other input
  // is copied one problem at a time inside the worker (no batch-sized copy).
  const bool in_place = cost.scalar_type() == at::kDouble && !maximize && !transpose && cost.is_contiguous();
  int64_t* ro = rows.data_ptr<int64_t>();
  int64_t* co = cols.data_ptr<int64_t>();
  InterruptPoll poll;
  std::atomic<int> failure{kSolved};
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Workspace w;
    std::vector<double> buf;
    std::vector<int64_t> order(nr);
    for (int64_t b = begin; b < end && !poll.interrupted(); ++b) {
      const double* problem = nullptr;
      if (in_place) {
        problem = cost.data_ptr<double>() + b * nr * nc;
      } else {
        AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment", [&] {
          load_problem<scalar_t>(cost, b, transpose, maximize, buf);
        });
        problem = buf.data();
      }
      Status status = kSolved;
      solve_one<double>(nr, nc, problem, &w, &poll, &status);
      if (poll.interrupted()) return;
      if (status != kSolved) {  // an invalid problem is reported before an infeasible one, as scipy checks first
        int expected = kSolved;
        if (!failure.compare_exchange_strong(expected, status) && status == kInvalid) failure.store(kInvalid);
        continue;
      }
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
  // ValueError in Python, as scipy raises for these.
  TORCH_CHECK_VALUE(failure.load() != kInvalid,
                    "linear_sum_assignment: cost matrix contains invalid numeric entries (NaN or ",
                    maximize ? "+inf, with maximize=True)" : "-inf)");
  TORCH_CHECK_VALUE(failure.load() != kInfeasible, "linear_sum_assignment: the cost matrix is infeasible");
  return {rows, cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cpu);
}

}  // namespace spectral_ext
