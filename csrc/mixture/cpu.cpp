// CPU kernels of the mixture ops (docs/math.md section 3): GMM and delta-mixture (training-set)
// denoisers/scores with a streaming log-sum-exp over chunks of components, and their vector-Jacobian
// products (docs/math.md section 3.4) as a second streaming pass.
//
// Per chunk of C components (chunk_frame) the kernel works in the chunk's own frame c_k (its mean), in
// the compute type T (float64 if any input is float64, else float32; half/bfloat16 components are
// widened one chunk at a time):
//   M = mu[chunk] - c_k [C, d],  x' = x - c_k [B, d],  x'.M^T and x'.U_flat by GEMMs (float64 loops for
//   d <= kDirectDim),  c_i = U_i^T (x - mu_i)
// and the logits as float64 numbers per (row, component) (chunk_weights): the per-row distance
// ||x - ctr||^2 is kept out of them (docs/math.md section 3.2) and the chunk's offset
// ||x - c_k||^2 - ||x - ctr||^2 is exact in float64. The online log-sum-exp gives p = exp(logit - max);
// the coefficients of D_i (or of the score term) go into [blocks B, C (1 + r)] and two GEMMs add them
// into the [blocks B, d] accumulators (chunk_accumulate): one block for the forward, three for the VJP.
// The chunks are divided among T = get_num_threads() workers (torch::stable::parallel_for), each with
// its own state, merged exactly at the end (stream_chunks). Extra memory is
// O(T (B d + B C (1 + r) + C d (1 + r))); nothing of shape [B, K, d] or [B, K] exists (except the
// posterior weights [B, K] when asked for).
//
// Robustness: variances are clamped to [FLT_MIN, FLT_MAX], squared norms are float64, a residual made
// negative by rounding is clamped and an unrepresentable one becomes the largest quadratic form, so
// finite input never produces NaN logits; the online update guards the all -inf case.
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
  GSA_CHECK(dim >= 1, "x must have d >= 1 values per row, got shape ", shape_of(x));
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
  // Per component: [B, 1 + r] GEMM outputs and coefficients, plus a float64 [B] logit column.
  int64_t c = std::min(budget / std::max<int64_t>(a.dim * width, 1), budget / std::max<int64_t>(a.batch * (width + 2), 1));
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

// Up to this dimension the chunk's cross terms are float64 loops instead of a GEMM in T: the GEMM would
// not pay off, and in low dimension a query's nearest points sit far closer than the spread of the chunk,
// where only an exact expansion keeps the logits right at small sigma.
constexpr int64_t kDirectDim = 16;
constexpr double kQuadMaxD = 1e300;  // float64 logits: clamp only what would overflow

// Inputs of one call (all small except the [B, d] copies of x).
template <class T>
struct MixtureData {
  const MixtureArgs* a;
  Tensor xt;                        // x in T [B, d]
  std::vector<double> xr;           // x - ctr in float64 [B, d]
  std::vector<double> rho;          // ||x - ctr||^2 in float64 [B]
  std::vector<T> s2;                // sigma^2 [B]
  std::vector<double> ctr;          // the output frame [d]
  std::vector<T> eig;               // [K, r]
  std::vector<T> lw, lp;            // [K] or empty
  Tensor means, bases;              // any strides, any float dtype (bases undefined when r = 0)
  bool score = false;
  bool drop_rho = false;            // all components share lam_perp: rho / (2 vp) is a row constant -> log_z
  double* logits = nullptr;         // [B, K] float64 logits when the posterior weights are asked for
  // The VJP pass (docs/math.md section 3.4): frame F [B, d] (any point close to D), cotangent v [B, d].
  const T* frame = nullptr;
  const T* v = nullptr;
  std::vector<double> vxf;          // v.(x - F) [B]
  int64_t blocks() const { return v ? 3 : 1; }
};

// One worker's streaming state and scratch buffers.
template <class T>
struct Partial {
  std::vector<double> run_max, run_sum;    // [B]
  std::vector<int64_t> run_arg;            // [B] the component holding run_max (-1: none yet)
  Tensor acc;                              // [blocks B, d]
  Tensor m_buf, u_buf, xk_buf;             // M = mu - c_k [C, d]; U_flat [d, C r] when not a view; x - c_k [B, d]
  Tensor xw_buf, vw_buf, p_buf;            // [x'.M | U^T x'], [v.M | U^T v]  [B, C (1 + r)]; coefficients [blocks B, C (1 + r)]
  Tensor step_buf, step_u_buf;             // [blocks B, d]
  std::vector<T> ck, ckd_t, t;             // c_k [d], c_k - ctr [d], U_i^T M_i [C r]
  std::vector<double> ckd, mnorm;          // c_k - ctr [d], ||M_i||^2 [C]
  double m_max = 0;                        // max_i ||M_i|| of the chunk
  Tensor chunk_means;                      // the chunk's rows (contiguous) at element offset chunk_off
  int64_t chunk_off = 0;
  std::vector<double> xk_row;              // float64 x - c_k of one row [d] (exact cross terms)
  std::vector<double> local;               // [B C]: cross terms, then the logits, then the weights p
  std::vector<double> xk_d, m_d;           // float64 x - c_k, M (d <= kDirectDim)
  std::vector<double> dlt, vck;            // ||x - c_k||^2 - rho [B]; v.(c_k - F) [B]
  std::vector<T> alpha, chunk_x, chunk_c;  // [B]; [blocks B] coefficients of x - c_k (VJP block 2: of v) and c_k - frame
};

// Partial sums in independent lanes: the additions leave one dependency chain and vectorize.
constexpr int64_t kLanes = 16;

// c = the mean of the n rows of m [n, d], in T. Summed as differences from the first row, so the rounding
// scales with the rows' spread, not their distance from the origin (c only has to lie near the rows: it
// is a frame, and every difference taken against it is exact in float64).
template <class S, class T>
void chunk_mean(const S* m, int64_t n, int64_t d, T* c) {
  std::fill_n(c, d, T(0));
  for (int64_t i = 1; i < n; ++i) {
    const S* row = m + i * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) c[j] += static_cast<T>(row[j]) - static_cast<T>(m[j]);
  }
  const T inv_n = T(1) / static_cast<T>(n);
  for (int64_t j = 0; j < d; ++j) c[j] = static_cast<T>(m[j]) + c[j] * inv_n;
}

