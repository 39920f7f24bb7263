// CPU kernels of the mixture ops (docs/math.md section 3): GMM and delta-mixture (training-set)
// denoisers/scores with a streaming log-sum-exp over chunks of components.
//
// Per chunk of C components the kernel forms, in the compute type T (float64 if any input is float64,
// else float32; half/bfloat16 components are widened one chunk at a time):
//   M      = mu[chunk] - ctr                       [C, d]      (ctr: a shared reference point)
//   U_flat = the chunk's bases as a [d, C r] matrix: a strided view of the input when its layout and
//            dtype allow (the layout torch.linalg.qr returns does), else a widened copy
//   q      = ||x - ctr||^2 - 2 (x - ctr) M^T + ||M||^2         [B, C]   squared distances by a *centred*
//                                                                       expansion (one GEMM)
//   c      = (x - ctr) U_flat - U^T M              [B, C, r]   (c_i = U_i^T (x - mu_i), one GEMM)
// A fused loop then makes the logits log pi_i + log N_i (docs/math.md section 3), the online
// log-sum-exp update of the running max m, the rescaled sum and the sum of p_i cx_i, and the
// per-component coefficients [p cm | p g c] of D_i - ctr (or of the score), chosen so that neither is
// formed from a difference of nearly equal terms (see accumulate_chunk); two GEMMs add them into the
// [B, d] accumulator:  acc = alpha acc + (p cm) M + (p g c) U_flat^T.
// At the end out = (acc + (sum p cx)(x - ctr)) / W [+ ctr for the denoiser]. The chunks are divided
// among T = get_num_threads() workers (torch::stable::parallel_for), each with its own state, merged
// exactly at the end (see mixture_forward). Extra memory is O(T (B d + B C (1 + r) + C d (1 + r)));
// nothing of shape [B, K, d] or [B, K] exists (except the posterior weights [B, K] when asked for).
//
// Why centre: the expansion ||x||^2 - 2 x.mu + ||mu||^2 loses about eps (||x||^2 + ||mu||^2) in
// absolute terms (docs/math.md section 3.1), which is divided by 2 sigma^2. With ctr = mean of the
// components that becomes eps (||x - ctr||^2 + ||mu - ctr||^2): for data far from the origin relative to
// its spread (points = 10 + 0.05 randn) that is 4e4 times smaller. The score's terms mu_i - x are formed
// in the same frame, (mu_i - ctr) - (x - ctr), so their cancellation is also relative to the spread.
//
// Robustness: logits use sigma^2 clamped to [FLT_MIN, FLT_MAX] and a quadratic form clamped to 1e37,
// so finite input never produces inf/NaN logits; the online update guards the all -inf case.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "aten_call.h"
#include "checks.h"

