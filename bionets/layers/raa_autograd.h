// RAA's autograd in C++, shared by its CPU kernels (raa_cpu.cpp) and its CUDA kernels (raa_cuda.cpp):
// one operator call per RAA call, `raa(x, v, c, dim, relu) -> y`, whose backward runs without
// Python. On a 2-core CPU (forward and backward, tiny tensors) a Python autograd function around the
// same kernels took 160 us a call, this operator 112 (ReLU: 64); on an H200's host the function
// and its Triton launches took ~0.4 ms a call more than ReLU, where the eager steps of CIFAR-sized
// models wait on the host.
//
// Kernels (a struct of two static functions, the same contract as the Python-side kernels):
//     forward(x, v, c, dim, relu) -> (y, s)          s: each vector's shift, float32 (on CUDA followed
//                                                    by the backward's scratch, which it writes)
//     backward(x, g, s, v, dim, relu) -> (dL/dx, dL/dv (empty for the scalar variant), dL/dc [1])
// With create_graph (a backward that autograd differentiates again) the backward differentiates
// the plain expression instead, as the Python layers do (bionets.layers.kernel_fallback):
//     s = v . x + c (vector) or c (scalar), z = x + s,  y = x Phi(z) (gelu form) or max(0, z) (relu form)
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/autograd.h>

#include <optional>

namespace bionets_raa {

// the whole activation's schema, as the CPU and the CUDA builds register it
inline constexpr const char* RAA_SCHEMA = "raa(Tensor x, Tensor? v, Tensor c, int dim, bool relu) -> Tensor";

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// RAA as plain ATen operators, features on `dim` (1 or -1): bionets.layers.raa.raa_expression, whose
// float32 parameters promote a bf16 or fp16 x (the shift in float32), the result in x's dtype
inline at::Tensor expression(const at::Tensor& x, const at::Tensor& v, const at::Tensor& c, int64_t dim, bool relu) {
  at::Tensor s = c;
  if (v.defined()) s = (x * (dim == 1 ? v.view({1, -1, 1, 1}) : v)).sum(dim, /*keepdim=*/true) + c;
  const at::Tensor z = x + s;
  return (relu ? z.clamp_min(0) : x * at::special_ndtr(z)).to(x.scalar_type());
}

template <typename Kernels>
struct RaaFunction : public torch::autograd::Function<RaaFunction<Kernels>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& v,
                            const at::Tensor& c, int64_t dim, bool relu) {
    auto [y, s] = Kernels::forward(x, v, c, dim, relu);
    ctx->save_for_backward({x, v.value_or(at::Tensor()), c, s});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &v = saved[1], &c = saved[2], &s = saved[3];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const bool relu = ctx->saved_data["relu"].toBool();
    const at::Tensor& g = grads[0];
    if (at::GradMode::is_enabled()) return differentiable(ctx, x, v, c, dim, relu, g);
    auto [gx, gv, gc] = Kernels::backward(x, g, s, v.defined() ? std::optional<at::Tensor>(v) : std::nullopt, dim, relu);
    return {gx, v.defined() ? gv.to(v.scalar_type()) : at::Tensor(), gc.view(c.sizes()).to(c.scalar_type()),
            at::Tensor(), at::Tensor()};
  }

  // the gradients of the plain expression, each input through its own alias (partial derivatives,
  // though s is computed from x), as tensors autograd can differentiate again
  static variable_list differentiable(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& v,
                                      const at::Tensor& c, int64_t dim, bool relu, const at::Tensor& g) {
    const at::Tensor inputs[3] = {x.view_as(x), v.defined() ? v.view_as(v) : v, c.view_as(c)};
    std::vector<at::Tensor> wanted;
    std::vector<int> where;
    size_t edge = 0;                       // autograd's inputs are the defined tensors only (no v: x, c)
    for (int k = 0; k < 3; ++k) {
      if (!inputs[k].defined()) continue;
      if (ctx->needs_input_grad(edge++)) {
        wanted.push_back(inputs[k]);
        where.push_back(k);
      }
    }
    variable_list out(5);
    if (wanted.empty()) return out;
    const at::Tensor y = expression(inputs[0], inputs[1], inputs[2], dim, relu);
    const variable_list found = torch::autograd::grad({y}, wanted, {g}, /*retain_graph=*/true,
                                                      /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t k = 0; k < where.size(); ++k) out[where[k]] = found[k];
    return out;
  }
};

// the operator `raa` where autograd records it, and where it does not (inference mode)
template <typename Kernels>
at::Tensor raa(const at::Tensor& x, const std::optional<at::Tensor>& v, const at::Tensor& c, int64_t dim, bool relu) {
  return RaaFunction<Kernels>::apply(x, v, c, dim, relu);
}

template <typename Kernels>
at::Tensor raa_no_grad(const at::Tensor& x, const std::optional<at::Tensor>& v, const at::Tensor& c, int64_t dim,
                       bool relu) {
  return std::get<0>(Kernels::forward(x, v, c, dim, relu));
}

}  // namespace bionets_raa
