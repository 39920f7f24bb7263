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

#include <algorithm>
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

// An uninitialized dense tensor of the given sizes and dtype on like's device, straight from the
// allocator (aoti_torch_empty_strided, a shim function: no dispatcher round trip). aten::empty through
// the dispatcher costs about a microsecond per call, which is visible at B = 1.
template <size_t N>
inline Tensor dense_empty(const int64_t (&sizes)[N], torch::headeronly::ScalarType dtype, const Tensor& like) {
  std::array<int64_t, N> strides{};
  int64_t stride = 1;
  for (size_t i = N; i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(sizes[i], 1);
  }
  int32_t device_type, device_index;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  const auto aoti_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle handle;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(N), sizes, strides.data(), aoti_dtype,
                                                         device_type, device_index, &handle));
  return Tensor(handle);
}

}  // namespace gsa
