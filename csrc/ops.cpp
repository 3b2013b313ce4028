// The one place where every operator schema is declared. Kernels register per
// device in cpu/<op>.cpp and cuda/<op>.cu; fake kernels and autograd are
// registered from Python (spectral_ext/_ops/<op>_op.py); the plain-PyTorch definitions
// live in spectral_ext/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(spectral_ext, m) {
  // U (B, c, M), V (B, c, K2, N) -> (B, N, M):
  // a[n, m] = sum_z (sum_k U[k, m] V[k, z, n])^2
  m.def("conv_adjacency(Tensor U, Tensor V) -> Tensor");
  // x (B, C, H, W), V (C*kh*kw, r), s (r,) -> (B, r, H', W'), or (B, r) when reduce="mean"
  m.def(
      "signal_projection(Tensor x, Tensor V, Tensor s, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, str? reduce=None, int[2]? kernel_size=None) -> Tensor");
  // `iters` rounds of: divide each column by its sum, then each row by its sum
  m.def("sinkhorn(Tensor P, int iters=16) -> Tensor");
  // Sinkhorn-Knopp with marginals a (B, n), b (B, m) on a kernel K (B, n, m) (log K
  // when log_domain): -> plan (B, n, m), log u (B, n), log v (B, m), rounds done (B,)
  // int64, and ||plan^T 1 - b|| after rounds 0, check_every, ... (B, checks), NaN
  // past the stop. stop_threshold > 0 stops a problem at the first check below it.
  // CPU kernel only (CUDA runs the plain-PyTorch twin from the Python wrapper).
  m.def(
      "sinkhorn_scaling(Tensor K, Tensor a, Tensor b, int iters, float stop_threshold=0., "
      "int check_every=10, bool log_domain=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // X (N, C, S), Y (N', C, S) -> (N, N'): K[i, j] = max_c sum_s X[i, c, s] Y[j, c, s]
  m.def("max_kernel_gram(Tensor X, Tensor? Y=None) -> Tensor");
  // cost (B, n, m) -> rows, cols (B, min(n, m)) int64: the optimal assignment of each
  // problem, scipy.optimize.linear_sum_assignment's answer (CPU kernel only)
  m.def("linear_sum_assignment(Tensor cost, bool maximize=False) -> (Tensor, Tensor)");
  // Exact optimal transport of each problem by the network simplex (CPU kernel only):
  // M (B, n, m), a (B, n), b (B, m) float64 with equal masses; max_iter <= 0: no limit;
  // u0, v0: warm-start potentials -> plan (B, n, m), u (B, n), v (B, m), cost (B,),
  // result (B,) int64 (1 optimal, 3 max_iter reached), pivots (B,) int64
  m.def(
      "network_simplex(Tensor M, Tensor a, Tensor b, int max_iter=100000, Tensor? u0=None, Tensor? v0=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
