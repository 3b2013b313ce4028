#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../interrupt.h"
#include "simd.h"

// Exact optimal transport (POT's ot.emd): the primal network simplex on the
// transportation problem min <M, G> s.t. G 1 = a, G^T 1 = b, G >= 0, for a batch of
// problems in parallel (one problem per thread). Written here, not taken from a
// library: no library offers a batched exact solver callable from C++.
//
// The graph: sources 0..n-1 (supply a_i), sinks n..n+m-1 (demand b_j), an arc i -> j of
// cost M_ij for every pair, and an artificial root n+m. A basis is a spanning tree
// rooted at the root; the root's children hang from it by artificial arcs root -> x
// that carry no flow (they all leave the root, and the root has no supply, so they
// never can) and never re-enter, so their costs never matter.
//
// - Start: a feasible basis at once (no phase of artificial flows): the row-minimum
//   rule on reduced costs M_ij - u0_i - v0_j (u0, v0: warm-start potentials, else
//   v0 = the column minima) gives each row's mass to its cheapest columns with demand
//   left; each allocation exhausts a row or a column, so the arcs with flow form a
//   forest, each tree of it hung from the root. Every zero-flow arc of this tree
//   points away from the root: the tree is strongly feasible.
// - Pricing: block search (as in LEMON and POT) over the arcs in row-major order,
//   blocks of max(sqrt(n m), 10) arcs, the reduced costs c_ij = M_ij - u_i - v_j of a
//   row segment computed 8 at a time; an arc enters when c_ij < -eps (|M_ij| + |u_i|
//   + |v_j|), eps ~ 10 ulp, so rounding cannot make the search go on for ever.
// - Ratio test: Cunningham's rule (the last blocking arc met along the cycle from its
//   apex) keeps the tree strongly feasible, which rules out cycling on degenerate
//   pivots (transport problems are full of them).
// - Tree: parent pointers, subtree sizes and child lists; a pivot reverses the path
//   from the entering arc to the leaving one, updates the sizes along the cycle and
//   shifts the potentials of the subtree it moves, or of the rest of the tree when that
//   is smaller (a shift of all potentials leaves the reduced costs as they are).
// - Potentials recomputed along the tree and centred every 4 (n + m) pivots and before a
//   basis is declared optimal (refresh_potentials): without it, on costs spanning
//   1e-8..1e8, shifts as large as 1e8 left rounding (and a common offset of ~6e6 that
//   widened the pricing tolerance) which hid entering arcs: 3 of 22 such problems stopped
//   0.2-1.2% above the optimum.
// Zero-mass rows and columns are removed first (as POT does); their potentials are 0.
// Potentials: u_i for source i, v_j for sink j, with M_ij - u_i - v_j >= 0 at the
// optimum and = 0 on the arcs with flow.

