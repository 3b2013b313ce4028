#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace spectral_ext {
namespace {

// The mean over output positions of the receptive field at tap (c, i, j) is a
// sum of x[c] over the rows hit by tap i and the columns hit by tap j. One pass
// over each plane gives the per-row column-window sums (H x kw), a second small
// pass sums them over the tap rows: R (B, C*kh*kw) without unfolding x.
template <typename scalar_t>
void mean_receptive_fields(const scalar_t* x, scalar_t* R, const ConvGeometry& g) {
  using acc_t = at::acc_type<scalar_t, false>;
  const acc_t inv_positions = acc_t(1) / acc_t(g.Ho * g.Wo);
  at::parallel_for(0, g.B * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> colsum(g.H * g.kw);
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* xp = x + plane * g.H * g.W;
      for (int64_t j = 0; j < g.kw; ++j) {
        int64_t lo, hi;
        const int64_t offset = j * g.dw - g.pw;
        valid_range(offset, g.sw, g.Wo, g.W, &lo, &hi);
        for (int64_t h = 0; h < g.H; ++h) {
          const scalar_t* row = xp + h * g.W;
          acc_t s = 0;
          for (int64_t q = lo; q < hi; ++q) s += acc_t(row[offset + q * g.sw]);
          colsum[h * g.kw + j] = s;
        }
      }
      scalar_t* dst = R + plane * g.kh * g.kw;
      for (int64_t i = 0; i < g.kh; ++i) {
        int64_t lo, hi;
        const int64_t offset = i * g.dh - g.ph;
        valid_range(offset, g.sh, g.Ho, g.H, &lo, &hi);
        for (int64_t j = 0; j < g.kw; ++j) {
          acc_t s = 0;
          for (int64_t q = lo; q < hi; ++q) s += colsum[(q * g.sh + offset) * g.kw + j];
          dst[i * g.kw + j] = scalar_t(s * inv_positions);
        }
      }
    }
  });
}

at::Tensor signal_projection_cpu(const at::Tensor& x, const at::Tensor& V, const at::Tensor& s,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, std::optional<c10::string_view> reduce,
                                 at::OptionalIntArrayRef kernel_size) {
  const auto g = check_signal_projection(x, V, s, stride, padding, dilation, kernel_size);
  const auto scaled = V * s;  // (C*kh*kw, r): column i is s_i v_i
  if (reduce_is_mean(reduce)) {
    auto R = at::empty({g.B, g.C * g.kh * g.kw}, x.options());
    if (R.numel() > 0) {
      const auto xc = x.contiguous();
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "signal_projection_mean_cpu", [&] {
        mean_receptive_fields(xc.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), g);
      });
    }
    return at::mm(R, scaled);
  }
  // Per position the projection is exactly a convolution with filters
  // (V diag(s))^T; oneDNN's direct convolution is the fastest way to run it here.
  const auto weight = scaled.t().contiguous().view({g.r, g.C, g.kh, g.kw});
  return at::conv2d(x, weight, {}, {g.sh, g.sw}, {g.ph, g.pw}, {g.dh, g.dw});
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CPU, m) { m.impl("signal_projection", &signal_projection_cpu); }

}  // namespace spectral_ext
