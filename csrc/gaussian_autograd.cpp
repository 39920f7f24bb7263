// Autograd of the Gaussian ops with respect to x, in C++ so a call pays no Python autograd dispatch.
// Each map is affine in x with a symmetric linear part L_f (docs/math.md section 2.1), so the vector-Jacobian
// product is the same op applied to the cotangent with mean = 0: denoise/teleport give 0 + L_f(g),
// score gives L_f(g). project: grad_x = grad_c U^T. The backward calls the ops through the
// dispatcher, so it runs on whatever device kernel (C++ or Triton) the forward used.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace gsa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using MapOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&);
using TeleportOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&);

void check_no_param_grad(std::initializer_list<std::pair<const char*, const at::Tensor*>> params,
                         const char* op) {
  for (const auto& [name, t] : params) {
    TORCH_CHECK(!t->requires_grad(), "gsa::", op, " differentiates with respect to x only; ", name,
                " requires grad");
  }
}

// Denoise and score: (x, mean, basis, eigvals, lam_perp, sigma).
template <const char* kName>
struct MapFunction : public torch::autograd::Function<MapFunction<kName>> {
  static const c10::TypedOperatorHandle<MapOp>& op() {
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").template typed<MapOp>();
    return handle;
  }
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& basis, const at::Tensor& eigvals, const at::Tensor& lam_perp,
                            const at::Tensor& sigma) {
    check_no_param_grad({{"mean", &mean}, {"basis", &basis}, {"eigvals", &eigvals}, {"lam_perp", &lam_perp},
                         {"sigma", &sigma}}, kName);
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({mean, basis, eigvals, lam_perp, sigma});
    return op().call(x, mean, basis, eigvals, lam_perp, sigma);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto grad_x = op().call(grads[0].contiguous(), at::zeros_like(s[0]), s[1], s[2], s[3], s[4]);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct TeleportFunction : public torch::autograd::Function<TeleportFunction> {
  static const c10::TypedOperatorHandle<TeleportOp>& op() {
    static const auto handle =
        c10::Dispatcher::singleton().findSchemaOrThrow("gsa::teleport", "").typed<TeleportOp>();
    return handle;
  }
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& basis, const at::Tensor& eigvals, const at::Tensor& lam_perp,
                            const at::Tensor& sigma_from, const at::Tensor& sigma_to) {
    check_no_param_grad({{"mean", &mean}, {"basis", &basis}, {"eigvals", &eigvals}, {"lam_perp", &lam_perp},
                         {"sigma_from", &sigma_from}, {"sigma_to", &sigma_to}}, "teleport");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({mean, basis, eigvals, lam_perp, sigma_from, sigma_to});
    return op().call(x, mean, basis, eigvals, lam_perp, sigma_from, sigma_to);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto grad_x = op().call(grads[0].contiguous(), at::zeros_like(s[0]), s[1], s[2], s[3], s[4], s[5]);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ProjectFunction : public torch::autograd::Function<ProjectFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& basis) {
    check_no_param_grad({{"mean", &mean}, {"basis", &basis}}, "project");
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("gsa::project", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    ctx->save_for_backward({basis});
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return op.call(x, mean, basis);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto basis = ctx->get_saved_variables()[0];
    const auto sizes = ctx->saved_data["x_sizes"].toIntVector();
    auto grad_x = at::matmul(grads[0], basis.t().to(grads[0].scalar_type())).reshape(sizes);
    return {grad_x, at::Tensor(), at::Tensor()};
  }
};

constexpr char kDenoise[] = "gsa::gaussian_denoise";
constexpr char kScore[] = "gsa::gaussian_score";

at::Tensor denoise_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                            const at::Tensor& eigvals, const at::Tensor& lam_perp, const at::Tensor& sigma) {
  return MapFunction<kDenoise>::apply(x, mean, basis, eigvals, lam_perp, sigma);
}

at::Tensor score_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                          const at::Tensor& eigvals, const at::Tensor& lam_perp, const at::Tensor& sigma) {
  return MapFunction<kScore>::apply(x, mean, basis, eigvals, lam_perp, sigma);
}

at::Tensor teleport_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis,
                             const at::Tensor& eigvals, const at::Tensor& lam_perp,
                             const at::Tensor& sigma_from, const at::Tensor& sigma_to) {
  return TeleportFunction::apply(x, mean, basis, eigvals, lam_perp, sigma_from, sigma_to);
}

at::Tensor project_autograd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& basis) {
  return ProjectFunction::apply(x, mean, basis);
}

}  // namespace

TORCH_LIBRARY_IMPL(gsa, Autograd, m) {
  m.impl("project", &project_autograd);
  m.impl("gaussian_denoise", &denoise_autograd);
  m.impl("gaussian_score", &score_autograd);
  m.impl("teleport", &teleport_autograd);
}

}  // namespace gsa
