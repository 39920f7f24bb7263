// The op schemas of gsa_kernels, declared once. Kernels live in csrc/*/cpu.cpp (CPU, C++ on the LibTorch
// stable ABI) and in gsa_kernels/**/triton_*.py (CUDA, registered from Python); fake kernels and the
// Gaussian ops' autograd are registered in Python.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(gsa, m) {
  // Gaussian model G = (mean [d], basis U [d, r], eigvals [r], lam_perp []); x is [B, ...] with
  // prod(...) = d. sigma tensors are [] or [B]. See docs/math.md section 2.
  m.def("project(Tensor x, Tensor mean, Tensor basis) -> Tensor");
  m.def("gaussian_denoise(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma) -> Tensor");
  m.def("gaussian_score(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma) -> Tensor");
  m.def("teleport(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma_from, Tensor sigma_to) -> Tensor");
  // Mixtures (docs/math.md section 3): components log_weights [K] (as given, unnormalized), means/points
  // [K, d], optional bases [K, d, r] + eigvals [K, r] (None: r = 0) and lam_perp [K] (None: 0). Returns
  // (denoiser, or score if score=True, shaped like x; log_z [B] = logsumexp_i(log_weights_i + log N_i);
  // posterior weights [B, K] if return_weights else an empty tensor). center [d] is the reference
  // point of the centred distance expansion (None: the mean of the means). chunk_size: components per
  // CPU chunk (0: automatic); GPU kernels pick their own tiles.
  m.def("gmm_forward(Tensor x, Tensor log_weights, Tensor means, Tensor? bases, Tensor? eigvals, Tensor? lam_perp, Tensor sigma, Tensor? center=None, bool score=False, bool return_weights=False, int chunk_size=0) -> (Tensor, Tensor, Tensor)");
  m.def("delta_mixture_forward(Tensor x, Tensor points, Tensor? log_weights, Tensor sigma, Tensor? center=None, bool score=False, int chunk_size=0) -> (Tensor, Tensor)");
  // Vector-Jacobian products of the mixture denoisers (docs/math.md section 3.4): J^T v with J = dD/dx,
  // v shaped like x. frame [like x] is any point close to D (the forward's denoiser): the posterior
  // covariance is accumulated about it, so nothing cancels. A second streaming pass, memory flat in K.
  m.def("gmm_vjp(Tensor x, Tensor log_weights, Tensor means, Tensor? bases, Tensor? eigvals, Tensor? lam_perp, Tensor sigma, Tensor frame, Tensor v, Tensor? center=None, int chunk_size=0) -> Tensor");
  m.def("delta_mixture_vjp(Tensor x, Tensor points, Tensor? log_weights, Tensor sigma, Tensor frame, Tensor v, Tensor? center=None, int chunk_size=0) -> Tensor");
}
