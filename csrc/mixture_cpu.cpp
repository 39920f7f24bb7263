// CPU kernels of the mixture ops (docs/math.md section 3): GMM and delta-mixture (training-set)
// denoisers/scores with a streaming log-sum-exp over chunks of components.
//
// Per chunk of C components the kernel forms, in the compute dtype (float64 if any input is float64,
// else float32; half/bfloat16 points are widened one chunk at a time):
//   M      = mu[chunk] - ctr                       [C, d]      (ctr: a shared reference point)
//   q      = ||x - ctr||^2 - 2 (x - ctr) M^T + ||M||^2       [B, C]  squared distances by a *centred*
//                                                                      expansion (one GEMM)
//   c      = (x - ctr) U_flat - U^T M              [B, C, r]   (c_i = U_i^T (x - mu_i), one GEMM)
// then the logits log pi_i + log N_i (docs/math.md section 3), the online log-sum-exp update of the running max m,
// the rescaled sum W and the sum of p_i cx_i, and two GEMMs into the [B, d] accumulator:
//   acc = alpha acc + (p cm) M + (p g c) U_flat^T
// with per-component coefficients of D_i - ctr, or of the score, chosen so that neither is formed from
// a difference of nearly equal terms (see stream_chunks). At the end
// out = (acc + (sum p cx)(x - ctr)) / W [+ ctr for the denoiser]. The chunks are divided among
// T = at::get_num_threads() workers, each with its own state, merged exactly at the end (see
// mixture_forward_cpu). Extra memory is
// O(T (B d + B C (1 + r) + C d (1 + r))); nothing of shape [B, K, d] or [B, K] exists (except the
// posterior weights [B, K] when asked for).
//
// Why centre: the expansion ||x||^2 - 2 x.mu + ||mu||^2 loses about eps (||x||^2 + ||mu||^2) in
// absolute terms (docs/math.md section 3.1), which is divided by 2 sigma^2. With ctr = mean of the components that
// becomes eps (||x - ctr||^2 + ||mu - ctr||^2): for data far from the origin relative to its spread
// (points = 10 + 0.05 randn) that is 4e4 times smaller. The score's terms mu_i - x are formed in the
// same frame, (mu_i - ctr) - (x - ctr), so their cancellation is also relative to the spread, not ||x||.
//
// Robustness: logits use sigma^2 clamped to [FLT_MIN, FLT_MAX] and a quadratic form clamped to 1e37,
// so finite input never produces inf/NaN logits; the online update guards the all -inf case.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "gsa_checks.h"

namespace gsa {
namespace {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;
constexpr double kQuadMax = 1e37;  // quadratic forms beyond this only tie with each other

struct MixtureArgs {
  int64_t batch, dim, n_comp, rank;
  at::ScalarType ctype;
};

void check_no_nan_or_posinf(const at::Tensor& t, const char* name) {
  if (!t.device().is_cpu() || t.numel() == 0) return;
  TORCH_CHECK(!at::isnan(t).any().item<bool>(), name, " has NaN values");
  TORCH_CHECK(!at::isposinf(t).any().item<bool>(), name, " has +inf values");
  TORCH_CHECK(!at::isneginf(t).all().item<bool>(), name,
              " is -inf everywhere: at least one component must have positive weight");
}

void check_finite(const at::Tensor& t, const char* name) {
  if (!t.device().is_cpu() || t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " has non-finite values (NaN or inf)");
}

MixtureArgs check_mixture(const at::Tensor& x, const std::optional<at::Tensor>& log_weights,
                          const at::Tensor& means, const char* means_name,
                          const std::optional<at::Tensor>& bases,
                          const std::optional<at::Tensor>& eigvals,
                          const std::optional<at::Tensor>& lam_perp, const at::Tensor& sigma,
                          const std::optional<at::Tensor>& center, int64_t chunk_size) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must have shape [B, ...] with at least one data dimension, got ",
              x.sizes());
  const int64_t batch = x.size(0);
  int64_t dim = 1;
  for (int64_t i = 1; i < x.dim(); ++i) dim *= x.size(i);

  check_float(means, means_name);
  check_same_device(means, x, means_name);
  TORCH_CHECK(means.dim() == 2 && means.size(1) == dim, means_name, " must have shape [K, d] with d = ",
              dim, " (from x of shape ", x.sizes(), "), got ", means.sizes());
  const int64_t n_comp = means.size(0);
  TORCH_CHECK(n_comp >= 1, means_name, " must hold at least one component (K >= 1), got K = 0");
  // means/points and bases are not value-checked per call (a full pass over N d values); the model
  // classes check them once at construction.
  std::vector<at::Tensor> all = {x, means};