namespace spectral_ext {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kEps = 2.220446049250313e-15;
enum Result : int64_t { kInfeasible = 0, kOptimal = 1, kUnbounded = 2, kMaxIterReached = 3 };  // POT's codes

using Lanes = Vec64<double>::type;
constexpr int64_t kLanes = 64 / sizeof(double);

struct Workspace {
  // the problem, compacted when some masses are zero
  std::vector<double> M, a, b, u0, v0;
  std::vector<int64_t> rows, cols;
  // the tree over n + m + 1 nodes
  std::vector<int64_t> parent, child, next, prev, size, stack, path;
  std::vector<double> flow, pot, ra, rb;
  std::vector<int64_t> alive, adj_start, adj_to;
  std::vector<double> adj_flow;
  std::vector<int64_t> arc_i, arc_j;
  std::vector<double> arc_x;
};

struct Problem {
  int64_t n, m;
  const double* M;  // n x m row-major
  const double* a;
  const double* b;
  const double* u0;  // warm-start potentials, or nullptr
  const double* v0;
};

SPECTRAL_EXT_ALWAYS_INLINE void link(Workspace& w, int64_t x, int64_t p) {
  w.parent[x] = p;
  w.prev[x] = -1;
  w.next[x] = w.child[p];
  if (w.child[p] >= 0) w.prev[w.child[p]] = x;
  w.child[p] = x;
}

SPECTRAL_EXT_ALWAYS_INLINE void unlink(Workspace& w, int64_t x) {
  const int64_t p = w.parent[x];
  if (w.prev[x] >= 0) w.next[w.prev[x]] = w.next[x]; else w.child[p] = w.next[x];
  if (w.next[x] >= 0) w.prev[w.next[x]] = w.prev[x];
}

// min_k (row[k] - ui) - v[k] over k < len, 8 lanes at a time, and an index k where it is.
using LaneIdx = long __attribute__((vector_size(64)));
SPECTRAL_EXT_ALWAYS_INLINE double segment_min(const double* row, double ui, const double* v, int64_t len,
                                              int64_t* at) {
  const Lanes vu = Lanes{} + ui;
  Lanes low = Lanes{} + kInf;
  LaneIdx where = LaneIdx{}, base = LaneIdx{};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes, base += kLanes) {
    const Lanes r = (load64(row + k) - vu) - load64(v + k);
    const auto lower = r < low;  // one mask, two plain selects: GCC keeps this vectorised
    low = lower ? r : low;
    where = lower ? base : where;
  }
  double best = kInf;
  int64_t arg = -1;
  for (int64_t l = 0; l < kLanes; ++l)
    if (low[l] < best) { best = low[l]; arg = where[l] + l; }
  for (; k < len; ++k) {
    const double r = (row[k] - ui) - v[k];
    if (r < best) { best = r; arg = k; }
  }
  *at = arg;
  return best;
}

// The starting basis (see the top): arcs (arc_i, arc_j) with flows arc_x > 0, a forest.
SPECTRAL_EXT_ALWAYS_INLINE void crash(const Problem& P, Workspace& w) {
  const int64_t n = P.n, m = P.m;
  w.ra.assign(P.a, P.a + n);
  w.rb.assign(P.b, P.b + m);
  // v0: warm potentials, or the column minima (the cheapest column of a row is then
  // the one where it is cheapest relative to the other rows)
  std::vector<double>& shift = w.pot;  // borrowed: overwritten by the tree below
  shift.assign(m, kInf);
  if (P.v0 != nullptr) {
    std::copy(P.v0, P.v0 + m, shift.begin());
  } else {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) shift[j] = std::min(shift[j], P.M[i * m + j]);
  }
  w.alive.clear();
  for (int64_t j = 0; j < m; ++j)
    if (w.rb[j] > 0) w.alive.push_back(j);
  w.arc_i.clear(); w.arc_j.clear(); w.arc_x.clear();
  for (int64_t i = 0; i < n && !w.alive.empty(); ++i) {
    const double* row = P.M + i * m;
    while (w.ra[i] > 0 && !w.alive.empty()) {
      int64_t best = 0;
      double low = kInf;
      for (int64_t k = 0; k < static_cast<int64_t>(w.alive.size()); ++k) {
        const int64_t j = w.alive[k];
        const double r = row[j] - shift[j];
        if (r < low) { low = r; best = k; }
      }
      const int64_t j = w.alive[best];
      double x;
      if (w.ra[i] < w.rb[j]) {
        x = w.ra[i];
        w.rb[j] -= x;
        w.ra[i] = 0;
      } else {
        x = w.rb[j];
        w.ra[i] = w.ra[i] == x ? 0.0 : w.ra[i] - x;
        w.rb[j] = 0;
        w.alive[best] = w.alive.back();
        w.alive.pop_back();
      }
      w.arc_i.push_back(i); w.arc_j.push_back(j); w.arc_x.push_back(x);
    }
  }
}

