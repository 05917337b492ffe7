// ARR's CUDA operator (torch.ops.bionets_arr_cuda.arr_loss): the class-mean scan of arr_cuda.cu and
// the loss as one operator whose autograd is C++ (arr_autograd.h). Built on first use by
// bionets/layers/cuda_kernels.py.
#include <torch/library.h>

#include "arr_autograd.h"

#include <tuple>

std::tuple<at::Tensor, at::Tensor> arr_cuda_scan(const at::Tensor& r, const at::Tensor& y, const at::Tensor& mean,
                                                 const at::Tensor& seen, double momentum, double scale, bool after,
                                                 bool update);

namespace {

struct Kernels {
  static constexpr auto scan = arr_cuda_scan;
};

}  // namespace

TORCH_LIBRARY(bionets_arr_cuda, m) {
  m.def(bionets_arr::LOSS_SCHEMA);
}

TORCH_LIBRARY_IMPL(bionets_arr_cuda, CUDA, m) {
  m.impl("arr_loss", bionets_arr::arr_loss_no_grad<Kernels>);
}

TORCH_LIBRARY_IMPL(bionets_arr_cuda, AutogradCUDA, m) {
  m.impl("arr_loss", bionets_arr::arr_loss<Kernels>);
}