// out = m - c (in T) and ||out||^2, one pass over the row.
template <class S, class T>
T shift_row(const S* m, const T* c, T* out, int64_t d) {
  T part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const T v = static_cast<T>(m[j + u]) - c[j + u];
      out[j + u] = v;
      part[u] += v * v;
    }
  }
  for (; j < d; ++j) {
    const T v = static_cast<T>(m[j]) - c[j];
    out[j] = v;
    part[0] += v * v;
  }
  T sum = 0;
  for (const T v : part) sum += v;
  return sum;
}

// Frame of the chunk [k0, k0 + kc): c_k = the mean of its rows, M = mu - c_k, x' = x - c_k, the cross
// terms ||M_i||^2 - 2 x'.M_i (GEMM in T, or float64 loops for small d), c_i = U_i^T (x - mu_i) (in
// place in xw), and the exact per-row difference dlt = ||x - c_k||^2 - ||x - ctr||^2 in float64
// (docs/math.md section 3.2).
template <class T>
void chunk_frame(const MixtureData<T>& in, Partial<T>& st, int64_t k0, int64_t kc, Tensor& u_flat, const T*& U,
                 int64_t& uj, int64_t& uc) {
  const MixtureArgs& a = *in.a;
  const int64_t B = a.batch, d = a.dim, r = a.rank, width = kc * (1 + r);
  const bool direct = d <= kDirectDim;
  T* M = st.m_buf.template mutable_data_ptr<T>();
  const auto [means_c, m_off] = contiguous_rows(in.means, k0, kc);
  st.chunk_means = means_c;
  st.chunk_off = m_off;
  visit_float(means_c, [&](const auto* pm) {
    chunk_mean(pm + m_off, kc, d, st.ck.data());
    for (int64_t j = 0; j < d; ++j) {
      st.ckd[j] = static_cast<double>(st.ck[j]) - in.ctr[j];
      st.ckd_t[j] = static_cast<T>(st.ckd[j]);
    }
    for (int64_t i = 0; i < kc; ++i) {
      const auto* m_i = pm + m_off + i * d;
      if (direct) {
        double nrm = 0;
        for (int64_t j = 0; j < d; ++j) {
          M[i * d + j] = static_cast<T>(m_i[j]) - st.ck[j];
          st.m_d[i * d + j] = static_cast<double>(m_i[j]) - static_cast<double>(st.ck[j]);
          nrm += st.m_d[i * d + j] * st.m_d[i * d + j];
        }
        st.mnorm[i] = nrm;
      } else {
        st.mnorm[i] = static_cast<double>(shift_row(m_i, st.ck.data(), M + i * d, d));
      }
    }
  });
  st.m_max = std::sqrt(*std::max_element(st.mnorm.begin(), st.mnorm.begin() + kc));
  double ck_sq = 0;
  for (int64_t j = 0; j < d; ++j) ck_sq += st.ckd[j] * st.ckd[j];
  T* xk = st.xk_buf.template mutable_data_ptr<T>();
  const T* xt = in.xt.template const_data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    double cross = 0, vck = 0;
    for (int64_t j = 0; j < d; ++j) {
      xk[b * d + j] = xt[b * d + j] - st.ck[j];
      if (direct) st.xk_d[b * d + j] = static_cast<double>(xt[b * d + j]) - static_cast<double>(st.ck[j]);
      cross += in.xr[b * d + j] * st.ckd[j];
      if (in.v) vck += static_cast<double>(in.v[b * d + j]) * (static_cast<double>(st.ck[j]) - in.frame[b * d + j]);
    }
    st.dlt[b] = ck_sq - 2 * cross;  // ||x - c_k||^2 - ||x - ctr||^2, exact to float64 rounding
    st.vck[b] = vck;
  }
  // U_flat [d, C r] with element (j, i r + k) = (U_i)_jk at U[j uj + (i r + k) uc], and t_i = U_i^T M_i.
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
  const Tensor xk_mat = strided<T>(st.xk_buf, xk, B, d, d, 1);
  const Tensor mt = strided<T>(st.m_buf, M, d, kc, 1, d);
  if (direct) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < kc; ++i) {
        double s = 0;
        for (int64_t j = 0; j < d; ++j) s += st.m_d[i * d + j] * (st.m_d[i * d + j] - 2 * st.xk_d[b * d + j]);
        st.local[b * kc + i] = s;
      }
    }
  } else {
    mm_out(strided<T>(st.xw_buf, XW, B, kc, width, 1), xk_mat, mt);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < kc; ++i) st.local[b * kc + i] = st.mnorm[i] - 2 * static_cast<double>(XW[b * width + i]);
    }
  }
  if (r > 0) mm_out(strided<T>(st.xw_buf, XW + kc, B, kc * r, width, 1), xk_mat, u_flat);
  if (in.v) {
    T* VW = st.vw_buf.template mutable_data_ptr<T>();
    const Tensor v_mat = strided<T>(st.xk_buf, const_cast<T*>(in.v), B, d, d, 1);
    mm_out(strided<T>(st.vw_buf, VW, B, kc, width, 1), v_mat, mt);
    if (r > 0) mm_out(strided<T>(st.vw_buf, VW + kc, B, kc * r, width, 1), v_mat, u_flat);
  }
}

