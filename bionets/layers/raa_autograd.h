// RAA's autograd in C++, shared by its CPU kernels (raa_cpu.cpp) and its CUDA kernels (raa_cuda.cpp):
// one operator call per RAA call, `raa(x, w, dim, relu) -> y`, whose backward runs without
// Python. w holds the shift's parameters in one tensor: [v | c] (vector variant, C + 1) or [c]
// (scalar): one parameter a layer, one AccumulateGrad and one optimizer entry. (On an H200 the
// eager ResNet-20 step with RAA ran 5-7% of GELU's step slower with v and c trained, as two
// tensors a layer, than with them frozen; one tensor halves that bookkeeping, not yet timed there.)
// On a 2-core CPU (forward and backward, tiny tensors) a Python autograd function around the
// same kernels took 160 us a call, this operator 112 (ReLU: 64); on an H200's host the function
// and its Triton launches took ~0.4 ms a call more than ReLU, where the eager steps of CIFAR-sized
// models wait on the host.
//
// Kernels (a struct of two static functions, the same contract as the Python-side kernels):
//     forward(x, w, dim, relu) -> (y, s)             s: each vector's shift, float32 (on CUDA followed
//                                                    by the backward's scratch, which it writes)
//     backward(x, g, s, w, dim, relu) -> (dL/dx, dL/dw = [dL/dv | dL/dc] float32 (scalar: [dL/dc]))
// (w read through raa_shift.h)
// With create_graph (a backward that autograd differentiates again) the backward differentiates
// the plain expression instead, as the Python layers do (bionets.layers.kernel_fallback):
//     s = v . x + c (vector) or c (scalar), z = x + s,  y = x Phi(z) (gelu form) or max(0, z) (relu form)
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <optional>
#include <utility>

namespace bionets_raa {

// the whole activation's schema, as the CPU and the CUDA builds register it
inline constexpr const char* RAA_SCHEMA = "raa(Tensor x, Tensor w, int dim, bool relu) -> Tensor";

// (v, c) of w as views: its first C entries (none where w has one entry, the scalar variant) and
// its last (for the differentiable expression; the kernels read w through raa_shift.h)
inline std::pair<std::optional<at::Tensor>, at::Tensor> split(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 1 && w.numel() >= 1, "bionets RAA kernels: w must be a vector [v | c] or [c]");
  const int64_t n = w.numel();
  return {n > 1 ? std::optional<at::Tensor>(w.narrow(0, 0, n - 1)) : std::nullopt, w.narrow(0, n - 1, 1)};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// RAA as plain ATen operators, features on `dim` (1 or -1): bionets.layers.raa.raa_expression, whose
// float32 parameters promote a bf16 or fp16 x (the shift in float32), the result in x's dtype
inline at::Tensor expression(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
  const auto [v, c] = split(w);
  at::Tensor s = c;
  if (v) s = (x * (dim == 1 ? v->view({1, -1, 1, 1}) : *v)).sum(dim, /*keepdim=*/true) + c;
  const at::Tensor z = x + s;
  return (relu ? z.clamp_min(0) : x * at::special_ndtr(z)).to(x.scalar_type());
}

template <typename Kernels>
struct RaaFunction : public torch::autograd::Function<RaaFunction<Kernels>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
    auto [y, s] = Kernels::forward(x, w, dim, relu);
    ctx->save_for_backward({x, w, s});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &s = saved[2];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const bool relu = ctx->saved_data["relu"].toBool();
    const at::Tensor& g = grads[0];
    if (at::GradMode::is_enabled()) return differentiable(ctx, x, w, dim, relu, g);
    auto [gx, gw] = Kernels::backward(x, g, s, w, dim, relu);
    return {gx, gw.to(w.scalar_type()), at::Tensor(), at::Tensor()};
  }

  // the gradients of the plain expression, each input through its own alias (partial derivatives,
  // though s is computed from x), as tensors autograd can differentiate again
  static variable_list differentiable(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, int64_t dim,
                                      bool relu, const at::Tensor& g) {
    const at::Tensor inputs[2] = {x.view_as(x), w.view_as(w)};
    std::vector<at::Tensor> wanted;
    std::vector<int> where;
    for (int k = 0; k < 2; ++k) {
      if (ctx->needs_input_grad(k)) {
        wanted.push_back(inputs[k]);
        where.push_back(k);
      }
    }
    variable_list out(4);
    if (wanted.empty()) return out;
    const at::Tensor y = expression(inputs[0], inputs[1], dim, relu);
    const variable_list found = torch::autograd::grad({y}, wanted, {g}, /*retain_graph=*/true,
                                                      /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t k = 0; k < where.size(); ++k) out[where[k]] = found[k];
    return out;
  }
};

// the operator `raa` where autograd records it, and where it does not (inference mode)
template <typename Kernels>
at::Tensor raa(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
  return RaaFunction<Kernels>::apply(x, w, dim, relu);
}

template <typename Kernels>
at::Tensor raa_no_grad(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
  return std::get<0>(Kernels::forward(x, w, dim, relu));
}

}  // namespace bionets_raa
