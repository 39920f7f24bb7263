// CPU kernels of the Gaussian ops (docs/math.md section 2.1): project, scale per mode, project back.
//   c = U^T (x - mu),  out = [mu] + f(lam_perp) (x - mu) + U [(f(lam) - f(lam_perp)) c]
// The two GEMMs go through the dispatcher; the centring and the terms outside the basis are one fused
// loop before them, and the second GEMM adds its product to that loop's output.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "aten_call.h"
#include "checks.h"
#include "gaussian/map_kind.h"

namespace gsa {
namespace {

struct GaussianArgs {
  int64_t batch, dim, rank;
  ScalarType ctype;
};

GaussianArgs check_gaussian(const Tensor& x, const Tensor& mean, const Tensor& basis, const Tensor* eigvals,
                            const Tensor* lam_perp) {
  const int64_t dim = check_x(x);
  const int64_t batch = x.size(0);
  check_float(mean, "mean");
  check_float(basis, "basis");
  check_same_device(mean, x, "mean");
  check_same_device(basis, x, "basis");
  GSA_CHECK(mean.dim() == 1 && mean.size(0) == dim, "mean must have shape [d] = [", dim,
                  "] to match x of shape ", shape_of(x), ", got ", shape_of(mean));
  GSA_CHECK(basis.dim() == 2 && basis.size(0) == dim, "basis must have shape [d, r] with d = ", dim,
                  ", got ", shape_of(basis));
  const int64_t rank = basis.size(1);
  GSA_CHECK(rank >= 1 && rank <= dim, "basis must have 1 <= r <= d = ", dim, ", got r = ", rank);
  ScalarType ctype = compute_dtype({&x, &mean, &basis});
  if (eigvals) {
    check_float(*eigvals, "eigvals");
    check_same_device(*eigvals, x, "eigvals");
    GSA_CHECK(eigvals->dim() == 1 && eigvals->size(0) == rank, "eigvals must have shape [r] = [", rank,
                    "], got ", shape_of(*eigvals));
    check_finite_nonneg(*eigvals, "eigvals");
    ctype = compute_dtype({&x, &mean, &basis, eigvals});
  }
  if (lam_perp) {
    check_float(*lam_perp, "lam_perp");
    check_same_device(*lam_perp, x, "lam_perp");
    GSA_CHECK(lam_perp->numel() == 1, "lam_perp must be a scalar tensor, got shape ", shape_of(*lam_perp));
    check_finite_nonneg(*lam_perp, "lam_perp");
  }
  return {batch, dim, rank, ctype};
}

Tensor as_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

// The values of a small parameter tensor (mean, eigvals) as T: its own data when it is already dense
// T (the usual case: no copy per call), else a converted copy.
template <class T>
class ValuesAs {
 public:
  explicit ValuesAs(const Tensor& t) {
    if (t.scalar_type() == torch::headeronly::CppTypeToScalarType<T>::value && t.is_contiguous()) {
      data_ = static_cast<const T*>(t.const_data_ptr());
    } else {
      copy_ = to_vector<T>(t);
      data_ = copy_.data();
    }
  }
  const T* data() const { return data_; }

 private:
  const T* data_;
  std::vector<T> copy_;
};

// Runs f(row0, row1) over the rows of a [rows, width] elementwise pass, in parallel when it is big
// enough to pay for the fork.
template <class F>
void for_rows(int64_t rows, int64_t width, const F& f) {
  constexpr int64_t kGrainElements = int64_t(1) << 15;
  if (rows * width < 2 * kGrainElements || rows < 2) {
    f(int64_t(0), rows);
    return;
  }
  torch::stable::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1)), f);
}

