// ARR's loss as one operator whose autograd is C++, shared by its CPU kernel (arr_cpu.cpp) and its
// CUDA kernel (arr_cuda.cpp): `arr_loss(r, y, mean, seen, momentum, weight, after, update) -> loss`.
// On an H200 the loss through PyTorch's operators and a Triton launch took ~0.6 ms of host time a
// step (ResNet-20's eager step: ~11 ms, bound by the host), three times ARR's 3% budget.
//
// r [J, N, D]: the responses of J hooked layers (float32, bf16 or fp16); y [N] the classes; mean
// [J', K, D] float32 and seen [J', K] uint8, J' >= J, the class memory (its first J layers take the
// batch's updates in place where `update`). In batch order, per layer j and sample i of class k:
//
//     before_i = m_k                 (r_i where class k has no mean yet: its first response)
//     m_k      = (1 - a) before_i + a r_i
//     t_i      = m_k (after) or before_i (before)
//     L        = weight / (J N D) * sum |r - t|            (t detached, as in bionets.layers.arr)
//
// Kernels (a struct of one static function):
//     scan(r, y, mean, seen, momentum, scale, after, update) -> (slope, loss)
// slope [J, N, D] float32 = scale * sign(r - t) = dL/dr (scale = weight / (J N D)), loss [] float32
// the sum of scale |r - t| (summed per layer and feature in batch order, then over those). A class
// outside 0..K-1 adds nothing and is not learnt (the CPU kernel refuses it).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include "autograd_node.h"

#include <mutex>
#include <tuple>
#include <vector>

namespace bionets_arr {

// the operator's schema, as the CPU and the CUDA builds register it
inline constexpr const char* LOSS_SCHEMA =
    "arr_loss(Tensor r, Tensor y, Tensor(a!) mean, Tensor(b!) seen, float momentum, float weight, bool after, "
    "bool update) -> Tensor";

using torch::autograd::variable_list;

inline void check(const at::Tensor& r, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& seen) {
  TORCH_CHECK(r.dim() == 3 && y.dim() == 1 && mean.dim() == 3 && seen.dim() == 2,
              "bionets ARR kernels: r [J, N, D], y [N], mean [J', K, D] and seen [J', K] expected");
  TORCH_CHECK(y.size(0) == r.size(1) && mean.size(0) >= r.size(0) && mean.size(2) == r.size(2) &&
                  seen.size(0) == mean.size(0) && seen.size(1) == mean.size(1),
              "bionets ARR kernels: the responses, classes and class memory do not match in size");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.is_contiguous() && seen.scalar_type() == at::kByte &&
                  seen.is_contiguous(),
              "bionets ARR kernels: a contiguous float32 mean and uint8 seen expected");
  TORCH_CHECK(y.device() == r.device() && mean.device() == r.device() && seen.device() == r.device(),
              "bionets ARR kernels: the responses, classes and class memory must be on one device");
}

// (slope, loss): the kernel's scan
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> compute(const at::Tensor& r_in, const at::Tensor& y_in, const at::Tensor& mean,
                                           const at::Tensor& seen, double momentum, double weight, bool after,
                                           bool update) {
  check(r_in, y_in, mean, seen);
  const at::Tensor r = r_in.contiguous(), y = y_in.to(at::kLong).contiguous();
  const double scale = r.numel() ? weight / static_cast<double>(r.numel()) : 0.0;
  auto [slope, loss] = Kernels::scan(r, y, mean, seen, momentum, scale, after, update);
  if (update) {           // the memory changed in place: its version moves, as an in-place operator's does
    torch::autograd::impl::bump_version(mean);
    torch::autograd::impl::bump_version(seen);
  }
  return {slope, loss};
}

// The backward node, written as PyTorch's generated nodes are (no torch::autograd::Function's
// context and output wrapping a call: on a GPU the eager step of a small model waits on the host).
// dL/dr = slope dL. Piecewise constant in r, so its derivative is zero; with create_graph it is
// tied to r by a zero term (sgn(r) 0, as autograd's |.| ties its own), so that a gradient penalty
// on ARR alone differentiates to zeros rather than failing
struct ArrBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable slope_, r_;

  std::string name() const override { return "bionets_arr::ArrBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    slope_.reset_data();
    r_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined() || !task_should_compute_output(0)) return variable_list(1);
    const at::Tensor slope = slope_.unpack(), r = r_.unpack();
    if (at::GradMode::is_enabled()) return {(slope * grads[0] + r.sgn().mul(0).to(at::kFloat)).to(r.scalar_type())};
    return gradient(grads[0], slope, r);
  }

  // the product computed in float32, written in r's dtype (one kernel on CUDA)
  static variable_list gradient(const at::Tensor& g, const at::Tensor& slope, const at::Tensor& r) {
    variable_list out(1);
    if (!g.defined()) return out;
    out[0] = at::empty(slope.sizes(), slope.options().dtype(r.scalar_type()));
    at::mul_out(out[0], slope, g);
    return out;
  }

  // compiled autograd: the same product, one opaque call in its graph (no double backward there)
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(name());
    args.collect(slope_, false);
    args.collect(r_, false);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(slope_);
    saved.before(r_);
    const std::vector<c10::IValue> args{slope_.unpack(), r_.unpack()};
    const auto run = [](const variable_list& g, const std::vector<c10::IValue>& a) {
      return gradient(g[0], a[0].toTensor(), a[1].toTensor());
    };
    auto out = bionets_autograd::opaque_backward(*this, "bionets_ArrBackward", run, grads, args, saved);
    saved.after(slope_);
    saved.after(r_);
    return out;
  }
};

// the operator where autograd records it (the memory, classes and numbers take no gradient), and
// where it does not (inference mode)
template <typename Kernels>
at::Tensor arr_loss(const at::Tensor& r, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& seen,
                    double momentum, double weight, bool after, bool update) {
  TORCH_CHECK(!torch::autograd::isFwGradDefined(r),
              "bionets ARR operator: no forward-mode derivative; arr_loss computes ARR with PyTorch's operators under "
              "forward-mode AD (call arr_loss, not the operator)");
  at::Tensor slope, loss;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(slope, loss) = compute<Kernels>(r, y, mean, seen, momentum, weight, after, update);
  }
  if (torch::autograd::compute_requires_grad(r)) {
    auto node = bionets_autograd::NewNode<ArrBackward>::make();
    node->set_next_edges(torch::autograd::collect_next_edges(r));
    node->slope_ = torch::autograd::SavedVariable(slope, false);
    node->r_ = torch::autograd::SavedVariable(r, false);
    torch::autograd::set_history(loss, node);
  }
  return loss;
}

template <typename Kernels>
at::Tensor arr_loss_no_grad(const at::Tensor& r, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& seen,
                            double momentum, double weight, bool after, bool update) {
  return std::get<1>(compute<Kernels>(r, y, mean, seen, momentum, weight, after, update));
}

}  // namespace bionets_arr
