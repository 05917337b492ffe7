// RAA's autograd in C++, shared by its CPU kernels (raa_cpu.cpp) and its CUDA kernels (raa_cuda.cpp):
// one operator call per RAA call, `raa(x, w, dim, relu) -> y`, whose backward runs without
// Python. w holds the shift's parameters in one tensor: [v | c] (vector variant, C + 1) or [c]
// (scalar): one parameter a layer, one AccumulateGrad and one optimizer entry. (On an H200 the
// eager ResNet-20 step with RAA ran 5-7% of GELU's step slower with v and c trained, as two
// tensors a layer, than with them frozen; one tensor halves that bookkeeping, not yet timed there.)
// On a 2-core CPU (forward and backward, tiny tensors) a Python autograd function around the
// same kernels took 160 us a call, a C++ torch::autograd::Function 112 (ReLU: 64; in another
// measurement 158 against ReLU's 122), this operator with its hand-written node 142 in that one;
// on an H200's host the Python function and its Triton launches took ~0.4 ms a call more than
// ReLU, where the eager steps of CIFAR-sized models wait on the host.
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
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "autograd_node.h"

#include <mutex>
#include <optional>
#include <utility>
#include <vector>

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

// The backward node, written as PyTorch's generated nodes are (a Node with its saved variables),
// not as a torch::autograd::Function: no context object, no saved-data map, no output wrapping per
// call (the eager step of a small model on a GPU waits on the host, and a layer calls this once a
// step each way).
template <typename Kernels>
struct RaaBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x_, w_, s_;
  int64_t dim_ = 1;
  bool relu_ = false;

  std::string name() const override { return "bionets_raa::RaaBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    w_.reset_data();
    s_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool want_x = task_should_compute_output(0), want_w = task_should_compute_output(1);
    if (!grads[0].defined() || !(want_x || want_w)) return variable_list(2);
    const at::Tensor x = x_.unpack(), w = w_.unpack(), s = s_.unpack();
    if (at::GradMode::is_enabled()) return differentiable(x, w, grads[0]);
    return gradients(grads[0], x, w, s, dim_, relu_, want_x, want_w);
  }

  // (dL/dx, dL/dw) by the kernels, each where it is wanted
  static variable_list gradients(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                                 int64_t dim, bool relu, bool want_x, bool want_w) {
    variable_list out(2);
    if (!g.defined() || !(want_x || want_w)) return out;
    auto [gx, gw] = Kernels::backward(x, g, s, w, dim, relu);
    if (want_x) out[0] = std::move(gx);
    if (want_w) out[1] = gw.to(w.scalar_type());
    return out;
  }

  // compiled autograd: the same kernels, one opaque call in its graph (no double backward there)
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(name());
    args.collect(x_, false);
    args.collect(w_, false);
    args.collect(s_, false);
    args.collect(dim_);
    args.collect(relu_);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(x_);
    saved.before(w_);
    saved.before(s_);
    const std::vector<c10::IValue> args{x_.unpack(), w_.unpack(), s_.unpack(), dim_, relu_,
                                        task_should_compute_output(0), task_should_compute_output(1)};
    const auto run = [](const variable_list& g, const std::vector<c10::IValue>& a) {
      return gradients(g[0], a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), a[3].toInt(), a[4].toBool(),
                       a[5].toBool(), a[6].toBool());
    };
    auto out = bionets_autograd::opaque_backward(*this, "bionets_RaaBackward", run, grads, args, saved);
    saved.after(x_);
    saved.after(w_);
    saved.after(s_);
    return out;
  }

  // the gradients of the plain expression, each input through its own alias (partial derivatives,
  // though s is computed from x), as tensors autograd can differentiate again
  variable_list differentiable(const at::Tensor& x, const at::Tensor& w, const at::Tensor& g) {
    const at::Tensor inputs[2] = {x.view_as(x), w.view_as(w)};
    std::vector<at::Tensor> wanted;
    std::vector<int> where;
    for (int k = 0; k < 2; ++k) {
      if (task_should_compute_output(k)) {
        wanted.push_back(inputs[k]);
        where.push_back(k);
      }
    }
    variable_list out(2);
    const at::Tensor y = expression(inputs[0], inputs[1], dim_, relu_);
    const variable_list found = torch::autograd::grad({y}, wanted, {g}, /*retain_graph=*/true,
                                                      /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t k = 0; k < where.size(); ++k) out[where[k]] = found[k];
    return out;
  }
};

// the operator `raa` where autograd records it: the kernels' forward below autograd, then the
// backward node on the output where x or w needs a gradient
template <typename Kernels>
at::Tensor raa(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
  TORCH_CHECK(!torch::autograd::isFwGradDefined(x) && !torch::autograd::isFwGradDefined(w),
              "bionets RAA operator: no forward-mode derivative; the RAA module computes its plain expression under "
              "forward-mode AD (call the module, not the operator)");
  at::Tensor y, s;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(y, s) = Kernels::forward(x, w, dim, relu);
  }
  if (torch::autograd::compute_requires_grad(x, w)) {
    auto node = bionets_autograd::NewNode<RaaBackward<Kernels>>::make();
    node->set_next_edges(torch::autograd::collect_next_edges(x, w));
    node->x_ = torch::autograd::SavedVariable(x, false);
    node->w_ = torch::autograd::SavedVariable(w, false);
    node->s_ = torch::autograd::SavedVariable(s, false);
    node->dim_ = dim;
    node->relu_ = relu;
    torch::autograd::set_history(y, node);
  }
  return y;
}

// where autograd does not record it (inference mode)
template <typename Kernels>
at::Tensor raa_no_grad(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
  return std::get<0>(Kernels::forward(x, w, dim, relu));
}

}  // namespace bionets_raa