  if (log_weights) {
    check_float(*log_weights, "log_weights");
    check_same_device(*log_weights, x, "log_weights");
    TORCH_CHECK(log_weights->dim() == 1 && log_weights->size(0) == n_comp,
                "log_weights must have shape [K] = [", n_comp, "], got ", log_weights->sizes());
    check_no_nan_or_posinf(*log_weights, "log_weights");
    all.push_back(*log_weights);
  }
  int64_t rank = 0;
  TORCH_CHECK(bases.has_value() == eigvals.has_value(),
              bases ? "eigvals must be given with bases" : "bases must be given with eigvals");
  if (bases) {
    check_float(*bases, "bases");
    check_same_device(*bases, x, "bases");
    TORCH_CHECK(bases->dim() == 3 && bases->size(0) == n_comp && bases->size(1) == dim,
                "bases must have shape [K, d, r] = [", n_comp, ", ", dim, ", r], got ", bases->sizes());
    rank = bases->size(2);
    TORCH_CHECK(rank <= dim, "bases must have r <= d = ", dim, ", got r = ", rank);
    check_float(*eigvals, "eigvals");
    check_same_device(*eigvals, x, "eigvals");
    TORCH_CHECK(eigvals->dim() == 2 && eigvals->size(0) == n_comp && eigvals->size(1) == rank,
                "eigvals must have shape [K, r] = [", n_comp, ", ", rank, "], got ", eigvals->sizes());
    check_finite_nonneg(*eigvals, "eigvals");
    all.push_back(*bases);
    all.push_back(*eigvals);
  }
  if (lam_perp) {
    check_float(*lam_perp, "lam_perp");
    check_same_device(*lam_perp, x, "lam_perp");
    TORCH_CHECK(lam_perp->dim() == 1 && lam_perp->size(0) == n_comp, "lam_perp must have shape [K] = [",
                n_comp, "], got ", lam_perp->sizes());
    check_finite_nonneg(*lam_perp, "lam_perp");
    all.push_back(*lam_perp);
  }
  if (center) {
    check_float(*center, "center");
    check_same_device(*center, x, "center");
    TORCH_CHECK(center->dim() == 1 && center->size(0) == dim, "center must have shape [d] = [", dim,
                "], got ", center->sizes());
    check_finite(*center, "center");
  }
  check_sigma(sigma, batch, x, "sigma", /*allow_zero=*/false);
  TORCH_CHECK(chunk_size >= 0, "chunk_size must be >= 0 (0 picks one), got ", chunk_size);

  at::ScalarType ctype = at::kFloat;
  for (const auto& t : all) {
    if (t.scalar_type() == at::kDouble) ctype = at::kDouble;
  }
  return {batch, dim, n_comp, rank, ctype};
}

// Components per chunk: each [C, d (1 + r)] and [B, C (1 + r)] buffer stays under ~2^18 elements
// (1 MiB in float32; a chunk has about six such temporaries per worker), but C >= 64 for BLAS.
int64_t pick_chunk(int64_t requested, const MixtureArgs& a) {
  if (requested > 0) return std::min(requested, a.n_comp);
  const int64_t budget = int64_t(1) << 18;
  const int64_t width = 1 + a.rank;
  int64_t c = std::min(budget / std::max<int64_t>(a.dim * width, 1),
                       budget / std::max<int64_t>(a.batch * width, 1));
  // At least one chunk per thread when there are enough components to keep BLAS efficient.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  c = std::min(c, std::max<int64_t>(64, (a.n_comp + threads - 1) / threads));
  return std::clamp<int64_t>(c, std::min<int64_t>(64, a.n_comp), std::max<int64_t>(a.n_comp, 1));
}

// Mean of the component means in float64, chunk by chunk (never a full float64 copy).
at::Tensor mean_of_means(const at::Tensor& means, int64_t chunk) {
  auto sum = at::zeros({means.size(1)}, means.options().dtype(at::kDouble));
  for (int64_t k0 = 0; k0 < means.size(0); k0 += chunk) {
    const int64_t kc = std::min(chunk, means.size(0) - k0);
    sum.add_(means.narrow(0, k0, kc).to(at::kDouble).sum(0));
  }
  return sum.div_(static_cast<double>(means.size(0)));
}

// Inputs of one call, converted once (all small except x).
struct MixtureData {
  at::Tensor xr, xnorm, s2, ctr, eig;
  std::optional<at::Tensor> lw, lp;
};