// log pi_i + log N_i + d/2 log(2 pi sigma^2) of component i in float64 from q = ||x - mu_i||^2 (less rho when
// drop_rho; q_lo is then -rho, else 0) and c = U_i^T (x - mu_i) [r].
template <class T, class C>
double component_logit(const MixtureData<T>& in, int64_t comp, double s2, double q, double q_lo, const C* c) {
  const MixtureArgs& a = *in.a;
  const int64_t d = a.dim, r = a.rank;
  const double s2c = std::clamp<double>(s2, kVarLo, kVarHi);
  const T* eig = in.eig.data() + comp * r;
  double quad = 0, logdet = 0;
  if (r > 0) {
    double c_sq_sum = 0;
    for (int64_t k = 0; k < r; ++k) {
      const double c_sq = static_cast<double>(c[k]) * static_cast<double>(c[k]);
      const double v = std::clamp<double>(eig[k] + s2, kVarLo, kVarHi);
      quad += c_sq / v;
      logdet += std::log1p(std::min<double>(eig[k] / s2c, kVarHi));
      c_sq_sum += c_sq;
    }
    q -= c_sq_sum;  // the off-subspace residual q_i - p_i
  }
  if (r < d) {
    q = std::isnan(q) ? kQuadMaxD : std::max(q, q_lo);
    double vp = s2c;
    if (!in.lp.empty()) {
      const double lp = in.lp[comp];
      vp = std::clamp<double>(lp + s2, kVarLo, kVarHi);
      logdet += std::log1p(std::min<double>(lp / s2c, kVarHi)) * static_cast<double>(d - r);
    }
    quad += q / vp;
  }
  double logit = -0.5 * (std::min(quad, kQuadMaxD) + logdet);
  if (std::isnan(logit)) logit = -0.5 * kQuadMaxD;
  if (!in.lw.empty()) logit += in.lw[comp];
  return logit;
}

// Float32 cross terms ||M_i||^2 - 2 (x - c_k).M_i carry a rounding of about eps ||x - c_k|| ||M_i|| (a
// GEMM), i.e. up to err = eps ||x - c_k|| max_i ||M_i|| / sigma^2 in the logits of the chunk: large where
// a chunk's points spread far (relative to sigma) around a frame far from the query. Only the components
// within kNegligible of the row's best logit carry weight, and independent rounding errors average out
// over the n_eff components that share it; where the chunk's share of the posterior times err / sqrt(n_eff)
// exceeds kCrossTol, the logits of those components (usually a handful) are recomputed from float64 cross
// terms over the exact differences.
constexpr double kCrossTol = 1e-4;     // estimated rounding of the weighted mean of a chunk's relative logits
constexpr double kNegligible = 30.0;   // a component this far below the best logit carries no weight
constexpr double kGemmRounding = 4.0;  // the float32 GEMM's rounding in units of eps ||a|| ||b||

// The estimated rounding err of row b's cross terms in the chunk's logits (0 where they are float64).
template <class T>
double cross_rounding(const MixtureData<T>& in, const Partial<T>& st, int64_t b) {
  if constexpr (!std::is_same_v<T, float>) {
    return 0.0;
  } else {
    if (in.a->dim <= kDirectDim) return 0.0;
    const double xk_norm = std::sqrt(std::max(in.rho[b] + st.dlt[b], 0.0));  // ||x - c_k||
    const double s2 = std::clamp<double>(in.s2[b], kVarLo, kVarHi);
    return kGemmRounding * std::numeric_limits<float>::epsilon() * xk_norm * st.m_max / s2;
  }
}

// ||m - c||^2 - 2 (m - c).xc in float64 for a point m and frame c in T (m - c is exact in float64), in
// kLanes partial sums.
template <class S, class T>
double exact_cross_term(const S* m, const T* c, const double* xc, int64_t d) {
  double part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int64_t u = 0; u < kLanes; ++u) {
      const double mc = static_cast<double>(static_cast<T>(m[j + u])) - static_cast<double>(c[j + u]);
      part[u] += mc * (mc - 2 * xc[j + u]);
    }
  }
  for (; j < d; ++j) {
    const double mc = static_cast<double>(static_cast<T>(m[j])) - static_cast<double>(c[j]);
    part[0] += mc * (mc - 2 * xc[j]);
  }
  double sum = 0;
  for (const double v : part) sum += v;
  return sum;
}

// Row b's logits in st.local that can carry weight, recomputed where their float32 rounding could reach
// the output (docs/math.md section 3.2): ||M_i||^2 - 2 (x_b - c_k).M_i in float64 over the exact
// differences (x, mu_i and c_k are T numbers, so x - c_k and mu_i - c_k are exact in float64). row_max /
// row_arg follow.
template <class T>
void refine_logits(const MixtureData<T>& in, Partial<T>& st, int64_t b, int64_t k0, int64_t kc, double row_q,
                   double q_lo, const T* xw_row, double& row_max, int64_t& row_arg) {
  const double err = cross_rounding(in, st, b);
  if (!(err > kCrossTol) || !(row_max > st.run_max[b] - kNegligible)) return;
  double* logit = st.local.data() + b * kc;
  const double floor = std::max(row_max, st.run_max[b]) - kNegligible - 2 * err;  // true logits within err
  double p_sum = 0, p_sq = 0;
  for (int64_t i = 0; i < kc; ++i) {
    if (logit[i] < floor) continue;
    const double p = std::exp(logit[i] - row_max);
    p_sum += p;
    p_sq += p * p;
  }
  // The chunk's share of the posterior so far bounds its final share (the total only grows).
  const double m_new = std::max(row_max, st.run_max[b]);
  const double chunk_w = p_sum * std::exp(row_max - m_new);
  const double share = chunk_w / (chunk_w + st.run_sum[b] * std::exp(st.run_max[b] - m_new));
  if (share * err * std::sqrt(p_sq) / p_sum <= kCrossTol) return;  // share err / sqrt(n_eff)
  const int64_t d = in.a->dim, r = in.a->rank;
  const T* xb = in.xt.template const_data_ptr<T>() + b * d;
  for (int64_t j = 0; j < d; ++j) st.xk_row[j] = static_cast<double>(xb[j]) - static_cast<double>(st.ck[j]);
  row_max = -std::numeric_limits<double>::infinity();
  visit_float(st.chunk_means, [&](const auto* pm) {
    for (int64_t i = 0; i < kc; ++i) {
      if (logit[i] < floor) continue;
      const double cross = exact_cross_term(pm + st.chunk_off + i * d, st.ck.data(), st.xk_row.data(), d);
      logit[i] = component_logit(in, k0 + i, in.s2[b], row_q + cross, q_lo, xw_row + kc + i * r);
      if (logit[i] > row_max) {
        row_max = logit[i];
        row_arg = k0 + i;
      }
    }
  });
}

