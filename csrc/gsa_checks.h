// Argument checks shared by the CPU kernels. Every message names the argument, so a bad call
// from torch.ops.gsa.* (bypassing the Python wrappers) still says what is wrong.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cmath>

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

// Value checks read the data, so they only run on CPU tensors (no host sync on a GPU). A plain loop
// with early exit: these tensors are small (eigenvalues, sigmas) and ATen reductions would cost more
// than the op itself at B = 1.
enum class Bound { Any, NonNegative, Positive };

// Returns {all finite, all within bound}.
inline std::pair<bool, bool> scan_values(const at::Tensor& t, Bound bound) {
  bool finite = true, in_range = true;
  const auto c = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "gsa_scan_values", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = c.numel(); i < n; ++i) {
      const double v = static_cast<double>(p[i]);
      if (!std::isfinite(v)) {
        finite = false;
        break;
      }
      if ((bound == Bound::NonNegative && v < 0) || (bound == Bound::Positive && v <= 0)) in_range = false;
    }
  });
  return {finite, in_range};
}

inline void check_finite_nonneg(const at::Tensor& t, const char* name) {
  if (!t.device().is_cpu() || t.numel() == 0) return;
  const auto [finite, nonneg] = scan_values(t, Bound::NonNegative);
  TORCH_CHECK(finite, name, " has non-finite values");
  TORCH_CHECK(nonneg, name, " has negative values (variances must be >= 0)");
}

inline void check_sigma(const at::Tensor& sigma, int64_t batch, const at::Tensor& x, const char* name,
                        bool allow_zero) {
  check_float(sigma, name);
  check_same_device(sigma, x, name);
  TORCH_CHECK(sigma.dim() == 0 || (sigma.dim() == 1 && (sigma.size(0) == batch || sigma.size(0) == 1)),
              name, " must be a scalar or have shape [B] = [", batch, "], got ", sigma.sizes());
  if (!sigma.device().is_cpu() || sigma.numel() == 0) return;
  const auto [finite, in_range] = scan_values(sigma, allow_zero ? Bound::NonNegative : Bound::Positive);
  TORCH_CHECK(finite, name, " has non-finite values");
  TORCH_CHECK(in_range, name, allow_zero ? " must be >= 0" : " must be > 0");
}

// float64 if anything is float64, else float32 (half inputs accumulate in float32).
inline at::ScalarType compute_dtype(std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts) {
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

}  // namespace gsa