namespace gsa {
namespace {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;
constexpr double kQuadMax = 1e37;  // quadratic forms beyond this only tie with each other
constexpr double kVarLo = std::numeric_limits<float>::min(), kVarHi = std::numeric_limits<float>::max();

struct MixtureArgs {
  int64_t batch, dim, n_comp, rank;
  ScalarType ctype;
};

MixtureArgs check_mixture(const Tensor& x, const std::optional<Tensor>& log_weights, const Tensor& means,
                          const char* means_name, const std::optional<Tensor>& bases,
                          const std::optional<Tensor>& eigvals, const std::optional<Tensor>& lam_perp,
                          const Tensor& sigma, const std::optional<Tensor>& center, int64_t chunk_size) {
  const int64_t dim = check_x(x);
  const int64_t batch = x.size(0);
  check_float(means, means_name);
  check_same_device(means, x, means_name);
  GSA_CHECK(means.dim() == 2 && means.size(1) == dim, means_name, " must have shape [K, d] with d = ", dim,
            " (from x of shape ", shape_of(x), "), got ", shape_of(means));
  const int64_t n_comp = means.size(0);
  GSA_CHECK(n_comp >= 1, means_name, " must hold at least one component (K >= 1), got K = 0");
  // means/points and bases are not value-checked per call (a full pass over K d values); the model
  // classes check them once at construction.
  std::vector<const Tensor*> all = {&x, &means};
  if (log_weights) {
    check_float(*log_weights, "log_weights");
    check_same_device(*log_weights, x, "log_weights");
    GSA_CHECK(log_weights->dim() == 1 && log_weights->size(0) == n_comp, "log_weights must have shape [K] = [",
              n_comp, "], got ", shape_of(*log_weights));
    check_log_weights(*log_weights, "log_weights");
    all.push_back(&*log_weights);
  }
  int64_t rank = 0;
  GSA_CHECK(bases.has_value() == eigvals.has_value(),
            bases ? "eigvals must be given with bases" : "bases must be given with eigvals");
  if (bases) {
    check_float(*bases, "bases");
    check_same_device(*bases, x, "bases");
    GSA_CHECK(bases->dim() == 3 && bases->size(0) == n_comp && bases->size(1) == dim,
              "bases must have shape [K, d, r] = [", n_comp, ", ", dim, ", r], got ", shape_of(*bases));
    rank = bases->size(2);
    GSA_CHECK(rank <= dim, "bases must have r <= d = ", dim, ", got r = ", rank);
    check_float(*eigvals, "eigvals");
    check_same_device(*eigvals, x, "eigvals");
    GSA_CHECK(eigvals->dim() == 2 && eigvals->size(0) == n_comp && eigvals->size(1) == rank,
              "eigvals must have shape [K, r] = [", n_comp, ", ", rank, "], got ", shape_of(*eigvals));
    check_finite_nonneg(*eigvals, "eigvals");
    all.push_back(&*bases);
    all.push_back(&*eigvals);
  }
  if (lam_perp) {
    check_float(*lam_perp, "lam_perp");
    check_same_device(*lam_perp, x, "lam_perp");
    GSA_CHECK(lam_perp->dim() == 1 && lam_perp->size(0) == n_comp, "lam_perp must have shape [K] = [", n_comp,
              "], got ", shape_of(*lam_perp));
    check_finite_nonneg(*lam_perp, "lam_perp");
    all.push_back(&*lam_perp);
  }
  if (center) {
    check_float(*center, "center");
    check_same_device(*center, x, "center");
    GSA_CHECK(center->dim() == 1 && center->size(0) == dim, "center must have shape [d] = [", dim, "], got ",
              shape_of(*center));
    check_finite(*center, "center");
  }
  check_sigma(sigma, batch, x, "sigma", /*allow_zero=*/false);
  GSA_CHECK(chunk_size >= 0, "chunk_size must be >= 0 (0 picks one), got ", chunk_size);
  ScalarType ctype = ScalarType::Float;
  for (const Tensor* t : all) {
    if (t->scalar_type() == ScalarType::Double) ctype = ScalarType::Double;
  }
  return {batch, dim, n_comp, rank, ctype};
}

// Components per chunk: each [C, d (1 + r)] and [B, C (1 + r)] buffer stays under ~2^18 elements
// (1 MiB in float32), but C >= 64 for BLAS.
int64_t pick_chunk(int64_t requested, const MixtureArgs& a, int64_t threads) {
  if (requested > 0) return std::min(requested, a.n_comp);
  const int64_t budget = int64_t(1) << 18;
  const int64_t width = 1 + a.rank;
  int64_t c = std::min(budget / std::max<int64_t>(a.dim * width, 1), budget / std::max<int64_t>(a.batch * width, 1));
  // At least one chunk per thread when there are enough components to keep BLAS efficient.
  c = std::min(c, std::max<int64_t>(64, (a.n_comp + threads - 1) / threads));
  return std::clamp<int64_t>(c, std::min<int64_t>(64, a.n_comp), std::max<int64_t>(a.n_comp, 1));
}

// Rows [k0, k0 + n) of t, contiguous: (t itself, element offset of row k0) when t is contiguous, else
// (a contiguous copy of those rows, 0).
std::pair<Tensor, int64_t> contiguous_rows(Tensor t, int64_t k0, int64_t n) {
  if (t.is_contiguous()) return {t, k0 * (t.numel() / std::max<int64_t>(t.size(0), 1))};
  return {torch::stable::contiguous(torch::stable::narrow(t, 0, k0, n)), 0};
}

// sum_j a_j b_j, vectorized (-fopenmp-simd): the order of the additions is BLAS-like, not sequential.
template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

template <class T>
Tensor new_tensor(std::initializer_list<int64_t> sizes) {
  return torch::stable::empty(std::vector<int64_t>(sizes), torch::headeronly::CppTypeToScalarType<T>::value);
}

// A [rows, cols] matrix with strides (s0, s1) over memory at data (kept alive by the caller), on the
// device of `like`.
template <class T>
Tensor strided(const Tensor& like, T* data, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  return torch::stable::from_blob(data, {rows, cols}, {s0, s1}, like.device(),
                                  torch::headeronly::CppTypeToScalarType<T>::value);
}

// Mean of the component means in float64 (columns split among the threads).
std::vector<double> mean_of_means(const Tensor& means) {
  const int64_t K = means.size(0), d = means.size(1);
  std::vector<double> sum(static_cast<size_t>(d), 0.0);
  visit_float(means, [&](const auto* p) {
    torch::stable::parallel_for(0, d, 1024, [&](int64_t j0, int64_t j1) {
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = j0; j < j1; ++j) sum[j] += static_cast<double>(p[k * d + j]);
      }
    });
  });
  for (auto& s : sum) s /= static_cast<double>(K);
  return sum;
}