// float64 logits of the chunk (component_logit) and the online log-sum-exp step: p = exp(logit - running
// max) in T, alpha the rescale; run_arg follows the component of the running max.
template <class T>
void chunk_weights(const MixtureData<T>& in, Partial<T>& st, int64_t k0, int64_t kc) {
  const MixtureArgs& a = *in.a;
  const int64_t B = a.batch, d = a.dim, r = a.rank, width = kc * (1 + r);
  const double exp_floor = std::is_same_v<T, double> ? -700.0 : -80.0;
  T* XW = st.xw_buf.template mutable_data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    T* xw_row = XW + b * width;
    // ||x - mu_i||^2 = rho + dlt + local_i; rho is left out (and added to log_z) when it is a row constant.
    const double row_q = st.dlt[b] + (in.drop_rho ? 0.0 : in.rho[b]);
    const double q_lo = in.drop_rho ? -in.rho[b] : 0.0;
    double row_max = -std::numeric_limits<double>::infinity();
    int64_t row_arg = -1;
    for (int64_t i = 0; i < kc; ++i) {
      T* c = xw_row + kc + i * r;
      for (int64_t k = 0; k < r; ++k) c[k] -= st.t[i * r + k];  // c_ik = U_i^T (x - mu_i)
      const double logit = component_logit(in, k0 + i, in.s2[b], row_q + st.local[b * kc + i], q_lo, c);
      st.local[b * kc + i] = logit;
      if (logit > row_max) {
        row_max = logit;
        row_arg = k0 + i;
      }
    }
    refine_logits(in, st, b, k0, kc, row_q, q_lo, xw_row, row_max, row_arg);
    if (in.logits) std::copy_n(st.local.data() + b * kc, kc, in.logits + b * a.n_comp + k0);
    // Online log-sum-exp (an all -inf state stays NaN-free: shift 0, alpha = p = 0).
    const double m_new = std::max(st.run_max[b], row_max);
    const double shift = m_new == -std::numeric_limits<double>::infinity() ? 0.0 : m_new;
    const double alpha = std::exp(st.run_max[b] - shift);
    st.alpha[b] = static_cast<T>(alpha);
    if (row_max > st.run_max[b]) st.run_arg[b] = row_arg;
    st.run_max[b] = m_new;
    double p_sum = 0;
    for (int64_t i = 0; i < kc; ++i) {
      // Weights below e^exp_floor relative to the max are exactly 0 instead of subnormal floats (which
      // run ~50x slower on x86 and change D by < K e^exp_floor relative).
      const double arg = st.local[b * kc + i] - shift;
      const T p = arg < exp_floor ? T(0) : static_cast<T>(std::exp(arg));
      st.local[b * kc + i] = p;
      p_sum += p;
    }
    st.run_sum[b] = st.run_sum[b] * alpha + p_sum;
  }
}

// The coefficients of D_i - c (denoiser) or of the score term of component i (docs/math.md section 3,
// rearranged so that no factor is a difference of nearly equal numbers; vp = lam_perp + s^2,
// v = lam + s^2, clamped):
//              cm_i            cx_i               g_ik
//   denoiser:  s^2 / vp_i      lam_perp_i / vp_i  s^2 (lam_ik - lam_perp_i) / (v_ik vp_i)  (= 1-a, a, b-a)
//   score:     1 / vp_i        -1 / vp_i          (lam_ik - lam_perp_i) / (v_ik vp_i)      (the same / s^2)
//   r = d:     1 | 0           0 | 0              lam_ik / v_ik | -1 / v_ik                (no complement)
// The denoiser is never formed as x + (D - x) (cancels at large sigma), nor the score as (D - x) / s^2
// (cancels at small sigma). g is written to g[0..r).
template <class T>
void component_coefs(const MixtureData<T>& in, int64_t comp, T s2, bool score, T& cm, T& cx, T* g) {
  const MixtureArgs& a = *in.a;
  const int64_t r = a.rank;
  const bool full_rank = r == a.dim, has_lp = !in.lp.empty();
  const T s2c = std::clamp<T>(s2, kVarLo, kVarHi);
  T vp = s2c, lp = 0;
  if (full_rank) {
    cm = score ? T(0) : T(1);
    cx = 0;
  } else if (has_lp) {
    lp = in.lp[comp];
    vp = std::clamp<T>(lp + s2, kVarLo, kVarHi);
    const T inv_vp = T(1) / vp;
    cm = score ? inv_vp : s2c * inv_vp;
    cx = score ? -inv_vp : lp * inv_vp;
  } else {
    cm = score ? T(1) / vp : T(1);
    cx = score ? -cm : T(0);
  }
  for (int64_t k = 0; k < r; ++k) {
    const T lam = in.eig[comp * r + k];
    const T v = std::clamp<T>(lam + s2, kVarLo, kVarHi);
    if (full_rank) {
      g[k] = score ? T(-1) / v : lam / v;
    } else {
      g[k] = (lam - lp) / (v * vp);
      if (!score) g[k] = g[k] * s2c;
    }
  }
}