// The spanning tree of the crash basis: each tree of the forest hung from the root by
// its first node, potentials set so that the forest's arcs have zero reduced cost.
SPECTRAL_EXT_ALWAYS_INLINE void build_tree(const Problem& P, Workspace& w) {
  const int64_t n = P.n, m = P.m, N = n + m, root = N;
  const int64_t arcs = static_cast<int64_t>(w.arc_i.size());
  w.adj_start.assign(N + 1, 0);
  for (int64_t k = 0; k < arcs; ++k) { ++w.adj_start[w.arc_i[k] + 1]; ++w.adj_start[n + w.arc_j[k] + 1]; }
  for (int64_t x = 0; x < N; ++x) w.adj_start[x + 1] += w.adj_start[x];
  w.adj_to.resize(2 * arcs);
  w.adj_flow.resize(2 * arcs);
  std::vector<int64_t>& fill = w.stack;
  fill.assign(w.adj_start.begin(), w.adj_start.end() - 1);
  for (int64_t k = 0; k < arcs; ++k) {
    const int64_t s = w.arc_i[k], t = n + w.arc_j[k];
    w.adj_to[fill[s]] = t; w.adj_flow[fill[s]++] = w.arc_x[k];
    w.adj_to[fill[t]] = s; w.adj_flow[fill[t]++] = w.arc_x[k];
  }
  w.parent.assign(N + 1, -1);
  w.child.assign(N + 1, -1);
  w.next.assign(N + 1, -1);
  w.prev.assign(N + 1, -1);
  w.size.assign(N + 1, 1);
  w.flow.assign(N + 1, 0.0);
  w.pot.assign(N, 0.0);
  w.stack.assign(N + 1, 0);
  w.path.assign(N + 1, 0);
  std::vector<int64_t> seen(N, 0);
  std::vector<int64_t> queue;
  queue.reserve(N);
  for (int64_t r = 0; r < N; ++r) {
    if (seen[r]) continue;
    seen[r] = 1;
    link(w, r, root);
    w.flow[r] = 0;
    // the representative's potential: its warm one, or 0
    if (r < n) w.pot[r] = P.u0 != nullptr ? P.u0[r] : 0.0;
    else w.pot[r] = P.v0 != nullptr ? P.v0[r - n] : 0.0;
    queue.assign(1, r);
    for (size_t h = 0; h < queue.size(); ++h) {
      const int64_t x = queue[h];
      for (int64_t k = w.adj_start[x]; k < w.adj_start[x + 1]; ++k) {
        const int64_t y = w.adj_to[k];
        if (seen[y]) continue;
        seen[y] = 1;
        link(w, y, x);
        w.flow[y] = w.adj_flow[k];
        // zero reduced cost on the arc: M_ij = u_i + v_j
        if (y < n) w.pot[y] = P.M[y * m + (x - n)] - w.pot[x];
        else w.pot[y] = P.M[x * m + (y - n)] - w.pot[x];
        queue.push_back(y);
      }
    }
    for (size_t h = queue.size(); h-- > 1;) w.size[w.parent[queue[h]]] += w.size[queue[h]];
    w.size[root] += w.size[r];
  }
}

// True when the arc between x and its parent points from x to the parent: x a
// source under a sink (arcs run source -> sink; the root's arcs leave the root).
SPECTRAL_EXT_ALWAYS_INLINE bool points_up(const Workspace& w, int64_t x, int64_t n, int64_t root) {
  return x < n && w.parent[x] != root;
}

struct Search {
  int64_t next_arc = 0, block = 10;
};

// The candidate arc (i, j) of reduced cost rc enters when rc is negative beyond rounding.
SPECTRAL_EXT_ALWAYS_INLINE bool enters(const Problem& P, const Workspace& w, int64_t i, int64_t j, double rc) {
  return i >= 0 && rc < -kEps * (std::fabs(P.M[i * P.m + j]) + std::fabs(w.pot[i]) + std::fabs(w.pot[P.n + j]));
}

