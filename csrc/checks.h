// Argument checks shared by the CPU and CUDA kernels of each operator. The
// Python wrappers validate more thoroughly (finite values, names the user
// knows); these guard direct calls through torch.ops.
#pragma once
#include <ATen/ATen.h>
#include <array>
#include <optional>

namespace spectral_ext {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              name, " must be float32 or float64, got ", t.scalar_type());
}

inline void check_conv_adjacency(const at::Tensor& U, const at::Tensor& V) {
  TORCH_CHECK(U.dim() == 3, "conv_adjacency: U must be (B, c, M), got ", U.sizes());
  TORCH_CHECK(V.dim() == 4, "conv_adjacency: V must be (B, c, K2, N), got ", V.sizes());
  check_float(U, "conv_adjacency: U");
  TORCH_CHECK(V.scalar_type() == U.scalar_type(), "conv_adjacency: U and V must share a dtype");
  TORCH_CHECK(U.device() == V.device(), "conv_adjacency: U and V must be on one device");
  TORCH_CHECK(V.size(0) == U.size(0) && V.size(1) == U.size(1),
              "conv_adjacency: U (B, c, M) and V (B, c, K2, N) disagree on B or c: ", U.sizes(),
              " vs ", V.sizes());
}

struct ConvGeometry {
  int64_t B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, r;
};

inline std::array<int64_t, 2> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, "signal_projection: ", name,
              " must have one or two entries, got ", v.size());
  return {v[0], v[v.size() - 1]};
}

inline ConvGeometry check_signal_projection(const at::Tensor& x, const at::Tensor& V,
                                            const at::Tensor& s, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation,
                                            at::OptionalIntArrayRef kernel_size) {
  TORCH_CHECK(x.dim() == 4, "signal_projection: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(V.dim() == 2, "signal_projection: V must be (C*kh*kw, r), got ", V.sizes());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == V.size(1),
              "signal_projection: s must be (r,) with r = V.size(1) = ", V.size(1), ", got ",
              s.sizes());
  check_float(x, "signal_projection: x");
  TORCH_CHECK(V.scalar_type() == x.scalar_type() && s.scalar_type() == x.scalar_type(),
              "signal_projection: x, V and s must share a dtype");
  TORCH_CHECK(V.device() == x.device() && s.device() == x.device(),
              "signal_projection: x, V and s must be on one device");
  ConvGeometry g{};
  g.B = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3); g.r = V.size(1);
  TORCH_CHECK(g.C > 0 && V.size(0) % g.C == 0, "signal_projection: V.size(0) = ", V.size(0),
              " is not a multiple of the channel count C = ", g.C);
  const int64_t k2 = V.size(0) / g.C;
  if (kernel_size.has_value()) {
    auto k = pair_arg(*kernel_size, "kernel_size");
    g.kh = k[0]; g.kw = k[1];
  } else {
    int64_t k = 1;
    while (k * k < k2) ++k;
    TORCH_CHECK(k * k == k2, "signal_projection: V.size(0) / C = ", k2,
                " is not a square kernel area; pass kernel_size");
    g.kh = g.kw = k;
  }
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && g.kh * g.kw == k2, "signal_projection: kernel_size ",
              g.kh, "x", g.kw, " does not match V.size(0) / C = ", k2);
  auto st = pair_arg(stride, "stride"), pd = pair_arg(padding, "padding"),
       dl = pair_arg(dilation, "dilation");
  g.sh = st[0]; g.sw = st[1]; g.ph = pd[0]; g.pw = pd[1]; g.dh = dl[0]; g.dw = dl[1];
  TORCH_CHECK(g.sh > 0 && g.sw > 0, "signal_projection: stride must be positive");
  TORCH_CHECK(g.dh > 0 && g.dw > 0, "signal_projection: dilation must be positive");
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0, "signal_projection: padding must be non-negative");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1 >= 0 &&
                  g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1 >= 0,
              "signal_projection: the kernel does not fit the padded input");
  return g;
}

inline bool reduce_is_mean(std::optional<c10::string_view> reduce) {
  if (!reduce.has_value()) return false;
  TORCH_CHECK(*reduce == "mean", "signal_projection: reduce must be None or \"mean\", got \"",
              std::string(reduce->data(), reduce->size()), "\"");
  return true;
}

inline void check_sinkhorn(const at::Tensor& P, int64_t iters) {
  TORCH_CHECK(P.dim() == 3, "sinkhorn: P must be (B, n, m), got ", P.sizes());
  check_float(P, "sinkhorn: P");
  TORCH_CHECK(iters >= 0, "sinkhorn: iters must be non-negative, got ", iters);
}

inline int64_t sinkhorn_checks(int64_t iters, int64_t check_every) {
  return iters == 0 ? 0 : (iters - 1) / check_every + 1;
}

inline void check_sinkhorn_scaling(const at::Tensor& K, const at::Tensor& a, const at::Tensor& b,
                                   int64_t iters, int64_t check_every) {
  TORCH_CHECK(K.dim() == 3, "sinkhorn_scaling: K must be (B, n, m), got ", K.sizes());
  check_float(K, "sinkhorn_scaling: K");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == K.size(0) && a.size(1) == K.size(1),
              "sinkhorn_scaling: a must be (B, n) for K ", K.sizes(), ", got ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == K.size(0) && b.size(1) == K.size(2),
              "sinkhorn_scaling: b must be (B, m) for K ", K.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == K.scalar_type() && b.scalar_type() == K.scalar_type(),
              "sinkhorn_scaling: K, a and b must share a dtype");
  TORCH_CHECK(a.device() == K.device() && b.device() == K.device(),
              "sinkhorn_scaling: K, a and b must be on one device");
  TORCH_CHECK(iters >= 0, "sinkhorn_scaling: iters must be non-negative, got ", iters);
  TORCH_CHECK(check_every > 0, "sinkhorn_scaling: check_every must be positive, got ", check_every);
}

inline void check_max_kernel_gram(const at::Tensor& X, const at::Tensor& Y) {
  TORCH_CHECK(X.dim() == 3, "max_kernel_gram: X must be (N, C, S), got ", X.sizes());
  TORCH_CHECK(Y.dim() == 3, "max_kernel_gram: Y must be (N', C, S), got ", Y.sizes());
  check_float(X, "max_kernel_gram: X");
  TORCH_CHECK(Y.scalar_type() == X.scalar_type(), "max_kernel_gram: X and Y must share a dtype");
  TORCH_CHECK(Y.device() == X.device(), "max_kernel_gram: X and Y must be on one device");
  TORCH_CHECK(X.size(1) == Y.size(1) && X.size(2) == Y.size(2),
              "max_kernel_gram: X (N, C, S) and Y (N', C, S) disagree on C or S: ", X.sizes(),
              " vs ", Y.sizes());
  TORCH_CHECK(X.size(1) > 0, "max_kernel_gram: C must be positive (a max over no channels)");
}

// Range [lo, hi) of q in [0, n) with 0 <= q*step + offset < limit: the output
// positions whose receptive field reads a real (not padded) input at this tap.
C10_HOST_DEVICE inline void valid_range(int64_t offset, int64_t step, int64_t n, int64_t limit,
                                        int64_t* lo, int64_t* hi) {
  int64_t l = offset >= 0 ? 0 : (-offset + step - 1) / step;
  int64_t h = offset > limit - 1 ? 0 : (limit - 1 - offset) / step + 1;
  if (h > n) h = n;
  if (l > h) l = h;
  *lo = l;
  *hi = h;
}

}  // namespace spectral_ext