// acc = alpha acc + P[:, :C] M + P[:, C:] U_flat^T + chunk_x (x - c_k) + chunk_c (c_k - frame) over the row
// blocks (the GEMMs into scratch, the rescale fused into the add; VJP block 2 has v in place of x - c_k).
// Every difference is taken in the chunk's frame: mu_i - x = M_i - (x - c_k) loses eps relative to the
// chunk, not to the whole data set.
template <class T>
void chunk_accumulate(const MixtureData<T>& in, Partial<T>& st, int64_t kc, const T* U, int64_t uj, int64_t uc,
                      bool has_m_term) {
  const MixtureArgs& a = *in.a;
  const int64_t B = a.batch, d = a.dim, r = a.rank, width = kc * (1 + r), rows = in.blocks() * B;
  T* P = st.p_buf.template mutable_data_ptr<T>();
  T* M = st.m_buf.template mutable_data_ptr<T>();
  T* acc = st.acc.template mutable_data_ptr<T>();
  const T* S = st.step_buf.template const_data_ptr<T>();
  const T* SU = r > 0 ? st.step_u_buf.template const_data_ptr<T>() : nullptr;
  if (has_m_term) {
    mm_out(strided<T>(st.step_buf, const_cast<T*>(S), rows, d, d, 1), strided<T>(st.p_buf, P, rows, kc, width, 1),
           strided<T>(st.m_buf, M, kc, d, d, 1));
  }
  if (r > 0) {
    mm_out(strided<T>(st.step_u_buf, const_cast<T*>(SU), rows, d, d, 1),
           strided<T>(st.p_buf, P + kc, rows, kc * r, width, 1), strided<T>(st.acc, const_cast<T*>(U), kc * r, d, uc, uj));
  }
  const T* xk = st.xk_buf.template const_data_ptr<T>();
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row % B;
    const T alpha = st.alpha[b], cx = st.chunk_x[row], cc = st.chunk_c[row];
    const T* xvec = row >= 2 * B ? in.v + b * d : xk + b * d;
    for (int64_t j = 0; j < d; ++j) {
      T v = acc[row * d + j] * alpha + cx * xvec[j];
      if (has_m_term) v += S[row * d + j];
      if (r > 0) v += SU[row * d + j];
      if (cc != T(0)) v += cc * (in.frame ? st.ck[j] - in.frame[b * d + j] : st.ckd_t[j]);
      acc[row * d + j] = v;
    }
  }
}

// Streams the components [k0, k0 + kc) into the forward state: acc += sum_i p_i [cm_i M_i + cx_i (x - c_k)
// + (cm_i + cx_i) (c_k - ctr) + U_i (g_i c_i)] (for the score cm + cx = 0: no frame term at all).
template <class T>
void forward_chunk(const MixtureData<T>& in, Partial<T>& st, int64_t k0, int64_t kc) {
  const MixtureArgs& a = *in.a;
  const int64_t B = a.batch, d = a.dim, r = a.rank, width = kc * (1 + r);
  const bool full_rank = r == d;
  Tensor u_flat;
  const T* U = nullptr;
  int64_t uj = 0, uc = 0;
  chunk_frame(in, st, k0, kc, u_flat, U, uj, uc);
  chunk_weights(in, st, k0, kc);
  const T* XW = st.xw_buf.template const_data_ptr<T>();
  T* P = st.p_buf.template mutable_data_ptr<T>();
  std::vector<T> g(static_cast<size_t>(r));
  for (int64_t b = 0; b < B; ++b) {
    T x_coef = 0, c_coef = 0;
    for (int64_t i = 0; i < kc; ++i) {
      const T p = static_cast<T>(st.local[b * kc + i]);
      T cm, cx;
      component_coefs(in, k0 + i, in.s2[b], in.score, cm, cx, g.data());
      P[b * width + i] = p * cm;
      c_coef += p * cm;
      x_coef += p * cx;
      for (int64_t k = 0; k < r; ++k) P[b * width + kc + i * r + k] = p * g[k] * XW[b * width + kc + i * r + k];
    }
    st.chunk_x[b] = x_coef;
    st.chunk_c[b] = c_coef + x_coef;
  }
  chunk_accumulate(in, st, kc, U, uj, uc, /*has_m_term=*/!(full_rank && in.score));
}

// Streams the components into the VJP state (docs/math.md section 3.4), three row blocks with
// beta_i = v.(D_i - F):  [0] sum p beta (D_i - F),  [1] sum p (D_i - F),  [2] sum p A_i v.
template <class T>
void vjp_chunk(const MixtureData<T>& in, Partial<T>& st, int64_t k0, int64_t kc) {
  const MixtureArgs& a = *in.a;
  const int64_t B = a.batch, r = a.rank, width = kc * (1 + r);
  Tensor u_flat;
  const T* U = nullptr;
  int64_t uj = 0, uc = 0;
  chunk_frame(in, st, k0, kc, u_flat, U, uj, uc);
  chunk_weights(in, st, k0, kc);
  const T* XW = st.xw_buf.template const_data_ptr<T>();
  const T* VW = st.vw_buf.template const_data_ptr<T>();
  T* P = st.p_buf.template mutable_data_ptr<T>();
  std::vector<T> g(static_cast<size_t>(r));
  for (int64_t b = 0; b < B; ++b) {
    T* p0 = P + b * width;
    T* p1 = P + (B + b) * width;
    T* p2 = P + (2 * B + b) * width;
    T x0 = 0, x1 = 0, x2 = 0, c0 = 0, c1 = 0;
    for (int64_t i = 0; i < kc; ++i) {
      const T p = static_cast<T>(st.local[b * kc + i]);
      T cm, cx;
      component_coefs(in, k0 + i, in.s2[b], /*score=*/false, cm, cx, g.data());
      // D_i - F = cm M_i + cx (x - c_k) + (cm + cx) (c_k - F) + U_i (g c_i); v.(c_k - F) = vck,
      // v.(x - c_k) = v.(x - F) - vck.
      double beta = static_cast<double>(cm) * (static_cast<double>(VW[b * width + i]) + st.vck[b]) +
                    static_cast<double>(cx) * in.vxf[b];  // = cx (v.(x - c_k) + vck)
      for (int64_t k = 0; k < r; ++k) {
        beta += static_cast<double>(VW[b * width + kc + i * r + k]) * g[k] * XW[b * width + kc + i * r + k];
      }
      const T pb = p * static_cast<T>(beta);
      p0[i] = pb * cm;
      p1[i] = p * cm;
      p2[i] = 0;
      c0 += pb * cm;
      c1 += p * cm;
      x0 += pb * cx;
      x1 += p * cx;
      x2 += p * cx;  // A_i v = a_i v + U_i ((b_i - a_i) U_i^T v), a_i = cx_i, b_i - a_i = g_i
      for (int64_t k = 0; k < r; ++k) {
        const T gc = g[k] * XW[b * width + kc + i * r + k];
        p0[kc + i * r + k] = pb * gc;
        p1[kc + i * r + k] = p * gc;
        p2[kc + i * r + k] = p * g[k] * VW[b * width + kc + i * r + k];
      }
    }
    st.chunk_x[b] = x0;
    st.chunk_x[B + b] = x1;
    st.chunk_x[2 * B + b] = x2;
    st.chunk_c[b] = c0 + x0;
    st.chunk_c[B + b] = c1 + x1;
    st.chunk_c[2 * B + b] = 0;
  }
  chunk_accumulate(in, st, kc, U, uj, uc, /*has_m_term=*/true);
}