// Block search for an entering arc; false when none has a negative reduced cost.
SPECTRAL_EXT_ALWAYS_INLINE bool find_entering(const Problem& P, const Workspace& w, Search& s, int64_t* in_i,
                                              int64_t* in_j, double* in_rc) {
  const int64_t n = P.n, m = P.m, total = n * m;
  const double* u = w.pot.data();
  const double* v = w.pot.data() + n;
  double best = 0;
  int64_t best_i = -1, best_j = -1;
  int64_t e = s.next_arc, scanned = 0, in_block = 0;
  while (scanned < total) {
    const int64_t i = e / m, j0 = e - i * m;
    const int64_t len = std::min({m - j0, s.block - in_block, total - scanned});
    int64_t at;
    const double low = segment_min(P.M + i * m + j0, u[i], v + j0, len, &at);
    if (low < best) { best = low; best_i = i; best_j = j0 + at; }
    e += len;
    if (e == total) e = 0;
    scanned += len;
    in_block += len;
    if (in_block == s.block) {
      in_block = 0;
      if (enters(P, w, best_i, best_j, best)) break;
    }
  }
  if (!enters(P, w, best_i, best_j, best)) return false;
  s.next_arc = e;
  *in_i = best_i; *in_j = best_j; *in_rc = best;
  return true;
}

// One pivot on the entering arc p -> q (p = i, q = n + j) of reduced cost rc < 0.
SPECTRAL_EXT_ALWAYS_INLINE bool pivot(const Problem& P, Workspace& w, int64_t p, int64_t q, double rc) {
  const int64_t n = P.n, root = P.n + P.m;
  int64_t x = p, y = q;
  while (x != y) {  // an ancestor's subtree is strictly larger
    if (w.size[x] < w.size[y]) x = w.parent[x]; else y = w.parent[y];
  }
  const int64_t join = x;
  // Ratio test, Cunningham's rule: along the cycle join -> ... -> p -> q -> ... -> join,
  // the last arc that blocks (ties: strict on p's side, not strict on q's).
  double delta = kInf;
  int64_t out = -1;
  bool out_on_p_side = false;
  for (x = p; x != join; x = w.parent[x])
    if (points_up(w, x, n, root) && w.flow[x] < delta) { delta = w.flow[x]; out = x; out_on_p_side = true; }
  for (x = q; x != join; x = w.parent[x])
    if (!points_up(w, x, n, root) && w.flow[x] <= delta) { delta = w.flow[x]; out = x; out_on_p_side = false; }
  if (out < 0) return false;  // unbounded: cannot happen with bounded costs
  delta = std::max(delta, 0.0);
  if (delta > 0) {
    for (x = p; x != join; x = w.parent[x]) {
      w.flow[x] += points_up(w, x, n, root) ? -delta : delta;
      if (w.flow[x] < 0) w.flow[x] = 0;
    }
    for (x = q; x != join; x = w.parent[x]) {
      w.flow[x] += points_up(w, x, n, root) ? delta : -delta;
      if (w.flow[x] < 0) w.flow[x] = 0;
    }
  }
  // The subtree S below the leaving arc hangs from the entering arc instead: sizes
  // along the two sides of the cycle, then the path from the entering arc's end in S
  // up to `out` reversed.
  const int64_t in_node = out_on_p_side ? p : q, out_node = out_on_p_side ? q : p;
  const int64_t moved = w.size[out];
  for (x = w.parent[out]; x != join; x = w.parent[x]) w.size[x] -= moved;
  for (x = out_node; x != join; x = w.parent[x]) w.size[x] += moved;
  int64_t* path = w.path.data();
  int64_t len = 0;
  for (x = in_node;; x = w.parent[x]) {
    path[len++] = x;
    if (x == out) break;
  }
  // new size of path[t] = old size(path[t]) - old size(path[t-1]) + new size(path[t+1])
  int64_t above = 0;
  for (int64_t t = len - 1; t >= 0; --t) {
    const int64_t old_size = w.size[path[t]];
    w.size[path[t]] = old_size - (t > 0 ? w.size[path[t - 1]] : 0) + above;
    above = w.size[path[t]];
  }
  int64_t new_parent = out_node;
  double new_flow = delta;
  for (int64_t t = 0; t < len; ++t) {
    const int64_t z = path[t];
    const double old_flow = w.flow[z];
    unlink(w, z);
    link(w, z, new_parent);
    w.flow[z] = new_flow;
    new_parent = z;
    new_flow = old_flow;
  }
  // Potentials: the entering arc's reduced cost becomes 0. Moving S by s (sources +s,
  // sinks -s), s = rc when S holds p, -rc when it holds q; or the rest by -s.
  const double s_src = out_on_p_side ? rc : -rc;
  const int64_t total = w.size[root];
  const bool shift_moved = 2 * moved <= total;
  const double shift = shift_moved ? s_src : -s_src;
  int64_t* st = w.stack.data();  // sized n + m + 1 by build_tree
  int64_t top = 0;
  st[top++] = shift_moved ? in_node : root;
  while (top > 0) {
    const int64_t z = st[--top];
    if (z < root) w.pot[z] += z < n ? shift : -shift;
    for (int64_t c = w.child[z]; c >= 0; c = w.next[c])
      if (shift_moved || c != in_node) st[top++] = c;
  }
  return true;
}