// xc = x - mu as a [B, d] tensor of the compute type T (x read in its own dtype). With a base tensor
// (the gaussian maps), the same pass also writes base = [mu] + f_perp (x - mu), the part of the output
// that does not go through the basis; the second GEMM then accumulates into it (BLAS beta = 1), so no
// pass after the GEMMs reads xc or the output again.
template <class T>
Tensor centred(const Tensor& x, const T* mu, int64_t batch, int64_t dim, T* base = nullptr,
               const T* f_perp = nullptr, bool add_mean = false) {
  const Tensor xs = dense(x);
  Tensor xc = dense_empty({batch, dim}, torch::headeronly::CppTypeToScalarType<T>::value, x);
  T* out = xc.mutable_data_ptr<T>();
  visit_float(xs, [&](const auto* px) {
    for_rows(batch, dim, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const auto* xr = px + b * dim;
        T* cr = out + b * dim;
        for (int64_t j = 0; j < dim; ++j) cr[j] = static_cast<T>(xr[j]) - mu[j];
        if (!base) continue;
        T* br = base + b * dim;
        const T fp = f_perp[b];
        if (add_mean) {
          for (int64_t j = 0; j < dim; ++j) br[j] = mu[j] + fp * cr[j];
        } else {
          for (int64_t j = 0; j < dim; ++j) br[j] = fp * cr[j];
        }
      }
    });
  });
  return xc;
}

// Calls body(f) with f(l) of docs/math.md section 2.1 for the map as a plain function object, so the
// switch on the map is taken once and the loops over the modes inside body vectorize. s_a is sigma (or
// sigma_from), s_b is sigma_to.
template <class T, class Body>
decltype(auto) with_mode_function(MapKind map, T s_a, T s_b, Body&& body) {
  const T s2 = s_a * s_a, t2 = s_b * s_b;
  switch (map) {
    case MapKind::Denoise: return body([=](T l) { return l / (l + s2); });
    case MapKind::Score: return body([=](T l) { return T(-1) / (l + s2); });
    case MapKind::Teleport: break;
  }
  return body([=](T l) { return std::sqrt((l + t2) / (l + s2)); });
}

template <class T>
inline T mode_factor(MapKind map, T l, T s_a, T s_b) {
  return with_mode_function(map, s_a, s_b, [&](auto f) { return f(l); });
}

// factor[k] = f(lam_k) - f_perp: the weight of mode k on top of the f_perp (x - mu) term.
template <class T>
void mode_factors(MapKind map, const T* lam, int64_t r, T s_a, T s_b, T f_perp, T* factor) {
  with_mode_function(map, s_a, s_b, [&](auto f) {
    for (int64_t k = 0; k < r; ++k) factor[k] = f(lam[k]) - f_perp;
  });
}

Tensor to_output(Tensor out, const Tensor& x) {
  if (x.dim() != 2) out = torch::stable::view(out, x.sizes());
  return as_dtype(out, x.scalar_type());
}