// The merged state of all workers: per row the common max and W, and sum_s e_s acc_s.
template <class T>
struct Merged {
  std::vector<double> shift, total;  // [B]
  std::vector<int64_t> arg;          // [B] the component whose logit is shift (-1: none)
  std::vector<T> num;                // [blocks B, d]
};

// Sets up the inputs shared by the forward and the VJP pass.
template <class T>
MixtureData<T> mixture_data(const MixtureArgs& a, const Tensor& x, const std::optional<Tensor>& log_weights,
                            const Tensor& means, const std::optional<Tensor>& bases,
                            const std::optional<Tensor>& eigvals, const std::optional<Tensor>& lam_perp,
                            const Tensor& sigma, const std::optional<Tensor>& center) {
  const int64_t B = a.batch, d = a.dim, r = a.rank;
  MixtureData<T> in;
  in.a = &a;
  in.means = means;  // read in place with its strides (a contiguous copy would be a pass over K d (1 + r))
  if (bases) in.bases = *bases;
  in.ctr = center ? to_vector<double>(*center) : mean_of_means(dense(means));
  // The float64 output frame is rounded to T like the chunk frames, so x - ctr is exact in float64.
  for (auto& c : in.ctr) c = static_cast<double>(static_cast<T>(c));
  in.xt = new_tensor<T>({B, d});
  in.xr.assign(static_cast<size_t>(B * d), 0.0);
  in.rho.assign(static_cast<size_t>(B), 0.0);
  T* xt = in.xt.template mutable_data_ptr<T>();
  visit_float(dense(x), [&](const auto* px) {
    for (int64_t b = 0; b < B; ++b) {
      double n = 0;
      for (int64_t j = 0; j < d; ++j) {
        xt[b * d + j] = static_cast<T>(px[b * d + j]);
        const double xr = static_cast<double>(xt[b * d + j]) - in.ctr[j];
        in.xr[b * d + j] = xr;
        n += xr * xr;
      }
      in.rho[b] = n;
    }
  });
  in.s2 = sigma_rows<T>(sigma, B);
  for (auto& s : in.s2) s = s * s;
  if (log_weights) in.lw = to_vector<T>(*log_weights);
  if (lam_perp) in.lp = to_vector<T>(*lam_perp);
  if (r > 0) in.eig = to_vector<T>(*eigvals);
  in.drop_rho = r < d && std::all_of(in.lp.begin(), in.lp.end(), [&](T l) { return l == in.lp[0]; });
  return in;
}

// Streams every chunk (forward_chunk or vjp_chunk) and merges the workers' states. The chunks are split
// over S = min(threads, chunks) workers, each streaming its own range into its own partial state with
// single-threaded BLAS (no fork/join per chunk); the S states are merged exactly:
//   M = max_s m_s,  e_s = exp(m_s - M),  W = sum_s e_s l_s,  num = sum_s e_s acc_s.
template <class T>
Merged<T> stream_chunks(const MixtureData<T>& in, int64_t chunk_size) {
  const MixtureArgs& a = *in.a;
  const int64_t B = a.batch, d = a.dim, K = a.n_comp, r = a.rank, nb = in.blocks();
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t chunk = pick_chunk(chunk_size, a, threads);
  const bool direct = d <= kDirectDim;
  const int64_t n_chunks = (K + chunk - 1) / chunk;
  const int64_t n_split = std::max<int64_t>(1, std::min<int64_t>(threads, n_chunks));
  const int64_t per_split = (n_chunks + n_split - 1) / n_split;
  std::vector<Partial<T>> parts(static_cast<size_t>(n_split));
  const int64_t width = chunk * (1 + r);
  // Buffers are allocated by the calling thread (the workers only call the GEMMs).
  for (auto& st : parts) {
    st.run_max.assign(B, -std::numeric_limits<double>::infinity());
    st.run_sum.assign(B, 0.0);
    st.run_arg.assign(B, -1);
    st.acc = new_tensor<T>({nb * B, d});
    std::fill_n(st.acc.template mutable_data_ptr<T>(), nb * B * d, T(0));
    st.m_buf = new_tensor<T>({chunk * d});
    if (r > 0) st.u_buf = new_tensor<T>({chunk * r * d});
    st.xk_buf = new_tensor<T>({B * d});
    st.xw_buf = new_tensor<T>({B * width});
    if (in.v) st.vw_buf = new_tensor<T>({B * width});
    st.p_buf = new_tensor<T>({nb * B * width});
    st.step_buf = new_tensor<T>({nb * B * d});
    if (r > 0) st.step_u_buf = new_tensor<T>({nb * B * d});
    st.ck.resize(d);
    st.ckd_t.resize(d);
    st.ckd.resize(d);
    st.t.resize(chunk * r);
    st.mnorm.resize(chunk);
    st.local.resize(B * chunk);
    if (direct) {
      st.xk_d.resize(B * d);
      st.m_d.resize(chunk * d);
    }
    st.dlt.resize(B);
    st.vck.resize(B);
    st.xk_row.resize(d);
    st.alpha.resize(B);
    st.chunk_x.resize(nb * B);
    st.chunk_c.resize(nb * B);
  }
  if (B > 0) {
    torch::stable::parallel_for(0, n_split, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t c = s * per_split, c1 = std::min(n_chunks, (s + 1) * per_split); c < c1; ++c) {
          const int64_t k0 = c * chunk, kc = std::min(chunk, K - c * chunk);
          if (in.v) {
            vjp_chunk(in, parts[s], k0, kc);
          } else {
            forward_chunk(in, parts[s], k0, kc);
          }
        }
      }
    });
  }
  Merged<T> mg;
  mg.shift.assign(B, 0.0);
  mg.total.assign(B, 0.0);
  mg.arg.assign(B, -1);
  mg.num.assign(nb * B * d, T(0));
  std::vector<double> e(static_cast<size_t>(n_split));
  for (int64_t b = 0; b < B; ++b) {
    double top = -std::numeric_limits<double>::infinity();
    for (const auto& st : parts) {
      if (st.run_max[b] > top) {
        top = st.run_max[b];
        mg.arg[b] = st.run_arg[b];
      }
    }
    const double shift = top == -std::numeric_limits<double>::infinity() ? 0.0 : top;
    double total = 0;
    for (int64_t s = 0; s < n_split; ++s) {
      e[s] = std::exp(parts[s].run_max[b] - shift);  // 0 for a split with no weight
      total += e[s] * parts[s].run_sum[b];
    }
    mg.shift[b] = shift;
    mg.total[b] = total;
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t row = blk * B + b;
      for (int64_t s = 0; s < n_split; ++s) {
        const T es = static_cast<T>(e[s]);
        const T* acc = parts[s].acc.template const_data_ptr<T>() + row * d;
        for (int64_t j = 0; j < d; ++j) mg.num[row * d + j] += es * acc[j];
      }
    }
  }
  return mg;
}