// Streams chunks [c0, c1) of components into one partial state (row max, sum, x-coefficient sum [B];
// acc [B, d]);
// also writes their columns of `logits` when defined. Everything is a vectorized ATen op on [B, kc]
// (or [B, kc, r]) tiles; inside at::parallel_for these run single-threaded, one worker per split.
void stream_chunks(const MixtureArgs& a, const MixtureData& in, const at::Tensor& means,
                   const std::optional<at::Tensor>& bases, int64_t chunk, int64_t c0, int64_t c1,
                   bool score, at::Tensor run_max, at::Tensor run_sum, at::Tensor run_x,
                   at::Tensor acc, at::Tensor logits) {
  const auto ct = a.ctype;
  const int64_t B = a.batch, d = a.dim, K = a.n_comp, r = a.rank;
  const bool full_rank = r == d;
  const double var_lo = std::numeric_limits<float>::min(), var_hi = std::numeric_limits<float>::max();
  const auto s2 = in.s2.unsqueeze(1);  // [B, 1]
  // Without per-component lam_perp the off-subspace variance is a per-row constant.
  const auto vp_row = s2.clamp(var_lo, var_hi);
  const auto& s2c = vp_row;  // sigma^2 clamped to [FLT_MIN, FLT_MAX]
  const double exp_floor = ct == at::kDouble ? -700.0 : -80.0;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * chunk;
    const int64_t kc = std::min(chunk, K - k0);
    const auto M = means.narrow(0, k0, kc).to(ct) - in.ctr;  // mu - ctr   [kc, d]
    const auto mnorm = (M * M).sum(1);
    // q_i = ||x - mu_i||^2 by the centred expansion.
    auto q = at::addmm(in.xnorm.unsqueeze(1) + mnorm.unsqueeze(0), in.xr, M.t(), 1.0, -2.0).clamp_min_(0);
    // Quadratic form and log det C_i(sigma) - d log(sigma^2): the log-determinant is taken relative to
    // the isotropic sigma^2 I as sum log1p(lam / s^2), so the logits stay O(1) at large sigma instead of
    // carrying a common d log(sigma^2) that would cost the posterior weights eps d log(sigma^2).
    at::Tensor quad, logdet, c3, v, u_flat;
    if (r > 0) {
      const auto U = bases->narrow(0, k0, kc).to(ct);              // [kc, d, r]
      u_flat = U.permute({1, 0, 2}).reshape({d, kc * r});           // [d, kc r]
      const auto t = at::bmm(M.unsqueeze(1), U).reshape({kc * r});  // U_i^T (mu_i - ctr)
      c3 = (at::mm(in.xr, u_flat) - t).view({B, kc, r});            // c_i = U_i^T (x - mu_i)
      v = (in.eig.narrow(0, k0, kc).unsqueeze(0) + s2.unsqueeze(2)).clamp_(var_lo, var_hi);
      const auto c_sq = c3 * c3;
      quad = (c_sq / v).sum(2);
      logdet = at::log1p((in.eig.narrow(0, k0, kc).unsqueeze(0) / s2c.unsqueeze(2)).clamp_max_(var_hi)).sum(2);
      if (!full_rank) q.sub_(c_sq.sum(2)).clamp_min_(0);  // q_i - p_i, the off-subspace residual
    }
    at::Tensor vp;  // lam_perp_i + sigma^2: [B, kc], or [B, 1] without per-component lam_perp
    if (!full_rank) {
      if (in.lp) {
        const auto lp = in.lp->narrow(0, k0, kc).unsqueeze(0);
        vp = (lp + s2).clamp_(var_lo, var_hi);
        const auto logdet_perp = at::log1p((lp / s2c).clamp_max_(var_hi)).mul_(static_cast<double>(d - r));
        logdet = logdet.defined() ? logdet.add_(logdet_perp) : logdet_perp;
      } else {
        vp = vp_row;  // lam_perp = 0: log1p(0) = 0
      }
      quad = quad.defined() ? quad.add_(q.div_(vp)) : q.div_(vp);
    }
    // log N_i + d/2 log(2 pi sigma^2) (the row constant is added at the end).
    auto logit = quad.clamp_max_(kQuadMax);
    if (logdet.defined()) logit.add_(logdet);
    logit.mul_(-0.5);
    if (in.lw) logit.add_(in.lw->narrow(0, k0, kc).unsqueeze(0));
    // Online log-sum-exp (all -inf state kept NaN-free: shift 0, alpha = p = 0).
    const auto m_new = at::maximum(run_max, std::get<0>(logit.max(1)));
    const auto shift = at::where(at::isneginf(m_new), at::zeros_like(m_new), m_new);
    const auto alpha = at::exp(run_max - shift);
    // Weights below e^exp_floor relative to the max are set to exactly 0 instead of becoming
    // subnormal floats (which run ~50x slower on x86 and change D by < N e^exp_floor relative).
    auto arg = logit - shift.unsqueeze(1);
    arg.masked_fill_(arg < exp_floor, -std::numeric_limits<double>::infinity());
    const auto p = arg.exp_();  // [B, kc]
    run_sum.mul_(alpha).add_(p.sum(1));
    run_max.copy_(m_new);
    acc.mul_(alpha.unsqueeze(1));
    run_x.mul_(alpha);
    // Each component adds p_i [cm_i (mu_i - ctr) + cx_i (x - ctr) + U_i (g_i * c_i)] to the state, with
    // the coefficients of D_i - ctr (denoiser) or of the score term (docs/math.md section 3 rearranged so that no
    // factor is a difference of nearly equal numbers; vp = lam_perp + s^2, v = lam + s^2, clamped):
    //              cm_i            cx_i               g_ik
    //   denoiser:  s^2 / vp_i      lam_perp_i / vp_i  s^2 (lam_ik - lam_perp_i) / (v_ik vp_i)   (= 1-a, a, b-a)
    //   score:     1 / vp_i        -1 / vp_i          (lam_ik - lam_perp_i) / (v_ik vp_i)       (the same / s^2)
    //   r = d:     1 | 0           0 | 0              lam_ik / v_ik | -1 / v_ik                 (no complement)
    // The denoiser is never formed as x + (D - x) (cancels at large sigma), nor the score as
    // (D - x) / s^2 (cancels at small sigma).
    if (full_rank) {
      if (!score) acc.addmm_(p, M);
    } else if (in.lp) {
      const auto inv_vp = vp.reciprocal();
      acc.addmm_(score ? p * inv_vp : p * (s2c * inv_vp), M);
      run_x.add_((score ? -p * inv_vp : p * (in.lp->narrow(0, k0, kc).unsqueeze(0) * inv_vp)).sum(1));
    } else if (score) {  // lam_perp = 0: cm = -cx = 1 / s^2, a per-row constant
      acc.addmm_(p / vp_row, M);
      run_x.sub_(p.sum(1) / in.s2.clamp(var_lo, var_hi));
    } else {  // lam_perp = 0, denoiser: cm = 1, cx = 0
      acc.addmm_(p, M);
    }
    if (r > 0) {
      const auto lam = in.eig.narrow(0, k0, kc).unsqueeze(0);  // [1, kc, r]
      at::Tensor g;
      if (full_rank) {
        g = score ? -v.reciprocal() : lam / v;
      } else {
        const auto lam_minus_lp = in.lp ? lam - in.lp->narrow(0, k0, kc).view({1, kc, 1}) : lam;
        g = lam_minus_lp / (v * vp.unsqueeze(2));
        if (!score) g = g * s2c.unsqueeze(2);
      }
      acc.addmm_((p.unsqueeze(2) * g * c3).view({B, kc * r}), u_flat.t());
    }
    if (logits.defined()) logits.narrow(1, k0, kc).copy_(logit);
  }
}