// Potentials recomputed along the tree (each tree of the forest from its root's child,
// whose potential sets its offset), so that every tree arc has reduced cost 0 to the
// rounding of one subtraction, then centred (sources -c, sinks +c: the same reduced
// costs). Pivots shift potentials by entering reduced costs as large as the largest
// cost, and their rounding builds up: on costs spanning 1e-8..1e8 tree arcs drifted to
// reduced costs of 3.5e-10 against an optimum of 2.7e-8.
SPECTRAL_EXT_ALWAYS_INLINE void refresh_potentials(const Problem& P, Workspace& w) {
  const int64_t n = P.n, m = P.m, root = n + m;
  int64_t* st = w.stack.data();
  int64_t top = 0;
  for (int64_t c = w.child[root]; c >= 0; c = w.next[c]) st[top++] = c;
  while (top > 0) {
    const int64_t z = st[--top], x = w.parent[z];
    if (x != root) w.pot[z] = (z < n ? P.M[z * m + (x - n)] : P.M[x * m + (z - n)]) - w.pot[x];
    for (int64_t c = w.child[z]; c >= 0; c = w.next[c]) st[top++] = c;
  }
  double sum_u = 0, sum_v = 0;
  for (int64_t i = 0; i < n; ++i) sum_u += w.pot[i];
  for (int64_t j = 0; j < m; ++j) sum_v += w.pot[n + j];
  const double c = 0.5 * (sum_u / n - sum_v / m);
  for (int64_t i = 0; i < n; ++i) w.pot[i] -= c;
  for (int64_t j = 0; j < m; ++j) w.pot[n + j] += c;
}

struct Solution {
  int64_t result = kOptimal;
  int64_t pivots = 0;
};

