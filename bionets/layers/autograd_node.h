// What RAA's and ARR's hand-written backward nodes (raa_autograd.h, arr_autograd.h) share: how a
// node is made for this torch, and their backward as one opaque call inside a compiled-autograd
// graph (torch._dynamo's compiled autograd, which traces a backward pass): run eagerly there with
// the saved tensors as the graph gives them, as a C++ torch::autograd::Function's backward is.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace bionets_autograd {

// A new backward node of type N, owned as this torch's autograd owns its nodes: by c10::intrusive_ptr
// since PyTorch's change of April 2026 (torch 2.14 here), by std::shared_ptr with autograd's deleter
// before (torch 2.11 on the GPU image); told apart by the type of an Edge's function.
template <typename N, typename Owner = decltype(torch::autograd::Edge::function)>
struct NewNode {
  static c10::intrusive_ptr<N> make() { return c10::make_intrusive<N>(); }
};

template <typename N>
struct NewNode<N, std::shared_ptr<torch::autograd::Node>> {
  // (deleteNode found through N, a Node: a torch with intrusive nodes has none and never gets here)
  static std::shared_ptr<N> make() { return std::shared_ptr<N>(new N(), [](N* node) { deleteNode(node); }); }
};

// the node's backward `fn(grads, args)` as one call in the graph compiled autograd is tracing;
// `args` the saved tensors (as `saved` swapped them in) and the node's other state
inline torch::autograd::variable_list opaque_backward(const torch::autograd::Node& node, const std::string& fn_name,
                                                      torch::autograd::functional_apply_t fn,
                                                      const torch::autograd::variable_list& grads,
                                                      const std::vector<c10::IValue>& args,
                                                      torch::dynamo::autograd::SwapSavedVariables& saved) {
  std::vector<at::TypePtr> schema;
  schema.reserve(args.size());
  for (const auto& a : args) schema.emplace_back(a.isTensor() ? at::TensorType::get() : a.type());
  const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
  const std::string bound = py->bind_function(saved.get_py_compiler(), fn_name, std::move(fn), schema,
                                              /*is_custom_function=*/true, /*is_traceable=*/false);
  using Metadata = std::vector<std::optional<torch::autograd::InputMetadata>>;
  const auto metadata = torch::dynamo::autograd::IValuePacker<Metadata>::pack(
      torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  return py->call_function(saved.get_py_compiler(), "apply_functional", bound, grads, args, metadata);
}

}  // namespace bionets_autograd
