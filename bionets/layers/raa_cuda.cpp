// RAA's CUDA operators (torch.ops.bionets_raa_cuda): the kernels of raa_cuda.cu, and `raa`, the
// whole activation as one operator whose autograd is C++ (raa_autograd.h). Built on first use by
// bionets/layers/cuda_kernels.py.
#include <torch/library.h>

#include "raa_autograd.h"

#include <tuple>

std::tuple<at::Tensor, at::Tensor> raa_cuda_forward(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu);
std::tuple<at::Tensor, at::Tensor> raa_cuda_backward(const at::Tensor& x, const at::Tensor& g, const at::Tensor& s,
                                                     const at::Tensor& w, int64_t dim, bool relu);

namespace {

struct Kernels {
  static constexpr auto forward = raa_cuda_forward;
  static constexpr auto backward = raa_cuda_backward;
};

}  // namespace

TORCH_LIBRARY(bionets_raa_cuda, m) {
  m.def("forward(Tensor x, Tensor w, int dim, bool relu) -> (Tensor, Tensor)");
  // (s, the forward's saved state: its shifts and the backward's scratch, which the backward writes;
  // the outputs: dL/dx and dL/dw = [dL/dv | dL/dc])
  m.def("backward(Tensor x, Tensor g, Tensor(a!) s, Tensor w, int dim, bool relu) -> (Tensor, Tensor)");
  m.def(bionets_raa::RAA_SCHEMA);
}

TORCH_LIBRARY_IMPL(bionets_raa_cuda, CUDA, m) {
  m.impl("forward", raa_cuda_forward);
  m.impl("backward", raa_cuda_backward);
  m.impl("raa", bionets_raa::raa_no_grad<Kernels>);
}

TORCH_LIBRARY_IMPL(bionets_raa_cuda, AutogradCUDA, m) {
  m.impl("raa", bionets_raa::raa<Kernels>);
}
