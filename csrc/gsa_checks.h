// Argument checks shared by the CPU kernels. Every message names the argument, so a bad call
// from torch.ops.gsa.* (bypassing the Python wrappers) still says what is wrong.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace gsa {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_type(t.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

// Value checks read the data, so they only run on CPU tensors (no host sync on a GPU).
inline void check_finite_nonneg(const at::Tensor& t, const char* name) {
  if (!t.device().is_cpu() || t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " has non-finite values");
  TORCH_CHECK((t >= 0).all().item<bool>(), name, " has negative values (variances must be >= 0)");
}

inline void check_sigma(const at::Tensor& sigma, int64_t batch, const at::Tensor& x, const char* name,
                        bool allow_zero) {
  check_float(sigma, name);
  check_same_device(sigma, x, name);
  TORCH_CHECK(sigma.dim() == 0 || (sigma.dim() == 1 && (sigma.size(0) == batch || sigma.size(0) == 1)),
              name, " must be a scalar or have shape [B] = [", batch, "], got ", sigma.sizes());
  if (!sigma.device().is_cpu() || sigma.numel() == 0) return;
  TORCH_CHECK(at::isfinite(sigma).all().item<bool>(), name, " has non-finite values");
  if (allow_zero) {
    TORCH_CHECK((sigma >= 0).all().item<bool>(), name, " must be >= 0");
  } else {
    TORCH_CHECK((sigma > 0).all().item<bool>(), name, " must be > 0");
  }
}

// float64 if anything is float64, else float32 (half inputs accumulate in float32).
inline at::ScalarType compute_dtype(std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts) {
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

}  // namespace gsa