// Inputs of one call in the compute type (all small except x - ctr).
template <class T>
struct MixtureData {
  const MixtureArgs* a;
  Tensor xr;                      // x - ctr   [B, d]
  std::vector<T> xnorm, s2, ctr;  // [B], [B], [d]
  std::vector<T> eig;             // [K, r]
  std::vector<T> lw, lp;          // [K] or empty
  Tensor means, bases;            // any strides, any float dtype (bases undefined when r = 0)
  bool score;
  T* logits;                      // [B, K] when the posterior weights are asked for, else null
};

// One worker's streaming state and scratch buffers.
template <class T>
struct Partial {
  std::vector<T> run_max, run_sum, run_x;  // [B]
  Tensor acc;                              // [B, d]
  Tensor m_buf, u_buf;                     // M [C, d]; U_flat [d, C r] when it cannot be a view
  Tensor xw_buf, p_buf;                    // [x.M | U_flat^T (x - ctr)], [p cm | p g c]   [B, C (1 + r)]
  Tensor step_buf, step_u_buf;             // (p cm) M, (p g c) U_flat^T                    [B, d]
  std::vector<T> mnorm, t, logit, alpha;   // [C], [C r], [C], [B]
};

// Streams the components [k0, k0 + kc) into the state (see the header comment).
template <class T>
void accumulate_chunk(const MixtureData<T>& in, Partial<T>& st, int64_t k0, int64_t kc) {
  const MixtureArgs& a = *in.a;
  const int64_t B = a.batch, d = a.dim, r = a.rank, width = kc * (1 + r);
  const bool full_rank = r == d, has_lp = !in.lp.empty(), score = in.score;
  const T exp_floor = std::is_same_v<T, double> ? T(-700) : T(-80);
  // M = mu - ctr, widened, and ||mu_i - ctr||^2.
  T* M = st.m_buf.template mutable_data_ptr<T>();
  const auto [means_c, m_off] = contiguous_rows(in.means, k0, kc);
  visit_float(means_c, [&](const auto* pm) {
    for (int64_t i = 0; i < kc; ++i) {
      const auto* m_i = pm + m_off + i * d;
      for (int64_t j = 0; j < d; ++j) M[i * d + j] = static_cast<T>(m_i[j]) - in.ctr[j];
      st.mnorm[i] = dot(M + i * d, M + i * d, d);
    }
  });
  const Tensor m_mat = strided<T>(st.m_buf, M, kc, d, d, 1);
  // U_flat [d, C r] with element (j, i r + k) = (U_i)_jk at U[j uj + (i r + k) uc], and t_i = U_i^T M_i.
  Tensor u_flat;
  const T* U = nullptr;
  int64_t uj = 0, uc = 0;
  if (r > 0) {
    const Tensor& bs = in.bases;
    if (bs.scalar_type() == torch::headeronly::CppTypeToScalarType<T>::value && bs.stride(0) == r * bs.stride(2)) {
      U = static_cast<const T*>(bs.const_data_ptr()) + k0 * bs.stride(0);
      uj = bs.stride(1);
      uc = bs.stride(2);
      u_flat = strided<T>(bs, const_cast<T*>(U), d, kc * r, uj, uc);
    } else {
      T* dst = st.u_buf.template mutable_data_ptr<T>();
      const auto [bases_c, u_off] = contiguous_rows(bs, k0, kc);
      visit_float(bases_c, [&](const auto* pu) {
        for (int64_t i = 0; i < kc; ++i) {
          const auto* u_i = pu + u_off + i * d * r;
          for (int64_t j = 0; j < d; ++j) {
            for (int64_t k = 0; k < r; ++k) dst[j * kc * r + i * r + k] = static_cast<T>(u_i[j * r + k]);
          }
        }
      });
      U = dst;
      uj = kc * r;
      uc = 1;
      u_flat = strided<T>(st.u_buf, dst, d, kc * r, uj, uc);
    }
    if (uj == 1) {  // columns of U_flat are contiguous
      for (int64_t col = 0; col < kc * r; ++col) st.t[col] = dot(M + (col / r) * d, U + col * uc, d);
    } else {
      std::fill(st.t.begin(), st.t.begin() + kc * r, T(0));
      for (int64_t j = 0; j < d; ++j) {
        const T* u_row = U + j * uj;
        for (int64_t i = 0; i < kc; ++i) {
          const T m = M[i * d + j];
          for (int64_t k = 0; k < r; ++k) st.t[i * r + k] += m * u_row[(i * r + k) * uc];
        }
      }
    }
  }
  T* XW = st.xw_buf.template mutable_data_ptr<T>();
  T* P = st.p_buf.template mutable_data_ptr<T>();
  mm_out(strided<T>(st.xw_buf, XW, B, kc, width, 1), in.xr, strided<T>(st.m_buf, M, d, kc, 1, d));
  if (r > 0) mm_out(strided<T>(st.xw_buf, XW + kc, B, kc * r, width, 1), in.xr, u_flat);
  const T* eig = in.eig.data() + k0 * r;
  for (int64_t b = 0; b < B; ++b) {
    T* xw_row = XW + b * width;  // [x.M_i | U_i^T (x - ctr)], the second part becomes c_i in place
    T* p_row = P + b * width;
    const T s2 = in.s2[b];
    const T s2c = std::clamp<T>(s2, kVarLo, kVarHi);  // sigma^2 clamped to [FLT_MIN, FLT_MAX]
    // Logits log N_i + d/2 log(2 pi sigma^2) + log pi_i (the row constant is added at the end). The
    // log-determinant is taken relative to the isotropic sigma^2 I as sum log1p(lam / s^2), so the
    // logits stay O(1) at large sigma instead of carrying a common d log(sigma^2) that would cost the
    // posterior weights eps d log(sigma^2).
    T row_max = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < kc; ++i) {
      T q = std::max<T>(in.xnorm[b] + st.mnorm[i] + T(-2) * xw_row[i], 0);  // ||x - mu_i||^2, centred
      T quad = 0, logdet = 0;
      if (r > 0) {
        T c_sq_sum = 0;
        for (int64_t k = 0; k < r; ++k) {
          T& c = xw_row[kc + i * r + k];
          c -= st.t[i * r + k];  // c_ik = U_i^T (x - mu_i)
          const T c_sq = c * c;
          const T v = std::clamp<T>(eig[i * r + k] + s2, kVarLo, kVarHi);
          quad += c_sq / v;
          logdet += std::log1p(std::min<T>(eig[i * r + k] / s2c, kVarHi));
          c_sq_sum += c_sq;
        }
        if (!full_rank) q = std::max<T>(q - c_sq_sum, 0);  // q_i - p_i, the off-subspace residual
      }
      if (!full_rank) {
        T vp = s2c;  // lam_perp_i + sigma^2 (lam_perp = 0: log1p(0) = 0)
        if (has_lp) {
          const T lp = in.lp[k0 + i];
          vp = std::clamp<T>(lp + s2, kVarLo, kVarHi);
          logdet += std::log1p(std::min<T>(lp / s2c, kVarHi)) * static_cast<T>(d - r);
        }
        quad += q / vp;
      }
      T logit = T(-0.5) * (std::min<T>(quad, kQuadMax) + logdet);
      if (!in.lw.empty()) logit += in.lw[k0 + i];
      st.logit[i] = logit;
      row_max = std::max(row_max, logit);
      if (in.logits) in.logits[b * a.n_comp + k0 + i] = logit;
    }
    // Online log-sum-exp (an all -inf state stays NaN-free: shift 0, alpha = p = 0).
    const T m_new = std::max(st.run_max[b], row_max);
    const T shift = m_new == -std::numeric_limits<T>::infinity() ? T(0) : m_new;
    const T alpha = std::exp(st.run_max[b] - shift);
    st.alpha[b] = alpha;
    st.run_max[b] = m_new;
    T p_sum = 0, x_coef = 0;
    for (int64_t i = 0; i < kc; ++i) {
      // Weights below e^exp_floor relative to the max are exactly 0 instead of subnormal floats (which
      // run ~50x slower on x86 and change D by < K e^exp_floor relative).
      const T arg = st.logit[i] - shift;
      const T p = arg < exp_floor ? T(0) : std::exp(arg);
      p_sum += p;
      // Each component adds p_i [cm_i (mu_i - ctr) + cx_i (x - ctr) + U_i (g_i * c_i)] to the state, with
      // the coefficients of D_i - ctr (denoiser) or of the score term (docs/math.md section 3 rearranged
      // so that no factor is a difference of nearly equal numbers; vp = lam_perp + s^2, v = lam + s^2,
      // clamped):
      //              cm_i            cx_i               g_ik
      //   denoiser:  s^2 / vp_i      lam_perp_i / vp_i  s^2 (lam_ik - lam_perp_i) / (v_ik vp_i)  (= 1-a, a, b-a)
      //   score:     1 / vp_i        -1 / vp_i          (lam_ik - lam_perp_i) / (v_ik vp_i)      (the same / s^2)
      //   r = d:     1 | 0           0 | 0              lam_ik / v_ik | -1 / v_ik                (no complement)
      // The denoiser is never formed as x + (D - x) (cancels at large sigma), nor the score as
      // (D - x) / s^2 (cancels at small sigma).
      T vp = s2c;
      if (full_rank) {
        p_row[i] = score ? T(0) : p;
      } else if (has_lp) {
        const T lp = in.lp[k0 + i];
        vp = std::clamp<T>(lp + s2, kVarLo, kVarHi);
        const T inv_vp = T(1) / vp;
        p_row[i] = score ? p * inv_vp : p * (s2c * inv_vp);
        x_coef += score ? -p * inv_vp : p * (lp * inv_vp);
      } else {
        p_row[i] = score ? p / vp : p;  // lam_perp = 0: cm = 1 / s^2 (score) or 1, cx = -1 / s^2 or 0
      }
      for (int64_t k = 0; k < r; ++k) {
        const T lam = eig[i * r + k];
        const T v = std::clamp<T>(lam + s2, kVarLo, kVarHi);
        T g;
        if (full_rank) {
          g = score ? T(-1) / v : lam / v;
        } else {
          g = (has_lp ? lam - in.lp[k0 + i] : lam) / (v * vp);
          if (!score) g = g * s2c;
        }
        p_row[kc + i * r + k] = p * g * xw_row[kc + i * r + k];
      }
    }
    if (!full_rank && !has_lp && score) x_coef = -(p_sum / s2c);
    st.run_sum[b] = st.run_sum[b] * alpha + p_sum;
    st.run_x[b] = st.run_x[b] * alpha + x_coef;
  }
  // acc = alpha acc + (p cm) M + (p g c) U_flat^T (the GEMMs into scratch, the rescale fused into the add).
  T* acc = st.acc.template mutable_data_ptr<T>();
  const bool has_m_term = !(full_rank && score);
  const T* S = st.step_buf.template const_data_ptr<T>();
  const T* SU = r > 0 ? st.step_u_buf.template const_data_ptr<T>() : nullptr;
  if (has_m_term) mm_out(strided<T>(st.step_buf, const_cast<T*>(S), B, d, d, 1), strided<T>(st.p_buf, P, B, kc, width, 1), m_mat);
  if (r > 0) {
    mm_out(strided<T>(st.step_u_buf, const_cast<T*>(SU), B, d, d, 1), strided<T>(st.p_buf, P + kc, B, kc * r, width, 1),
           strided<T>(st.acc, const_cast<T*>(U), kc * r, d, uc, uj));
  }
  for (int64_t b = 0; b < B; ++b) {
    const T alpha = st.alpha[b];
    for (int64_t j = 0; j < d; ++j) {
      T v = acc[b * d + j] * alpha;
      if (has_m_term) v += S[b * d + j];
      if (r > 0) v += SU[b * d + j];
      acc[b * d + j] = v;
    }
  }
}