// The chunks are split over S = min(threads, chunks) workers (at::parallel_for), each streaming its
// own range into its own partial state with single-threaded BLAS (no fork/join per chunk); the S
// states are merged exactly at the end:
//   M = max_s m_s,  e_s = exp(m_s - M),  W = sum_s e_s l_s,
//   D - ctr = (sum_s e_s acc_s + (sum_s e_s a_s)(x - ctr)) / W,   log_z = M + log W.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& log_weights, const at::Tensor& means,
    const char* means_name, const std::optional<at::Tensor>& bases,
    const std::optional<at::Tensor>& eigvals, const std::optional<at::Tensor>& lam_perp,
    const at::Tensor& sigma, const std::optional<at::Tensor>& center, bool score, bool return_weights,
    int64_t chunk_size) {
  const auto a = check_mixture(x, log_weights, means, means_name, bases, eigvals, lam_perp, sigma,
                               center, chunk_size);
  const auto ct = a.ctype;
  const auto opts = x.options().dtype(ct);
  const int64_t B = a.batch, d = a.dim, K = a.n_comp, r = a.rank;
  const int64_t chunk = pick_chunk(chunk_size, a);

  MixtureData in;
  in.ctr = (center ? center->to(at::kDouble) : mean_of_means(means, chunk)).to(ct);
  in.xr = (x.reshape({B, d}).to(ct) - in.ctr).contiguous();  // x - ctr   [B, d]
  in.xnorm = (in.xr * in.xr).sum(1).contiguous();
  in.s2 = sigma.to(ct).reshape({-1}).expand({B}).square().contiguous();
  if (log_weights) in.lw = log_weights->to(ct).contiguous();
  if (lam_perp) in.lp = lam_perp->to(ct).contiguous();
  in.eig = r > 0 ? eigvals->to(ct).contiguous() : at::empty({K, 0}, opts);

  const int64_t n_chunks = (K + chunk - 1) / chunk;
  const int64_t n_split = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  const int64_t per_split = (n_chunks + n_split - 1) / n_split;
  auto run_max = at::full({n_split, B}, -std::numeric_limits<double>::infinity(), opts);
  auto run_sum = at::zeros({n_split, B}, opts);
  auto run_x = at::zeros({n_split, B}, opts);
  auto acc = at::zeros({n_split, B, d}, opts);
  auto logits = return_weights ? at::empty({B, K}, opts) : at::Tensor();
  if (B > 0) {
    at::parallel_for(0, n_split, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        stream_chunks(a, in, means, bases, chunk, s * per_split,
                      std::min(n_chunks, (s + 1) * per_split), score, run_max[s], run_sum[s],
                      run_x[s], acc[s], logits);
      }
    });
  }

  const auto top = std::get<0>(run_max.max(0));
  const auto shift = at::where(at::isneginf(top), at::zeros_like(top), top);
  const auto e = at::exp(run_max - shift);  // [S, B]; 0 for a split with no weight
  const auto total = (e * run_sum).sum(0);
  const auto inv_total = at::where(total > 0, total.reciprocal(), at::zeros_like(total));
  // D - ctr (or the score) = (sum_s e_s acc_s + (sum_s e_s cx_s)(x - ctr)) / W.
  auto num = at::einsum("sb,sbd->bd", {e, acc}) + (e * run_x).sum(0).unsqueeze(1) * in.xr;
  const auto centred = num * inv_total.unsqueeze(1);
  // log_z = M + log W - d/2 log(2 pi sigma^2) (the row constant is left out of the streamed logits); a
  // row whose every weight is zero gets W = 0 -> log_z = -inf and D = ctr.
  const auto log_w = shift + at::log(total);
  const auto log_z =
      log_w - 0.5 * static_cast<double>(d) * (at::log(in.s2.clamp(std::numeric_limits<float>::min(),
                                                                   std::numeric_limits<float>::max())) +
                                              kLog2Pi);
  at::Tensor out = score ? centred : centred + in.ctr;
  out = out.to(x.scalar_type()).reshape(x.sizes());
  // Weights as exp(logit - M) / W, not exp(logit - log_z): M is one of the logits, so the difference is
  // exact where it matters, while log_z carries an absolute rounding error eps |log_z|.
  at::Tensor weights = return_weights ? at::exp(logits - shift.unsqueeze(1)) * inv_total.unsqueeze(1)
                                      : at::empty({0}, opts);
  return {out, log_z, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gmm_forward_cpu(
    const at::Tensor& x, const at::Tensor& log_weights, const at::Tensor& means,
    const std::optional<at::Tensor>& bases, const std::optional<at::Tensor>& eigvals,
    const std::optional<at::Tensor>& lam_perp, const at::Tensor& sigma,
    const std::optional<at::Tensor>& center, bool score, bool return_weights, int64_t chunk_size) {
  return mixture_forward_cpu(x, log_weights, means, "means", bases, eigvals, lam_perp, sigma, center,
                             score, return_weights, chunk_size);
}

std::tuple<at::Tensor, at::Tensor> delta_mixture_forward_cpu(
    const at::Tensor& x, const at::Tensor& points, const std::optional<at::Tensor>& log_weights,
    const at::Tensor& sigma, const std::optional<at::Tensor>& center, bool score, int64_t chunk_size) {
  auto [out, log_z, w] = mixture_forward_cpu(x, log_weights, points, "points", std::nullopt,
                                             std::nullopt, std::nullopt, sigma, center, score, false,
                                             chunk_size);
  return {out, log_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa, CPU, m) {
  m.impl("gmm_forward", &gmm_forward_cpu);
  m.impl("delta_mixture_forward", &delta_mixture_forward_cpu);
}

}  // namespace gsa
