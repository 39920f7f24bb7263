// The one way the kernels call ATen: by name through the stable dispatcher (torch_call_dispatcher),
// so the library binds to no ATen symbol and loads in every torch from 2.10 on. Only GEMMs go this
// way; elementwise work is plain loops in the kernels (a dispatcher call costs microseconds, a fused
// loop over the same data costs nothing extra).
#pragma once
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/version.h>

#include <array>
#include <optional>

namespace gsa {

using torch::stable::Tensor;

// Calls aten::<name>.<overload> on a stack that holds every argument of its schema, in order; returns
// the first output.
template <size_t N>
inline Tensor call_aten(const char* name, const char* overload, std::array<StableIValue, N> stack) {
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// a @ b for 2-D a, b (any strides: transposed views reach BLAS as a transpose flag, not a copy).
inline Tensor mm(const Tensor& a, const Tensor& b) {
  using torch::stable::detail::from;
  return call_aten<2>("aten::mm", "", {from(a), from(b)});
}

// out = a @ b into an existing out of the right shape (no allocation per call).
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  using torch::stable::detail::from;
  call_aten<3>("aten::mm", "out", {from(a), from(b), from(out)});
}

// out += a @ w^T for 2-D a [B, k], w [n, k], out [B, n], accumulated inside the GEMM (BLAS beta = 1):
// aten::linear.out with out as its own bias takes ATen's addmm path with self == out, so nothing is
// copied and no separate pass adds the product. (aten::addmm itself would need Scalar arguments.)
inline void linear_accumulate(const Tensor& out, const Tensor& a, const Tensor& w) {
  using torch::stable::detail::from;
  call_aten<4>("aten::linear", "out", {from(a), from(w), from(std::optional<Tensor>(out)), from(out)});
}

}  // namespace gsa