// The chunks are split over S = min(threads, chunks) workers, each streaming its own range into its own
// partial state with single-threaded BLAS (no fork/join per chunk); the S states are merged exactly:
//   M = max_s m_s,  e_s = exp(m_s - M),  W = sum_s e_s l_s,
//   D - ctr = (sum_s e_s acc_s + (sum_s e_s a_s)(x - ctr)) / W,   log_z = M + log W.
template <class T>
std::tuple<Tensor, Tensor, Tensor> mixture_forward(const MixtureArgs& a, const Tensor& x,
                                                   const std::optional<Tensor>& log_weights, const Tensor& means,
                                                   const std::optional<Tensor>& bases,
                                                   const std::optional<Tensor>& eigvals,
                                                   const std::optional<Tensor>& lam_perp, const Tensor& sigma,
                                                   const std::optional<Tensor>& center, bool score,
                                                   bool return_weights, int64_t chunk_size) {
  const int64_t B = a.batch, d = a.dim, K = a.n_comp, r = a.rank;
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t chunk = pick_chunk(chunk_size, a, threads);
  const ScalarType ct = a.ctype;

  MixtureData<T> in;
  in.a = &a;
  in.score = score;
  in.means = means;  // read in place with its strides (a contiguous copy would be a pass over K d (1 + r))
  if (bases) in.bases = *bases;
  {
    const std::vector<double> c = center ? to_vector<double>(*center) : mean_of_means(dense(means));
    in.ctr.assign(c.begin(), c.end());
  }
  in.xr = new_tensor<T>({B, d});
  in.xnorm.assign(static_cast<size_t>(B), T(0));
  {
    T* xr = in.xr.template mutable_data_ptr<T>();
    visit_float(dense(x), [&](const auto* px) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < d; ++j) xr[b * d + j] = static_cast<T>(px[b * d + j]) - in.ctr[j];
        in.xnorm[b] = dot(xr + b * d, xr + b * d, d);
      }
    });
  }
  in.s2 = sigma_rows<T>(sigma, B);
  for (auto& s : in.s2) s = s * s;
  if (log_weights) in.lw = to_vector<T>(*log_weights);
  if (lam_perp) in.lp = to_vector<T>(*lam_perp);
  if (r > 0) in.eig = to_vector<T>(*eigvals);
  Tensor weights = return_weights ? new_tensor<T>({B, K}) : torch::stable::empty({0}, ct);
  in.logits = return_weights ? weights.template mutable_data_ptr<T>() : nullptr;

  const int64_t n_chunks = (K + chunk - 1) / chunk;
  const int64_t n_split = std::max<int64_t>(1, std::min<int64_t>(threads, n_chunks));
  const int64_t per_split = (n_chunks + n_split - 1) / n_split;
  std::vector<Partial<T>> parts(static_cast<size_t>(n_split));
  const int64_t width = chunk * (1 + r);
  // Buffers are allocated by the calling thread (the workers only call the GEMMs).
  for (auto& st : parts) {
    st.run_max.assign(B, -std::numeric_limits<T>::infinity());
    st.run_sum.assign(B, T(0));
    st.run_x.assign(B, T(0));
    st.acc = new_tensor<T>({B, d});
    std::fill_n(st.acc.template mutable_data_ptr<T>(), B * d, T(0));
    st.m_buf = new_tensor<T>({chunk * d});
    if (r > 0) st.u_buf = new_tensor<T>({chunk * r * d});
    st.xw_buf = new_tensor<T>({B * width});
    st.p_buf = new_tensor<T>({B * width});
    st.step_buf = new_tensor<T>({B * d});
    if (r > 0) st.step_u_buf = new_tensor<T>({B * d});
    st.mnorm.resize(chunk);
    st.t.resize(chunk * r);
    st.logit.resize(chunk);
    st.alpha.resize(B);
  }
  if (B > 0) {
    torch::stable::parallel_for(0, n_split, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t c = s * per_split, c1 = std::min(n_chunks, (s + 1) * per_split); c < c1; ++c) {
          accumulate_chunk(in, parts[s], c * chunk, std::min(chunk, K - c * chunk));
        }
      }
    });
  }

  Tensor out = new_tensor<T>({B, d});
  Tensor log_z = new_tensor<T>({B});
  T* po = out.template mutable_data_ptr<T>();
  T* pz = log_z.template mutable_data_ptr<T>();
  const T* xr = in.xr.template const_data_ptr<T>();
  std::vector<T> e(static_cast<size_t>(n_split));
  std::vector<const T*> accs;
  for (const auto& st : parts) accs.push_back(st.acc.template const_data_ptr<T>());
  for (int64_t b = 0; b < B; ++b) {
    T top = -std::numeric_limits<T>::infinity();
    for (const auto& st : parts) top = std::max(top, st.run_max[b]);
    const T shift = top == -std::numeric_limits<T>::infinity() ? T(0) : top;
    T total = 0, x_coef = 0;
    for (int64_t s = 0; s < n_split; ++s) {
      e[s] = std::exp(parts[s].run_max[b] - shift);  // 0 for a split with no weight
      total += e[s] * parts[s].run_sum[b];
      x_coef += e[s] * parts[s].run_x[b];
    }
    const T inv_total = total > 0 ? T(1) / total : T(0);
    // D - ctr (or the score) = (sum_s e_s acc_s + (sum_s e_s cx_s)(x - ctr)) / W.
    for (int64_t j = 0; j < d; ++j) {
      T num = 0;
      for (int64_t s = 0; s < n_split; ++s) num += e[s] * accs[s][b * d + j];
      const T centred = (num + x_coef * xr[b * d + j]) * inv_total;
      po[b * d + j] = score ? centred : centred + in.ctr[j];
    }
    // log_z = M + log W - d/2 log(2 pi sigma^2) (the row constant is left out of the streamed logits); a
    // row whose every weight is zero gets W = 0 -> log_z = -inf and D = ctr.
    pz[b] = (shift + std::log(total)) -
            T(0.5) * static_cast<T>(d) * (std::log(std::clamp<T>(in.s2[b], kVarLo, kVarHi)) + T(kLog2Pi));
    // Weights as exp(logit - M) / W, not exp(logit - log_z): M is one of the logits, so the difference is
    // exact where it matters, while log_z carries an absolute rounding error eps |log_z|.
    if (in.logits) {
      for (int64_t k = 0; k < K; ++k) in.logits[b * K + k] = std::exp(in.logits[b * K + k] - shift) * inv_total;
    }
  }
  if (x.scalar_type() != ct) out = torch::stable::to(out, x.scalar_type());
  if (x.dim() != 2) out = torch::stable::view(out, x.sizes());
  return {out, log_z, weights};
}

