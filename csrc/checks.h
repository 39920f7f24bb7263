// The one validator of raw op inputs (torch.ops.gsa.* called directly, bypassing the Python wrappers):
// shape, dtype, device, and value scans of small CPU tensors. Every message names the argument.
// Also the small tensor helpers the kernels share (float dtype dispatch, reading a small tensor into
// a std::vector in the compute type).
#pragma once
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace gsa {

// Throws std::runtime_error (RuntimeError in Python) with the pieces streamed together. Unlike
// STD_TORCH_CHECK the message carries no C++ function name or source path: it is meant for users.
template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  throw std::runtime_error(s.str());
}

#define GSA_CHECK(cond, ...) \
  do {                       \
    if (!(cond)) ::gsa::fail(__VA_ARGS__); \
  } while (0)

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline std::string shape_of(const Tensor& t) {
  std::ostringstream s;
  s << '[';
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << ']';
  return s.str();
}

inline Tensor dense(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

inline bool is_float_type(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

// Calls f(const scalar_t* data) with the data of a contiguous float tensor in its own type.
template <class F>
decltype(auto) visit_float(const Tensor& t, F&& f) {
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case ScalarType::Float: return f(static_cast<const float*>(p));
    case ScalarType::Double: return f(static_cast<const double*>(p));
    case ScalarType::Half: return f(static_cast<const torch::headeronly::Half*>(p));
    case ScalarType::BFloat16: return f(static_cast<const torch::headeronly::BFloat16*>(p));
    default: break;
  }
  fail("unsupported dtype ", torch::headeronly::toString(t.scalar_type()));
}

// The values of a small tensor, widened (or narrowed) to T.
template <class T>
std::vector<T> to_vector(const Tensor& t) {
  const Tensor c = dense(t);
  std::vector<T> out(static_cast<size_t>(c.numel()));
  visit_float(c, [&](const auto* p) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<T>(static_cast<double>(p[i]));
  });
  return out;
}

inline void check_float(const Tensor& t, const char* name) {
  GSA_CHECK(is_float_type(t.scalar_type()), name,
                  " must be float32, float64, float16 or bfloat16, got ",
                  torch::headeronly::toString(t.scalar_type()));
}

inline void check_same_device(const Tensor& t, const Tensor& x, const char* name) {
  GSA_CHECK(t.device() == x.device(), name, " is on a different device than x");
}

// Value checks read the data, so they only run on CPU tensors (no host sync on a GPU). A plain loop
// with early exit: these tensors are small (eigenvalues, sigmas, log-weights).
enum class Bound { Any, NonNegative, Positive };

struct ValueScan {
  bool finite = true, in_range = true, has_nan = false, has_posinf = false, all_neginf = true;
};

inline ValueScan scan_values(const Tensor& t, Bound bound) {
  ValueScan s;
  const Tensor c = dense(t);
  visit_float(c, [&](const auto* p) {
    for (int64_t i = 0, n = c.numel(); i < n; ++i) {
      const double v = static_cast<double>(p[i]);
      if (std::isnan(v)) s.has_nan = true;
      if (v == INFINITY) s.has_posinf = true;
      if (v != -INFINITY) s.all_neginf = false;
      if (!std::isfinite(v)) s.finite = false;
      if ((bound == Bound::NonNegative && v < 0) || (bound == Bound::Positive && v <= 0)) s.in_range = false;
    }
  });
  return s;
}

// True when every value is in [0, largest finite], i.e. finite and >= 0 (NaN fails both comparisons).
// Branch-free, so it vectorizes: the per-call check of eigenvalues costs next to nothing when they are
// valid, and the full scan below runs only to say what is wrong.
template <class S>
bool all_finite_nonneg(const S* p, int64_t n) {
  constexpr S kMax = std::numeric_limits<S>::max();
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= int(!(p[i] >= S(0))) | int(!(p[i] <= kMax));
  return bad == 0;
}

inline void check_finite_nonneg(const Tensor& t, const char* name) {
  if (!t.is_cpu() || t.numel() == 0) return;
  if (t.is_contiguous()) {
    const void* p = t.const_data_ptr();
    if (t.scalar_type() == ScalarType::Float && all_finite_nonneg(static_cast<const float*>(p), t.numel())) return;
    if (t.scalar_type() == ScalarType::Double && all_finite_nonneg(static_cast<const double*>(p), t.numel())) return;
  }
  const auto s = scan_values(t, Bound::NonNegative);
  GSA_CHECK(s.finite, name, " has non-finite values");
  GSA_CHECK(s.in_range, name, " has negative values (variances must be >= 0)");
}

inline void check_finite(const Tensor& t, const char* name) {
  if (!t.is_cpu() || t.numel() == 0) return;
  GSA_CHECK(scan_values(t, Bound::Any).finite, name, " has non-finite values (NaN or inf)");
}

// Log-weights may be -inf (a component with zero weight), but not NaN, +inf or all -inf.
inline void check_log_weights(const Tensor& t, const char* name) {
  if (!t.is_cpu() || t.numel() == 0) return;
  const auto s = scan_values(t, Bound::Any);
  GSA_CHECK(!s.has_nan, name, " has NaN values");
  GSA_CHECK(!s.has_posinf, name, " has +inf values");
  GSA_CHECK(!s.all_neginf, name, " is -inf everywhere: at least one component must have positive weight");
}

inline void check_sigma(const Tensor& sigma, int64_t batch, const Tensor& x, const char* name, bool allow_zero) {
  check_float(sigma, name);
  check_same_device(sigma, x, name);
  GSA_CHECK(sigma.dim() == 0 || (sigma.dim() == 1 && (sigma.size(0) == batch || sigma.size(0) == 1)),
                  name, " must be a scalar or have shape [B] = [", batch, "], got ", shape_of(sigma));
  if (!sigma.is_cpu() || sigma.numel() == 0) return;
  const auto s = scan_values(sigma, allow_zero ? Bound::NonNegative : Bound::Positive);
  GSA_CHECK(s.finite, name, " has non-finite values");
  GSA_CHECK(s.in_range, name, allow_zero ? " must be >= 0" : " must be > 0");
}

// x: [B, ...] with at least one data dimension; returns d = prod(...).
inline int64_t check_x(const Tensor& x) {
  check_float(x, "x");
  GSA_CHECK(x.dim() >= 2, "x must have shape [B, ...] with at least one data dimension, got ", shape_of(x));
  int64_t dim = 1;
  for (int64_t i = 1; i < x.dim(); ++i) dim *= x.size(i);
  return dim;
}

// float64 if anything is float64, else float32 (half inputs accumulate in float32).
inline ScalarType compute_dtype(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    if (t->scalar_type() == ScalarType::Double) return ScalarType::Double;
  }
  return ScalarType::Float;
}

// Per-batch-row value of a sigma of shape [], [1] or [B].
template <class T>
std::vector<T> sigma_rows(const Tensor& sigma, int64_t batch) {
  auto v = to_vector<T>(sigma);
  if (static_cast<int64_t>(v.size()) != batch) v.assign(static_cast<size_t>(batch), v.empty() ? T(0) : v[0]);
  return v;
}

}  // namespace gsa
