// The op schemas of gsa_kernels, declared once. Kernels live in *_cpu.cpp (CPU, C++/ATen) and in
// gsa_kernels/**/triton_*.py (CUDA, registered from Python); fake kernels are registered in Python.
#include <torch/library.h>

TORCH_LIBRARY(gsa, m) {
  // Gaussian model G = (mean [d], basis U [d, r], eigvals [r], lam_perp []); x is [B, ...] with
  // prod(...) = d. sigma tensors are [] or [B]. See MATH.md section 2.
  m.def("project(Tensor x, Tensor mean, Tensor basis) -> Tensor");
  m.def("gaussian_denoise(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma) -> Tensor");
  m.def("gaussian_score(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma) -> Tensor");
  m.def("teleport(Tensor x, Tensor mean, Tensor basis, Tensor eigvals, Tensor lam_perp, Tensor sigma_from, Tensor sigma_to) -> Tensor");
}