std::tuple<Tensor, Tensor, Tensor> mixture_forward_cpu(const Tensor& x, const std::optional<Tensor>& log_weights,
                                                       const Tensor& means, const char* means_name,
                                                       const std::optional<Tensor>& bases,
                                                       const std::optional<Tensor>& eigvals,
                                                       const std::optional<Tensor>& lam_perp, const Tensor& sigma,
                                                       const std::optional<Tensor>& center, bool score,
                                                       bool return_weights, int64_t chunk_size) {
  const auto a = check_mixture(x, log_weights, means, means_name, bases, eigvals, lam_perp, sigma, center, chunk_size);
  return a.ctype == ScalarType::Double
             ? mixture_forward<double>(a, x, log_weights, means, bases, eigvals, lam_perp, sigma, center, score,
                                       return_weights, chunk_size)
             : mixture_forward<float>(a, x, log_weights, means, bases, eigvals, lam_perp, sigma, center, score,
                                      return_weights, chunk_size);
}

std::tuple<Tensor, Tensor, Tensor> gmm_forward_cpu(Tensor x, Tensor log_weights, Tensor means,
                                                   std::optional<Tensor> bases, std::optional<Tensor> eigvals,
                                                   std::optional<Tensor> lam_perp, Tensor sigma,
                                                   std::optional<Tensor> center, bool score, bool return_weights,
                                                   int64_t chunk_size) {
  return mixture_forward_cpu(x, log_weights, means, "means", bases, eigvals, lam_perp, sigma, center, score,
                             return_weights, chunk_size);
}

std::tuple<Tensor, Tensor> delta_mixture_forward_cpu(Tensor x, Tensor points, std::optional<Tensor> log_weights,
                                                     Tensor sigma, std::optional<Tensor> center, bool score,
                                                     int64_t chunk_size) {
  auto [out, log_z, w] = mixture_forward_cpu(x, log_weights, points, "points", std::nullopt, std::nullopt,
                                             std::nullopt, sigma, center, score, false, chunk_size);
  return {out, log_z};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(gsa, CPU, m) {
  m.impl("gmm_forward", TORCH_BOX(&gmm_forward_cpu));
  m.impl("delta_mixture_forward", TORCH_BOX(&delta_mixture_forward_cpu));
}

}  // namespace gsa