// Solves P; writes the plan (n x m, zeroed by the caller), u (n), v (m) and the cost.
template <typename T>
SPECTRAL_EXT_ALWAYS_INLINE void solve_impl(const Problem& P, Workspace* ws, int64_t max_iter, InterruptPoll* poll,
                                           double* plan, double* u, double* v, double* cost, Solution* out) {
  Workspace& w = *ws;
  const int64_t n = P.n, m = P.m;
  crash(P, w);
  build_tree(P, w);
  Search s;
  s.block = std::max<int64_t>(static_cast<int64_t>(std::sqrt(static_cast<double>(n * m))), 10);
  out->result = kOptimal;
  out->pivots = 0;
  int64_t i, j;
  double rc;
  // Optimal when no arc prices negative on potentials just recomputed from the tree; they
  // are also recomputed every 4 (n + m) pivots (O(n + m) each: amortised O(1) a pivot).
  bool fresh = false;
  for (;;) {
    if (!find_entering(P, w, s, &i, &j, &rc)) {
      if (fresh) break;
      refresh_potentials(P, w);
      fresh = true;
      continue;
    }
    if (max_iter > 0 && out->pivots >= max_iter) { out->result = kMaxIterReached; break; }
    if ((out->pivots & 1023) == 1023 && poll->interrupted()) return;
    if (!pivot(P, w, i, n + j, rc)) { out->result = kUnbounded; break; }
    fresh = false;
    if (++out->pivots % (4 * (n + m)) == 0) refresh_potentials(P, w);
  }
  for (int64_t x = 0; x < n + m; ++x) {
    const int64_t p = w.parent[x];
    if (p == n + m || w.flow[x] == 0) continue;
    const int64_t src = x < n ? x : p, snk = x < n ? p - n : x - n;
    plan[src * m + snk] = w.flow[x];
  }
  double total = 0;
  for (int64_t k = 0; k < n * m; ++k)
    if (plan[k] != 0) total += plan[k] * P.M[k];
  *cost = total;
  std::copy(w.pot.begin(), w.pot.begin() + n, u);
  std::copy(w.pot.begin() + n, w.pot.begin() + n + m, v);
}
SPECTRAL_EXT_ISA_CLONES(solve_one, solve_impl)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> network_simplex_cpu(
    const at::Tensor& M_, const at::Tensor& a_, const at::Tensor& b_, int64_t max_iter,
    const std::optional<at::Tensor>& u0_, const std::optional<at::Tensor>& v0_) {
  TORCH_CHECK(M_.dim() == 3, "network_simplex: M must be (B, n, m), got ", M_.sizes());
  const int64_t B = M_.size(0), n = M_.size(1), m = M_.size(2);
  TORCH_CHECK(a_.dim() == 2 && a_.size(0) == B && a_.size(1) == n, "network_simplex: a must be (B, n), got ",
              a_.sizes());
  TORCH_CHECK(b_.dim() == 2 && b_.size(0) == B && b_.size(1) == m, "network_simplex: b must be (B, m), got ",
              b_.sizes());
  TORCH_CHECK(u0_.has_value() == v0_.has_value(), "network_simplex: give both warm potentials or neither");
  const auto M = M_.to(at::kDouble).contiguous(), a = a_.to(at::kDouble).contiguous(),
             b = b_.to(at::kDouble).contiguous();
  at::Tensor u0, v0;
  if (u0_.has_value()) {
    u0 = u0_->to(at::kDouble).contiguous();
    v0 = v0_->to(at::kDouble).contiguous();
    TORCH_CHECK(u0.dim() == 2 && u0.size(0) == B && u0.size(1) == n && v0.dim() == 2 && v0.size(0) == B &&
                    v0.size(1) == m,
                "network_simplex: warm potentials must be (B, n) and (B, m)");
  }
  auto opts = M.options();
  auto plan = at::zeros({B, n, m}, opts), u = at::zeros({B, n}, opts), v = at::zeros({B, m}, opts);
  auto cost = at::zeros({B}, opts);
  auto result = at::full({B}, static_cast<int64_t>(kOptimal), opts.dtype(at::kLong));
  auto pivots = at::zeros({B}, opts.dtype(at::kLong));
  if (B == 0 || n == 0 || m == 0) return {plan, u, v, cost, result, pivots};
  const double* Mp = M.data_ptr<double>();
  const double* ap = a.data_ptr<double>();
  const double* bp = b.data_ptr<double>();
  const double* u0p = u0.defined() ? u0.data_ptr<double>() : nullptr;
  const double* v0p = v0.defined() ? v0.data_ptr<double>() : nullptr;
  double* planp = plan.data_ptr<double>();
  double* up = u.data_ptr<double>();
  double* vp = v.data_ptr<double>();
  double* costp = cost.data_ptr<double>();
  int64_t* resultp = result.data_ptr<int64_t>();
  int64_t* pivotsp = pivots.data_ptr<int64_t>();
  InterruptPoll poll;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Workspace w;
    std::vector<double> sub_plan, sub_u, sub_v;
    for (int64_t k = begin; k < end && !poll.interrupted(); ++k) {
      const double* Mk = Mp + k * n * m;
      const double* ak = ap + k * n;
      const double* bk = bp + k * m;
      w.rows.clear();
      w.cols.clear();
      for (int64_t i = 0; i < n; ++i)
        if (ak[i] != 0) w.rows.push_back(i);
      for (int64_t j = 0; j < m; ++j)
        if (bk[j] != 0) w.cols.push_back(j);
      const int64_t nr = static_cast<int64_t>(w.rows.size()), nc = static_cast<int64_t>(w.cols.size());
      Solution sol;
      if (nr == n && nc == m) {
        const Problem P{n, m, Mk, ak, bk, u0p ? u0p + k * n : nullptr, v0p ? v0p + k * m : nullptr};
        solve_one<double>(P, &w, max_iter, &poll, planp + k * n * m, up + k * n, vp + k * m, costp + k, &sol);
      } else if (nr > 0 && nc > 0) {  // zero masses: the problem on the others (potentials 0 elsewhere)
        w.M.resize(nr * nc);
        w.a.resize(nr);
        w.b.resize(nc);
        for (int64_t r = 0; r < nr; ++r) {
          w.a[r] = ak[w.rows[r]];
          for (int64_t c = 0; c < nc; ++c) w.M[r * nc + c] = Mk[w.rows[r] * m + w.cols[c]];
        }
        for (int64_t c = 0; c < nc; ++c) w.b[c] = bk[w.cols[c]];
        if (u0p) {
          w.u0.resize(nr);
          w.v0.resize(nc);
          for (int64_t r = 0; r < nr; ++r) w.u0[r] = u0p[k * n + w.rows[r]];
          for (int64_t c = 0; c < nc; ++c) w.v0[c] = v0p[k * m + w.cols[c]];
        }
        const Problem P{nr, nc, w.M.data(), w.a.data(), w.b.data(), u0p ? w.u0.data() : nullptr,
                        v0p ? w.v0.data() : nullptr};
        sub_plan.assign(nr * nc, 0.0);
        sub_u.assign(nr, 0.0);
        sub_v.assign(nc, 0.0);
        solve_one<double>(P, &w, max_iter, &poll, sub_plan.data(), sub_u.data(), sub_v.data(), costp + k, &sol);
        for (int64_t r = 0; r < nr; ++r) {
          up[k * n + w.rows[r]] = sub_u[r];
          for (int64_t c = 0; c < nc; ++c) planp[k * n * m + w.rows[r] * m + w.cols[c]] = sub_plan[r * nc + c];
        }
        for (int64_t c = 0; c < nc; ++c) vp[k * m + w.cols[c]] = sub_v[c];
      }
      resultp[k] = sol.result;
      pivotsp[k] = sol.pivots;
    }
  });
  poll.throw_if_interrupted();
  return {plan, u, v, cost, result, pivots};
}

}  // namespace

// Declared here rather than in csrc/ops.cpp: one kernel, CPU only, used by
// spectral_ext.compat.pot (emd, emd2).
// M (B, n, m), a (B, n), b (B, m) float64 with a_k.sum() == b_k.sum(); max_iter <= 0: no
// limit; u0 (B, n), v0 (B, m): warm-start potentials -> plan (B, n, m), u (B, n), v (B, m),
// cost (B,), result (B,) int64 (POT's codes: 1 optimal, 3 max_iter reached), pivots (B,) int64.
TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) {
  m.impl("network_simplex", &network_simplex_cpu);
}

}  // namespace spectral_ext
