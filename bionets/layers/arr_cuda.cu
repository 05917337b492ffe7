// ARR's class-mean scan as one CUDA kernel (the contract is in arr_autograd.h; the operator and its
// C++ autograd are in arr_cuda.cpp; built on first use by bionets/layers/cuda_kernels.py).
//
// One block takes one hooked layer j and BD features of every class: a [K, BD] tile of means in
// shared memory, one thread a feature. First the block finds each class's first sample in the batch
// (an atomic minimum, the same whatever the order; -1 for a class with a mean already), so that a
// sample's class has a mean before it exactly when that first sample comes earlier. Then every
// thread walks the batch in order on its own column of the tile, with no barrier, the responses of
// the next UNROLL samples loaded at once. (The first kernel agreed on a flag per class with two
// barriers a sample, each sample's loads waited for: 42 us for ResNet-20's 128 samples on an H200.)
// Math in float32; the sums of |r - t| are each thread's, in batch order, so every run gives the
// same bits.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t SHARED_BYTES = 48 * 1024;     // without opting in to more: at most 6144 classes (8 bytes each)
constexpr int MAX_THREADS = 128;
constexpr int UNROLL = 8;

template <typename T>
__global__ void scan_kernel(const T* __restrict__ r, const int64_t* __restrict__ y, float* __restrict__ mean,
                            const uint8_t* seen, float* __restrict__ slope, float* __restrict__ partial,
                            float* __restrict__ loss, uint8_t* seen_out, int64_t N, int64_t K, int64_t D, float a,
                            float scale, bool after, bool update) {
  extern __shared__ float tile[];                                  // [K, BD] means, then K first samples
  const int BD = blockDim.x, t = threadIdx.x;
  int* first = reinterpret_cast<int*>(tile + K * BD);             // -1: a mean before the batch; N: no sample
  const int64_t j = blockIdx.x, d = static_cast<int64_t>(blockIdx.y) * BD + t;
  const bool col = d < D;
  const float* layer_mean = mean + j * K * D;
  for (int64_t k = 0; k < K; ++k) tile[k * BD + t] = col ? layer_mean[k * D + d] : 0.0f;
  for (int64_t k = t; k < K; k += BD) first[k] = seen[j * K + k] ? -1 : static_cast<int>(N);
  __syncthreads();
  for (int64_t i = t; i < N; i += BD) {
    const int64_t k = y[i];
    if (k >= 0 && k < K) atomicMin(first + k, static_cast<int>(i));
  }
  __syncthreads();
  float sum = 0.0f;
  for (int64_t i0 = 0; i0 < N; i0 += UNROLL) {
    int64_t ks[UNROLL];
    float xs[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {                             // (loads that wait on nothing before them)
      const int64_t i = i0 + u;
      ks[u] = i < N ? y[i] : -1;
      xs[u] = i < N && col ? static_cast<float>(r[(j * N + i) * D + d]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = i0 + u, k = ks[u];
      if (i >= N || !col) break;
      const int64_t idx = (j * N + i) * D + d;
      if (k < 0 || k >= K) {                                      // not a class: nothing to learn or pull
        slope[idx] = 0.0f;
        continue;
      }
      const float x = xs[u];
      const bool had = first[k] < i;
      const float before = had ? tile[k * BD + t] : x;
      const float next = had ? (1 - a) * before + a * x : x;
      tile[k * BD + t] = next;
      const float diff = x - (after ? next : before);
      sum += fabsf(diff);
      slope[idx] = diff > 0 ? scale : diff < 0 ? -scale : 0.0f;
    }
  }
  if (col) partial[j * D + d] = sum * scale;
  if (loss != nullptr) {               // the only block: the loss is its partial sums' sum, in feature order
    __syncthreads();
    if (t == 0) {
      float total = 0.0f;
      for (int64_t k = 0; k < D; ++k) total += partial[k];
      *loss = total;
    }
  }
  if (update) {
    if (col)
      for (int64_t k = 0; k < K; ++k) mean[j * K * D + k * D + d] = tile[k * BD + t];
    if (blockIdx.y == 0)                // (into a copy where the layer's other blocks may not have read seen yet)
      for (int64_t k = t; k < K; k += BD) seen_out[j * K + k] = first[k] < N;
  }
}

// features a block: a power of two, at most MAX_THREADS and D's, with its tile in shared memory
int block_features(int64_t K, int64_t D) {
  int bd = 1;
  while (bd < MAX_THREADS && bd < D && K * (2 * bd) * 4 + K * 4 <= SHARED_BYTES) bd *= 2;
  return bd;
}

}  // namespace

// (slope, loss): the loss summed by the kernel where one block takes the whole memory (a CNN's
// pooled features: one launch less), else the partial sums' sum
std::tuple<at::Tensor, at::Tensor> arr_cuda_scan(const at::Tensor& r, const at::Tensor& y, const at::Tensor& mean,
                                                 const at::Tensor& seen, double momentum, double scale, bool after,
                                                 bool update) {
  TORCH_CHECK(r.is_cuda(), "bionets ARR CUDA kernel: CUDA tensors expected");
  const int64_t J = r.size(0), N = r.size(1), D = r.size(2), K = mean.size(1);
  TORCH_CHECK(K * 8 <= SHARED_BYTES && N < INT32_MAX, "bionets ARR CUDA kernel: at most ", SHARED_BYTES / 8,
              " classes and 2^31 - 1 samples");
  const c10::cuda::CUDAGuard guard(r.device());
  at::Tensor slope = at::empty({J, N, D}, r.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({J, D}, slope.options());
  if (J == 0 || D == 0) return {slope, at::zeros({}, slope.options())};
  const int bd = block_features(K, D);
  TORCH_CHECK((D + bd - 1) / bd <= 65535, "bionets ARR CUDA kernel: too many features for ", K, " classes");
  const dim3 grid(static_cast<unsigned>(J), static_cast<unsigned>((D + bd - 1) / bd));
  // one block a layer writes its flags in place (it read them before); several write a copy
  const bool copy_seen = update && grid.y > 1;
  at::Tensor seen_out = copy_seen ? at::empty({J, K}, seen.options()) : seen;
  const size_t shared = K * bd * sizeof(float) + K * sizeof(int);
  const bool one_block = grid.x == 1 && grid.y == 1;
  at::Tensor loss = one_block ? at::empty({}, slope.options()) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "bionets_arr_cuda_scan", [&] {
    scan_kernel<scalar_t><<<grid, bd, shared, stream>>>(
        r.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), mean.data_ptr<float>(), seen.const_data_ptr<uint8_t>(),
        slope.data_ptr<float>(), partial.data_ptr<float>(), one_block ? loss.data_ptr<float>() : nullptr,
        seen_out.data_ptr<uint8_t>(), N, K, D, static_cast<float>(momentum), static_cast<float>(scale), after, update);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (copy_seen) seen.narrow(0, 0, J).copy_(seen_out);
  return {slope, one_block ? loss : partial.sum()};
}
