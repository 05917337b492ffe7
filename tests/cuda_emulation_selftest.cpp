// Small kernels that check tests/cuda_emulation.h itself (tests/test_cuda_emulated.py builds and runs
// this): a correct warp and block reduction, one whose lanes return after their last shuffle while
// their partners still read, and kernels that break CUDA's rules (or, for the lane mask, the
// emulator's stricter one), each of which the emulator must refuse. Written as
// tests/cuda_emulated.py's rewrite leaves a kernel source: launches through cuda_emu::launch,
// __shared__ as static thread_local. Usage: cuda_emulation_selftest CASE [SEED]; prints the result
// or "error: ...".
#include "cuda_emulation.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

__global__ void block_sum(const float* x, float* out) {
  static thread_local float warp_sums[32];    // __shared__
  const unsigned t = threadIdx.x, lane = t % 32, warps = (blockDim.x + 31) / 32;
  float v = x[blockIdx.x * blockDim.x + t];
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (lane == 0) warp_sums[t / 32] = v;
  __syncthreads();
  if (t == 0) {
    float total = 0.f;
    for (unsigned w = 0; w < warps; ++w) total += warp_sums[w];
    out[blockIdx.x] = total;
  }
}

// odd lanes leave after the first shuffle; even ones go on shuffling among themselves (mask 2)
__global__ void lanes_return_after_their_last_shuffle(float* out) {
  const unsigned t = threadIdx.x;
  float v = __shfl_xor_sync(0xffffffffu, static_cast<float>(t), 1);
  if (t % 2) {
    out[t] = v;
    return;
  }
  out[t] = v + __shfl_xor_sync(0x55555555u, v, 2);
}

__global__ void shuffle_with_returned_lane(float* out) {
  if (threadIdx.x == 1) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void shuffle_past_the_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 32);
}

__global__ void shuffle_past_the_block(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 16);
}

__global__ void barrier_and_shuffle_in_one_warp(float* out) {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  }
}

int run(const char* name) {
  std::vector<float> out(64, 0.f);
  if (!std::strcmp(name, "block_sum")) {
    std::vector<float> x(3 * 64);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7);
    cuda_emu::launch(3, 64, 0, 0, block_sum, x.data(), out.data());
    std::printf("%g %g %g\n", out[0], out[1], out[2]);
  } else if (!std::strcmp(name, "lanes_return_after_their_last_shuffle")) {
    cuda_emu::launch(1, 64, 0, 0, lanes_return_after_their_last_shuffle, out.data());
    double total = 0;
    for (float v : out) total += v;
    std::printf("%g %g %g %g\n", out[0], out[1], out[2], total);
  } else if (!std::strcmp(name, "shuffle_with_returned_lane")) {
    cuda_emu::launch(1, 32, 0, 0, shuffle_with_returned_lane, out.data());
  } else if (!std::strcmp(name, "shuffle_past_the_warp")) {
    cuda_emu::launch(1, 64, 0, 0, shuffle_past_the_warp, out.data());
  } else if (!std::strcmp(name, "shuffle_past_the_block")) {
    cuda_emu::launch(1, 40, 0, 0, shuffle_past_the_block, out.data());
  } else if (!std::strcmp(name, "barrier_and_shuffle_in_one_warp")) {
    cuda_emu::launch(1, 64, 0, 0, barrier_and_shuffle_in_one_warp, out.data());
  } else {
    std::printf("unknown case %s\n", name);
    return 2;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) return 2;
  if (argc == 3) cuda_emu::set_seed(std::strtoull(argv[2], nullptr, 10));
  try {
    return run(argv[1]);
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 3;
  }
}
