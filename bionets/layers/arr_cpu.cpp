// ARR's loss on the CPU (torch.ops.bionets_arr_cpu.arr_loss): the class-mean scan of arr_autograd.h,
// one pass over the responses in batch order, and the loss as one operator with its autograd in C++.
// Responses in float32, float64 or bf16 (math in float32). Built on first use by
// bionets/layers/cpu_kernels.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arr_autograd.h"

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

template <typename T>
void scan_layers(const T* r, const int64_t* y, float* mean, uint8_t* seen, float* slope, float* partial, int64_t J,
                 int64_t N, int64_t K, int64_t D, float a, float scale, bool after, bool update) {
  at::parallel_for(0, J, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(K * D);
    std::vector<uint8_t> known(K);
    for (int64_t j = begin; j < end; ++j) {
      std::memcpy(m.data(), mean + j * K * D, K * D * sizeof(float));
      std::memcpy(known.data(), seen + j * K, K);
      float* part = partial + j * D;
      std::fill(part, part + D, 0.0f);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t k = y[i];
        const T* ri = r + (j * N + i) * D;
        float* si = slope + (j * N + i) * D;
        float* mk = m.data() + k * D;
        const bool had = known[k] != 0;
        for (int64_t d = 0; d < D; ++d) {
          const float x = static_cast<float>(ri[d]);
          const float before = had ? mk[d] : x;
          const float next = had ? (1 - a) * before + a * x : x;
          mk[d] = next;
          const float diff = x - (after ? next : before);
          part[d] += std::fabs(diff);
          si[d] = diff > 0 ? scale : diff < 0 ? -scale : 0.0f;
        }
        known[k] = 1;
      }
      for (int64_t d = 0; d < D; ++d) part[d] *= scale;
      if (update) {
        std::memcpy(mean + j * K * D, m.data(), K * D * sizeof(float));
        std::memcpy(seen + j * K, known.data(), K);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> arr_scan(const at::Tensor& r, const at::Tensor& y, const at::Tensor& mean,
                                            const at::Tensor& seen, double momentum, double scale, bool after,
                                            bool update) {
  const int64_t J = r.size(0), N = r.size(1), D = r.size(2), K = mean.size(1);
  if (N) {
    const auto [lo, hi] = at::aminmax(y);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < K, "bionets ARR kernels: a class outside 0..", K - 1);
  }
  at::Tensor slope = at::empty({J, N, D}, r.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({J, D}, slope.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, r.scalar_type(), "bionets_arr_scan", [&] {
    scan_layers(r.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), mean.data_ptr<float>(),
                seen.data_ptr<uint8_t>(), slope.data_ptr<float>(), partial.data_ptr<float>(), J, N, K, D,
                static_cast<float>(momentum), static_cast<float>(scale), after, update);
  });
  return {slope, partial.sum()};
}

struct Kernels {
  static constexpr auto scan = arr_scan;
};

}  // namespace

TORCH_LIBRARY(bionets_arr_cpu, m) {
  m.def(bionets_arr::LOSS_SCHEMA);
}

TORCH_LIBRARY_IMPL(bionets_arr_cpu, CPU, m) {
  m.impl("arr_loss", bionets_arr::arr_loss_no_grad<Kernels>);
}

TORCH_LIBRARY_IMPL(bionets_arr_cpu, AutogradCPU, m) {
  m.impl("arr_loss", bionets_arr::arr_loss<Kernels>);
}