template <class T>
Tensor gaussian_map_impl(MapKind map, const GaussianArgs& a, const Tensor& x, const Tensor& mean,
                         const Tensor& basis, const Tensor& eigvals, const Tensor& lam_perp,
                         const Tensor& sigma_a, const Tensor& sigma_b) {
  const int64_t B = a.batch, d = a.dim, r = a.rank;
  const ValuesAs<T> mu(mean), lam(eigvals);
  const T lp = to_vector<T>(lam_perp)[0];
  // sigma (or sigma_from) floored at sqrt(smallest normal of T), so sigma^2 stays normal and no variance
  // lam + sigma^2 is 0 (lam_perp = 0 would give 0 / 0); the same floor as _core/dtypes.py sigma_floor.
  // sigma_to is not floored: 0 is a valid target.
  auto s_a = sigma_rows<T>(sigma_a, B);
  const T s_floor = std::sqrt(std::numeric_limits<T>::min());
  for (auto& s : s_a) s = std::max(s, s_floor);
  const auto s_b = sigma_rows<T>(sigma_b, B);
  const Tensor U = as_dtype(basis, a.ctype);
  // Full rank: there is no orthogonal complement, so no f(lam_perp) term (and no pass over x for it).
  // Dropping it also avoids the cancellation f_perp (x - mu) - U (f_perp c), which is catastrophic when
  // f_perp is large.
  const bool full_rank = r == d;
  const bool add_mean = map != MapKind::Score;
  std::vector<T> f_perp(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) f_perp[b] = full_rank ? T(0) : mode_factor(map, lp, s_a[b], s_b[b]);
  // out = base + G U^T: with a base term the centring pass writes it and the GEMM accumulates into it.
  const bool has_base = !full_rank || add_mean;
  Tensor out = dense_empty({B, d}, a.ctype, x);
  const Tensor xc = has_base ? centred<T>(x, mu.data(), B, d, out.mutable_data_ptr<T>(), f_perp.data(), add_mean)
                             : centred<T>(x, mu.data(), B, d);
  Tensor g = mm(xc, U);  // [B, r] coefficients c, scaled in place to G = (f(lam) - f(lam_perp)) c
  T* pg = g.mutable_data_ptr<T>();
  // The factors depend on the row only through its sigmas: computed once per distinct pair (usually
  // once per call), then a plain multiply per coefficient.
  std::vector<T> factor(static_cast<size_t>(r));
  for (int64_t b = 0; b < B; ++b) {
    if (b == 0 || s_a[b] != s_a[b - 1] || s_b[b] != s_b[b - 1]) {
      mode_factors(map, lam.data(), r, s_a[b], s_b[b], f_perp[b], factor.data());
    }
    T* gr = pg + b * r;
    for (int64_t k = 0; k < r; ++k) gr[k] *= factor[k];
  }
  if (has_base) {
    linear_accumulate(out, g, U);
  } else {
    mm_out(out, g, torch::stable::transpose(U, 0, 1));
  }
  return to_output(out, x);
}

Tensor gaussian_map_cpu(MapKind map, const Tensor& x, const Tensor& mean, const Tensor& basis,
                        const Tensor& eigvals, const Tensor& lam_perp, const Tensor& sigma_a,
                        const Tensor& sigma_b) {
  const auto a = check_gaussian(x, mean, basis, &eigvals, &lam_perp);
  check_sigma(sigma_a, a.batch, x, map == MapKind::Teleport ? "sigma_from" : "sigma", /*allow_zero=*/false);
  if (map == MapKind::Teleport) check_sigma(sigma_b, a.batch, x, "sigma_to", /*allow_zero=*/true);
  return a.ctype == ScalarType::Double
             ? gaussian_map_impl<double>(map, a, x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b)
             : gaussian_map_impl<float>(map, a, x, mean, basis, eigvals, lam_perp, sigma_a, sigma_b);
}

template <class T>
Tensor project_impl(const GaussianArgs& a, const Tensor& x, const Tensor& mean, const Tensor& basis) {
  const Tensor xc = centred<T>(x, ValuesAs<T>(mean).data(), a.batch, a.dim);
  return as_dtype(mm(xc, as_dtype(basis, a.ctype)), x.scalar_type());
}

Tensor project_cpu(Tensor x, Tensor mean, Tensor basis) {
  const auto a = check_gaussian(x, mean, basis, nullptr, nullptr);
  return a.ctype == ScalarType::Double ? project_impl<double>(a, x, mean, basis)
                                       : project_impl<float>(a, x, mean, basis);
}

Tensor gaussian_denoise_cpu(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma) {
  return gaussian_map_cpu(MapKind::Denoise, x, mean, basis, eigvals, lam_perp, sigma, sigma);
}

Tensor gaussian_score_cpu(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma) {
  return gaussian_map_cpu(MapKind::Score, x, mean, basis, eigvals, lam_perp, sigma, sigma);
}

Tensor teleport_cpu(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma_from,
                    Tensor sigma_to) {
  return gaussian_map_cpu(MapKind::Teleport, x, mean, basis, eigvals, lam_perp, sigma_from, sigma_to);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(gsa, CPU, m) {
  m.impl("project", TORCH_BOX(&project_cpu));
  m.impl("gaussian_denoise", TORCH_BOX(&gaussian_denoise_cpu));
  m.impl("gaussian_score", TORCH_BOX(&gaussian_score_cpu));
  m.impl("teleport", TORCH_BOX(&teleport_cpu));
}

}  // namespace gsa
