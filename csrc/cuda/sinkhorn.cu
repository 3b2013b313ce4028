#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace spectral_ext {
namespace {

constexpr int kBlock = 256;
constexpr size_t kSharedLimit = 48 * 1024;

// One block per matrix. The iterate stays diag(r) P diag(c), so a round is two
// matrix-vector products with P (read coalesced, from L2 after the first
// round): c = 1 / (P^T r) with a thread per column, then r = 1 / (P c) with a
// warp per row. r and c live in shared memory when they fit, else in a global
// workspace; P is written once, scaled, at the end.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    sinkhorn_kernel(const scalar_t* __restrict__ P, scalar_t* __restrict__ out,
                    at::acc_type<scalar_t, true>* workspace, int64_t B, int64_t n, int64_t m,
                    int64_t iters, bool use_shared) {
  using acc_t = at::acc_type<scalar_t, true>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];  // holds acc_t (double) scales
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t* r = use_shared ? reinterpret_cast<acc_t*>(shared_bytes) : workspace + b * (n + m);
    acc_t* c = r + n;
    const scalar_t* Pb = P + b * n * m;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) r[i] = acc_t(1);
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) c[j] = acc_t(1);
    __syncthreads();
    for (int64_t it = 0; it < iters; ++it) {
      for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
        acc_t s = 0;
        for (int64_t i = 0; i < n; ++i) s += r[i] * acc_t(Pb[i * m + j]);
        c[j] = acc_t(1) / s;
      }
      __syncthreads();
      for (int64_t i = warp; i < n; i += warps) {
        acc_t s = 0;
        for (int64_t j = lane; j < m; j += 32) s += acc_t(Pb[i * m + j]) * c[j];
        for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
        if (lane == 0) r[i] = acc_t(1) / s;
      }
      __syncthreads();
    }
    scalar_t* ob = out + b * n * m;
    for (int64_t e = threadIdx.x; e < n * m; e += blockDim.x)
      ob[e] = scalar_t(r[e / m] * acc_t(Pb[e]) * c[e % m]);
    __syncthreads();  // r and c are reused by this block's next matrix
  }
}

at::Tensor sinkhorn_cuda(const at::Tensor& P, int64_t iters) {
  check_sinkhorn(P, iters);
  const c10::cuda::CUDAGuard guard(P.device());
  const auto Pc = P.contiguous();
  auto out = at::empty_like(Pc);
  const int64_t B = P.size(0), n = P.size(1), m = P.size(2);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "sinkhorn_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const size_t scale_bytes = size_t(n + m) * sizeof(acc_t);
    const bool use_shared = scale_bytes <= kSharedLimit;
    at::Tensor workspace;
    if (!use_shared)
      workspace = at::empty({B * (n + m)}, P.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const int grid = static_cast<int>(std::min<int64_t>(B, 65535));
    sinkhorn_kernel<scalar_t><<<grid, kBlock, use_shared ? scale_bytes : 0,
                                c10::cuda::getCurrentCUDAStream()>>>(
        Pc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        use_shared ? nullptr : workspace.data_ptr<acc_t>(), B, n, m, iters, use_shared);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spectral_ext, CUDA, m) { m.impl("sinkhorn", &sinkhorn_cuda); }

}  // namespace spectral_ext
