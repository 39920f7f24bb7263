// CPU kernels of the Gaussian ops (docs/math.md section 2.1): project, scale per mode, project back.
//   c = U^T (x - mu),  out = [mu] + f(lam_perp) (x - mu) + U [(f(lam) - f(lam_perp)) c]
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gsa_checks.h"

namespace gsa {
namespace {

enum class GaussianMap { Denoise, Score, Teleport };

struct GaussianArgs {
  int64_t batch, dim, rank;
  at::ScalarType ctype;
};

GaussianArgs check_gaussian(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                            const at::Tensor* eigvals, const at::Tensor* lam_perp) {
  TORCH_CHECK(x.dim() >= 2, "x must have shape [B, ...] with at least one data dimension, got ",
              x.sizes());
  check_float(x, "x");
  const int64_t batch = x.size(0);
  int64_t dim = 1;
  for (int64_t i = 1; i < x.dim(); ++i) dim *= x.size(i);
  check_float(mean, "mean");
  check_float(basis, "basis");
  check_same_device(mean, x, "mean");
  check_same_device(basis, x, "basis");
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == dim, "mean must have shape [d] = [", dim,
              "] to match x of shape ", x.sizes(), ", got ", mean.sizes());
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == dim, "basis must have shape [d, r] with d = ", dim,
              ", got ", basis.sizes());
  const int64_t rank = basis.size(1);
  TORCH_CHECK(rank >= 1 && rank <= dim, "basis must have 1 <= r <= d = ", dim, ", got r = ", rank);
  at::ScalarType ctype = compute_dtype({x, mean, basis});
  if (eigvals) {
    check_float(*eigvals, "eigvals");
    check_same_device(*eigvals, x, "eigvals");
    TORCH_CHECK(eigvals->dim() == 1 && eigvals->size(0) == rank, "eigvals must have shape [r] = [",
                rank, "], got ", eigvals->sizes());
    check_finite_nonneg(*eigvals, "eigvals");
    ctype = compute_dtype({x, mean, basis, *eigvals});
  }
  if (lam_perp) {
    check_float(*lam_perp, "lam_perp");
    check_same_device(*lam_perp, x, "lam_perp");
    TORCH_CHECK(lam_perp->numel() == 1, "lam_perp must be a scalar tensor, got shape ", lam_perp->sizes());
    check_finite_nonneg(*lam_perp, "lam_perp");
  }
  return {batch, dim, rank, ctype};
}

// Per-mode factors f(lam) [B, r] and f(lam_perp) [B, 1] of docs/math.md section 2.1.
std::pair<at::Tensor, at::Tensor> mode_factors(GaussianMap map, const at::Tensor& lam,
                                               const at::Tensor& lam_perp, const at::Tensor& s_a,
                                               const at::Tensor& s_b) {
  auto f = [&](const at::Tensor& l) -> at::Tensor {
    const auto s2 = s_a * s_a;
    switch (map) {
      case GaussianMap::Denoise: return l / (l + s2);
      case GaussianMap::Score: return -1.0 / (l + s2);
      case GaussianMap::Teleport: return at::sqrt((l + s_b * s_b) / (l + s2));
    }
    TORCH_CHECK(false, "unreachable");
  };
  return {f(lam.unsqueeze(0)), f(lam_perp.reshape({1, 1}))};
}

at::Tensor gaussian_map_cpu(GaussianMap map, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& basis, const at::Tensor& eigvals,
                            const at::Tensor& lam_perp, const at::Tensor& sigma_a,
                            const at::Tensor& sigma_b) {
  const auto a = check_gaussian(x, mean, basis, &eigvals, &lam_perp);
  const char* name_a = map == GaussianMap::Teleport ? "sigma_from" : "sigma";
  check_sigma(sigma_a, a.batch, x, name_a, /*allow_zero=*/false);
  if (map == GaussianMap::Teleport) check_sigma(sigma_b, a.batch, x, "sigma_to", /*allow_zero=*/true);

  const auto ct = a.ctype;
  const auto x2 = x.reshape({a.batch, a.dim}).to(ct);
  const auto mu = mean.to(ct);
  const auto U = basis.to(ct);
  const auto s_a = sigma_a.to(ct).reshape({-1, 1});
  const auto s_b = sigma_b.to(ct).reshape({-1, 1});
  auto [f_modes, f_perp] = mode_factors(map, eigvals.to(ct), lam_perp.to(ct), s_a, s_b);
  const auto xc = x2 - mu;
  auto g = at::matmul(xc, U);
  at::Tensor out;
  if (a.rank == a.dim) {
    // Full rank: there is no orthogonal complement, so no f(lam_perp) term (and no pass over x for
    // it). Dropping it also avoids the cancellation f_perp (x - mu) - U (f_perp c), which is
    // catastrophic when f_perp is large.
    g.mul_(f_modes);
    out = map == GaussianMap::Score ? at::matmul(g, U.t()) : at::addmm(mu, g, U.t());
  } else {
    g.mul_(f_modes - f_perp);
    out = map == GaussianMap::Score ? xc * f_perp : at::addcmul(mu, xc, f_perp);
    out.addmm_(g, U.t());
  }
  return out.to(x.scalar_type()).reshape(x.sizes());
}

at::Tensor project_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis) {
  const auto a = check_gaussian(x, mean, basis, nullptr, nullptr);
  const auto ct = a.ctype;
  const auto xc = x.reshape({a.batch, a.dim}).to(ct) - mean.to(ct);
  return at::matmul(xc, basis.to(ct)).to(x.scalar_type());
}

at::Tensor gaussian_denoise_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                                const at::Tensor& eigvals, const at::Tensor& lam_perp,
                                const at::Tensor& sigma) {
  return gaussian_map_cpu(GaussianMap::Denoise, x, mean, basis, eigvals, lam_perp, sigma, sigma);
}

at::Tensor gaussian_score_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                              const at::Tensor& eigvals, const at::Tensor& lam_perp,
                              const at::Tensor& sigma) {
  return gaussian_map_cpu(GaussianMap::Score, x, mean, basis, eigvals, lam_perp, sigma, sigma);
}

at::Tensor teleport_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                        const at::Tensor& eigvals, const at::Tensor& lam_perp,
                        const at::Tensor& sigma_from, const at::Tensor& sigma_to) {
  return gaussian_map_cpu(GaussianMap::Teleport, x, mean, basis, eigvals, lam_perp, sigma_from,
                          sigma_to);
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa, CPU, m) {
  m.impl("project", &project_cpu);
  m.impl("gaussian_denoise", &gaussian_denoise_cpu);
  m.impl("gaussian_score", &gaussian_score_cpu);
  m.impl("teleport", &teleport_cpu);
}

}  // namespace gsa