// The logit of component k for row b with no float32 rounding (docs/math.md section 3.2): x - mu_k directly in
// float64 (x and mu_k are T numbers, so the differences are exact), q = ||x - mu_k||^2 and c = U_k^T (x - mu_k)
// summed in float64. O(d (1 + r)); diff [d] and c [r] are scratch.
template <class T>
double exact_logit(const MixtureData<T>& in, int64_t b, int64_t k, std::vector<double>& diff, std::vector<double>& c) {
  const int64_t d = in.a->dim, r = in.a->rank;
  const T* xb = in.xt.template const_data_ptr<T>() + b * d;
  double q = 0;
  const auto [mean_k, m_off] = contiguous_rows(in.means, k, 1);
  visit_float(mean_k, [&](const auto* pm) {
    for (int64_t j = 0; j < d; ++j) {
      diff[j] = static_cast<double>(xb[j]) - static_cast<double>(static_cast<T>(pm[m_off + j]));
      q += diff[j] * diff[j];
    }
  });
  if (r > 0) {
    std::fill(c.begin(), c.end(), 0.0);
    const auto [basis_k, u_off] = contiguous_rows(in.bases, k, 1);
    visit_float(basis_k, [&](const auto* pu) {
      for (int64_t j = 0; j < d; ++j) {
        for (int64_t i = 0; i < r; ++i) c[i] += static_cast<double>(static_cast<T>(pu[u_off + j * r + i])) * diff[j];
      }
    });
  }
  return component_logit(in, k, in.s2[b], q, 0.0, c.data());
}

template <class T>
std::tuple<Tensor, Tensor, Tensor> mixture_forward(const MixtureArgs& a, const Tensor& x,
                                                   const std::optional<Tensor>& log_weights, const Tensor& means,
                                                   const std::optional<Tensor>& bases,
                                                   const std::optional<Tensor>& eigvals,
                                                   const std::optional<Tensor>& lam_perp, const Tensor& sigma,
                                                   const std::optional<Tensor>& center, bool score,
                                                   bool return_weights, int64_t chunk_size) {
  const int64_t B = a.batch, d = a.dim, K = a.n_comp;
  MixtureData<T> in = mixture_data<T>(a, x, log_weights, means, bases, eigvals, lam_perp, sigma, center);
  in.score = score;
  std::vector<double> logits(return_weights ? static_cast<size_t>(B * K) : 0);
  in.logits = return_weights ? logits.data() : nullptr;
  const Merged<T> mg = stream_chunks(in, chunk_size);

  Tensor out = new_tensor<T>({B, d});
  Tensor log_z = new_tensor<double>({B});  // float64 whatever T: |log p| ~ d, float32 would round it
  Tensor weights = return_weights ? new_tensor<T>({B, K}) : torch::stable::empty({0}, a.ctype);
  T* po = out.template mutable_data_ptr<T>();
  double* pz = log_z.template mutable_data_ptr<double>();
  T* pw = return_weights ? weights.template mutable_data_ptr<T>() : nullptr;
  const double vp_shared = in.lp.empty() ? 0.0 : static_cast<double>(in.lp[0]);
  std::vector<double> diff(static_cast<size_t>(d)), c(static_cast<size_t>(a.rank));
  for (int64_t b = 0; b < B; ++b) {
    const double inv_total = mg.total[b] > 0 ? 1.0 / mg.total[b] : 0.0;
    // D - ctr (or the score) = num / W.
    for (int64_t j = 0; j < d; ++j) {
      const double centred = static_cast<double>(mg.num[b * d + j]) * inv_total;
      po[b * d + j] = static_cast<T>(score ? centred : centred + in.ctr[j]);
    }
    // log_z = M + log W - rho / (2 vp) [when left out of the logits] - d/2 log(2 pi sigma^2), in float64;
    // a row whose every weight is zero gets W = 0 -> log_z = -inf and D = ctr.
    const double s2c = std::clamp<double>(in.s2[b], kVarLo, kVarHi);
    const double vp = std::clamp<double>(vp_shared + in.s2[b], kVarLo, kVarHi);
    // The dominant logit is recomputed exactly and the streamed ones enter only relative to it:
    // log_z = l_* + log sum_i exp(l~_i - l~_*) (docs/math.md section 3.2).
    const double top = mg.arg[b] >= 0 && mg.total[b] > 0 ? exact_logit(in, b, mg.arg[b], diff, c)
                                                          : std::numeric_limits<double>::quiet_NaN();
    const double lead = std::isfinite(top) ? top : mg.shift[b] - (in.drop_rho ? 0.5 * in.rho[b] / vp : 0.0);
    pz[b] = (lead + std::log(mg.total[b]) - 0.5 * static_cast<double>(d) * (std::log(s2c) + kLog2Pi));
    // Weights as exp(logit - M) / W: M is one of the logits, so the difference is exact where it matters.
    if (pw) {
      for (int64_t k = 0; k < K; ++k) pw[b * K + k] = static_cast<T>(std::exp(logits[b * K + k] - mg.shift[b]) * inv_total);
    }
  }
  if (x.scalar_type() != a.ctype) out = torch::stable::to(out, x.scalar_type());
  if (x.dim() != 2) out = torch::stable::view(out, x.sizes());
  return {out, log_z, weights};
}

