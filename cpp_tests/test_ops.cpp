// Calls each operator through the dispatcher on the CPU and compares it with
// the same quantity written in ATen, in float64. Exit code 0 means all passed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <optional>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want) {
  const bool ok = got.sizes() == want.sizes() && at::allclose(got, want, 1e-11, 1e-11);
  std::cout << (ok ? "ok    " : "FAIL  ") << what << "\n";
  if (!ok) {
    ++failures;
    std::cout << "  got sizes " << got.sizes() << ", want " << want.sizes() << "\n";
  }
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);

  {
    const auto U = at::randn({3, 5, 7}, f64), V = at::randn({3, 5, 4, 6}, f64);
    const auto got = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("spectral_ext::conv_adjacency")
                         .call(U, V);
    expect_close("conv_adjacency", got, at::einsum("bkm,bkzn->bznm", {U, V}).square().sum(1));
  }
  {
    const auto x = at::randn({2, 3, 9, 8}, f64), V = at::randn({27, 5}, f64), s = at::rand({5}, f64);
    const auto weight = (V * s).t().contiguous().view({5, 3, 3, 3});
    const auto want = at::conv2d(x, weight, {}, {2, 2}, {1, 1}, {1, 1});
    auto projection = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                    at::IntArrayRef, at::IntArrayRef, std::optional<c10::string_view>,
                                    at::OptionalIntArrayRef)>("spectral_ext::signal_projection");
    expect_close("signal_projection per position",
                 projection.call(x, V, s, {2, 2}, {1, 1}, {1, 1}, std::nullopt, std::nullopt), want);
    expect_close("signal_projection mean",
                 projection.call(x, V, s, {2, 2}, {1, 1}, {1, 1}, c10::string_view("mean"), std::nullopt),
                 want.mean({2, 3}));
  }
  {
    const auto P = at::rand({4, 6, 5}, f64) + 0.1;
    auto want = P;
    for (int it = 0; it < 16; ++it) {
      want = want / want.sum(-2, true);
      want = want / want.sum(-1, true);
    }
    expect_close("sinkhorn", op<at::Tensor(const at::Tensor&, int64_t)>("spectral_ext::sinkhorn").call(P, 16),
                 want);
  }
  {
    const auto X = at::randn({37, 5, 3}, f64), Y = at::randn({20, 5, 3}, f64);
    auto gram = op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>("spectral_ext::max_kernel_gram");
    expect_close("max_kernel_gram cross", gram.call(X, Y), at::einsum("ics,jcs->ijc", {X, Y}).amax(-1));
    expect_close("max_kernel_gram self", gram.call(X, std::nullopt), at::einsum("ics,jcs->ijc", {X, X}).amax(-1));
  }
  {
    // With a = b = 1 the marginal form is the paper's form.
    const auto P = at::rand({3, 5, 7}, f64) + 0.1;
    auto scaling = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, int64_t, bool)>(
        "spectral_ext::sinkhorn_scaling");
    const auto plan = std::get<0>(scaling.call(P, at::ones({3, 5}, f64), at::ones({3, 7}, f64), 9, 0.0, 10, false));
    expect_close("sinkhorn_scaling", plan,
                 op<at::Tensor(const at::Tensor&, int64_t)>("spectral_ext::sinkhorn").call(P, 9));
  }
  {
    // A permuted diagonal of zeros in a matrix of ones: the assignment recovers the permutation.
    auto cost = at::ones({1, 4, 4}, f64);
    const int64_t perm[4] = {2, 0, 3, 1};
    for (int64_t i = 0; i < 4; ++i) cost[0][i][perm[i]] = 0.0;
    auto lsa = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool)>("spectral_ext::linear_sum_assignment");
    const auto cols = std::get<1>(lsa.call(cost, false));
    expect_close("linear_sum_assignment", cols.to(at::kDouble),
                 at::tensor({2.0, 0.0, 3.0, 1.0}, f64).view({1, 4}));
  }
  std::cout << (failures == 0 ? "all operators passed" : "some operators FAILED") << "\n";
  return failures == 0 ? 0 : 1;
}