// J^T v of the denoiser (docs/math.md section 3.4) with E0 = sum w beta (D_i - F), E1 = sum w (D_i - F)
// = D - F, E2 = sum w A_i v:  J^T v = E2 + (E0 - (v.E1) E1) / sigma^2.
template <class T>
Tensor mixture_vjp(const MixtureArgs& a, const Tensor& x, const std::optional<Tensor>& log_weights,
                   const Tensor& means, const std::optional<Tensor>& bases, const std::optional<Tensor>& eigvals,
                   const std::optional<Tensor>& lam_perp, const Tensor& sigma, const Tensor& frame, const Tensor& v,
                   const std::optional<Tensor>& center, int64_t chunk_size) {
  const int64_t B = a.batch, d = a.dim;
  MixtureData<T> in = mixture_data<T>(a, x, log_weights, means, bases, eigvals, lam_perp, sigma, center);
  const ScalarType ct = a.ctype;
  const Tensor f = torch::stable::to(dense(frame), ct);
  const Tensor vt = torch::stable::to(dense(v), ct);
  const Tensor f2 = dense(f), v2 = dense(vt);
  in.frame = f2.template const_data_ptr<T>();
  in.v = v2.template const_data_ptr<T>();
  in.vxf.assign(static_cast<size_t>(B), 0.0);
  const T* xt = in.xt.template const_data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) {
      s += static_cast<double>(in.v[b * d + j]) * (static_cast<double>(xt[b * d + j]) - in.frame[b * d + j]);
    }
    in.vxf[b] = s;
  }
  const Merged<T> mg = stream_chunks(in, chunk_size);
  Tensor out = new_tensor<T>({B, d});
  T* po = out.template mutable_data_ptr<T>();
  std::vector<double> e0(d), e1(d);
  for (int64_t b = 0; b < B; ++b) {
    const double inv_total = mg.total[b] > 0 ? 1.0 / mg.total[b] : 0.0;
    const double inv_s2 = 1.0 / std::clamp<double>(in.s2[b], kVarLo, kVarHi);
    double ve1 = 0;
    for (int64_t j = 0; j < d; ++j) {
      e0[j] = mg.num[b * d + j] * inv_total;
      e1[j] = mg.num[(B + b) * d + j] * inv_total;
      ve1 += static_cast<double>(in.v[b * d + j]) * e1[j];
    }
    for (int64_t j = 0; j < d; ++j) {
      const double e2 = mg.num[(2 * B + b) * d + j] * inv_total;
      po[b * d + j] = static_cast<T>(e2 + (e0[j] - ve1 * e1[j]) * inv_s2);
    }
  }
  if (x.scalar_type() != ct) out = torch::stable::to(out, x.scalar_type());
  if (x.dim() != 2) out = torch::stable::view(out, x.sizes());
  return out;
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

void check_like_x(const Tensor& t, const Tensor& x, const char* name) {
  check_float(t, name);
  check_same_device(t, x, name);
  GSA_CHECK(t.dim() == x.dim() && t.numel() == x.numel() && t.size(0) == x.size(0), name,
            " must have the shape of x ", shape_of(x), ", got ", shape_of(t));
  for (int64_t i = 0; i < x.dim(); ++i) {
    GSA_CHECK(t.size(i) == x.size(i), name, " must have the shape of x ", shape_of(x), ", got ", shape_of(t));
  }
}

Tensor mixture_vjp_cpu(const Tensor& x, const std::optional<Tensor>& log_weights, const Tensor& means,
                       const char* means_name, const std::optional<Tensor>& bases,
                       const std::optional<Tensor>& eigvals, const std::optional<Tensor>& lam_perp,
                       const Tensor& sigma, const Tensor& frame, const Tensor& v,
                       const std::optional<Tensor>& center, int64_t chunk_size) {
  const auto a = check_mixture(x, log_weights, means, means_name, bases, eigvals, lam_perp, sigma, center, chunk_size);
  check_like_x(frame, x, "frame");
  check_like_x(v, x, "v");
  return a.ctype == ScalarType::Double
             ? mixture_vjp<double>(a, x, log_weights, means, bases, eigvals, lam_perp, sigma, frame, v, center,
                                   chunk_size)
             : mixture_vjp<float>(a, x, log_weights, means, bases, eigvals, lam_perp, sigma, frame, v, center,
                                  chunk_size);
}

Tensor gmm_vjp_cpu(Tensor x, Tensor log_weights, Tensor means, std::optional<Tensor> bases,
                   std::optional<Tensor> eigvals, std::optional<Tensor> lam_perp, Tensor sigma, Tensor frame, Tensor v,
                   std::optional<Tensor> center, int64_t chunk_size) {
  return mixture_vjp_cpu(x, log_weights, means, "means", bases, eigvals, lam_perp, sigma, frame, v, center,
                         chunk_size);
}

Tensor delta_mixture_vjp_cpu(Tensor x, Tensor points, std::optional<Tensor> log_weights, Tensor sigma, Tensor frame,
                             Tensor v, std::optional<Tensor> center, int64_t chunk_size) {
  return mixture_vjp_cpu(x, log_weights, points, "points", std::nullopt, std::nullopt, std::nullopt, sigma, frame, v,
                         center, chunk_size);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(gsa, CPU, m) {
  m.impl("gmm_forward", TORCH_BOX(&gmm_forward_cpu));
  m.impl("delta_mixture_forward", TORCH_BOX(&delta_mixture_forward_cpu));
  m.impl("gmm_vjp", TORCH_BOX(&gmm_vjp_cpu));
  m.impl("delta_mixture_vjp", TORCH_BOX(&delta_mixture_vjp_cpu));
}

}  // namespace gsa
