// Just enough of CUDA to run bionets' CUDA C++ kernels on the CPU, for tests on machines without a
// GPU (tests/cuda_emulated.py includes this before a kernel source it has rewritten: launches
// `k<<<grid, block, shared, stream>>>(args)` become cuda_emu::launch(grid, block, shared, stream, k,
// args), `extern __shared__ T name[]` a pointer to the block's dynamic shared memory, `__shared__ T x`
// (or `x[N]`) a `static thread_local`, `is_cuda()` `is_cpu()`, and the c10/cuda includes this file).
// Launches on different threads do not share state; a kernel launched from inside a kernel is not
// supported.
//
// Each block runs its threads as fibers (ucontext) on the calling thread: a fiber runs until it
// reaches __syncthreads, a warp shuffle or its end, then the next one runs; a barrier opens when every
// live thread it waits for has arrived (threads that returned count as arrived, as on Volta and
// later). Errors: a block whose threads wait some at __syncthreads and some at a shuffle; a shuffle
// that reads a lane which has returned or one past the block's threads, and (stricter than a GPU,
// which reads only its low 5 bits: a mask of 32 reads the lane itself) a lane mask outside 0..31,
// almost certainly a kernel's bug. Not caught: barriers or shuffles at different places in the code
// (one barrier each here, as on Volta and later; undefined in CUDA), shuffle masks (every shuffle is
// taken as full-warp). A warp's live lanes pass each shuffle together, so they are always at the
// same one. The blocks run one after another and the threads of each in an order shuffled
// by the seed (set_seed): results that depend on either order differ between seeds. What this cannot
// show: the GPU's memory model (every write is visible at once here), warp timing, shared-memory
// limits, speed.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;    // the running fiber's, set before it runs

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline int getCurrentCUDAStream() { return 0; }
}  // namespace c10::cuda

namespace cuda_emu {

enum class State { runnable, at_block_barrier, at_warp_barrier, done };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::runnable;
  unsigned tid = 0;
};

constexpr size_t STACK_BYTES = 256 * 1024;

struct Block {
  std::vector<Fiber> fibers;
  std::vector<float> lanes[2];              // each thread's value in a warp shuffle, alternate shuffles alternating
  std::vector<int> shuffles;                // each thread's shuffles so far
  std::vector<unsigned> partners;           // the lane each thread reads in its current shuffle
  std::vector<char> shared;                 // dynamic shared memory
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::function<void()> body;
  std::string error;                        // what a thread did that CUDA does not allow (no exceptions in fibers)
};

inline thread_local Block* block = nullptr;    // the launch running on this thread
inline std::atomic<uint64_t> seed{0};           // set from Python, read by launches on any thread

inline void set_seed(uint64_t s) { seed = s; }

inline void yield_as(State state) {
  Fiber* f = block->current;
  f->state = state;
  swapcontext(&f->context, &block->scheduler);
}

inline void fiber_entry() {
  block->body();
  yield_as(State::done);
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(block->shared.data());
}

inline bool waiting_all(unsigned lo, unsigned hi, State at) {
  bool any = false;
  for (unsigned t = lo; t < hi; ++t) {
    const State s = block->fibers[t].state;
    if (s == State::done) continue;
    if (s != at) return false;
    any = true;
  }
  return any;
}

// why the warp's shuffle reads a value no lane wrote (a lane that has returned), or ""
inline std::string shuffle_error(unsigned lo, unsigned hi) {
  for (unsigned t = lo; t < hi; ++t) {
    const unsigned p = block->partners[t];
    if (block->fibers[t].state != State::done && block->fibers[p].state == State::done)
      return "lane " + std::to_string(t % 32) + " shuffles with lane " + std::to_string(p % 32) + ", which has returned";
  }
  return "";
}

inline void release(unsigned lo, unsigned hi) {
  for (unsigned t = lo; t < hi; ++t)
    if (block->fibers[t].state != State::done) block->fibers[t].state = State::runnable;
}

// runs one block to its end; throws where its threads wait at barriers that cannot open
inline void run_block(unsigned threads, std::mt19937_64& rng) {
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    for (unsigned t : order) {
      Fiber& f = block->fibers[t];
      if (f.state != State::runnable) continue;
      threadIdx = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
      block->current = &f;
      swapcontext(&block->scheduler, &f.context);
    }
    if (std::all_of(block->fibers.begin(), block->fibers.end(), [](const Fiber& f) { return f.state == State::done; }))
      return;
    bool released = false;
    if (waiting_all(0, threads, State::at_block_barrier)) {
      release(0, threads);
      released = true;
    }
    for (unsigned w = 0; w < threads; w += 32) {
      const unsigned end = std::min(threads, w + 32);
      if (waiting_all(w, end, State::at_warp_barrier)) {
        const std::string error = shuffle_error(w, end);
        if (!error.empty())
          throw std::runtime_error("CUDA emulation: in block (" + std::to_string(blockIdx.x) + ", " +
                                   std::to_string(blockIdx.y) + "), " + error);
        release(w, end);
        released = true;
      }
    }
    if (!released)
      throw std::runtime_error("CUDA emulation: the threads of block (" + std::to_string(blockIdx.x) + ", " +
                               std::to_string(blockIdx.y) + ") wait at barriers that cannot open (some at "
                               "__syncthreads, some at a warp shuffle)");
  }
}

template <typename... P, typename... A>
void launch(dim3 grid, dim3 threads_per_block, size_t shared_bytes, int /*stream*/, void (*kernel)(P...), A&&... args) {
  const std::tuple<P...> params(static_cast<P>(args)...);
  const unsigned threads = threads_per_block.x * threads_per_block.y * threads_per_block.z;
  TORCH_CHECK(threads > 0 && threads <= 1024, "CUDA emulation: ", threads, " threads a block");
  std::mt19937_64 rng(seed.load());
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  Block b;
  b.fibers = std::vector<Fiber>(threads);
  for (auto& f : b.fibers) f.stack.reset(new char[STACK_BYTES]);
  b.partners.assign(threads, 0);
  b.body = [&] { std::apply(kernel, params); };
  Block* outer = block;
  block = &b;
  gridDim = grid;
  blockDim = threads_per_block;
  for (const dim3& id : blocks) {
    blockIdx = id;
    b.shared.assign(shared_bytes, static_cast<char>(0x5a));       // garbage, as a GPU's
    b.shuffles.assign(threads, 0);
    for (auto& lanes : b.lanes) lanes.assign(threads, std::nanf(""));    // no value left from the last block
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      f.state = State::runnable;
      f.tid = t;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = STACK_BYTES;
      f.context.uc_link = nullptr;
      makecontext(&f.context, fiber_entry, 0);
    }
    try {
      run_block(threads, rng);
    } catch (...) {
      block = outer;
      throw;
    }
    if (!b.error.empty()) {
      block = outer;
      throw std::runtime_error("CUDA emulation: " + b.error);
    }
  }
  block = outer;
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::yield_as(cuda_emu::State::at_block_barrier); }

// One barrier a shuffle: a thread reads its partner's value before it writes the next shuffle's, into
// the other buffer, and the next barrier waits for every thread of the warp, so none overwrites a
// value another has still to read.
inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  cuda_emu::Block& b = *cuda_emu::block;
  const unsigned t = b.current->tid, warp = t / 32 * 32;
  unsigned partner = warp + ((t - warp) ^ static_cast<unsigned>(lane_mask));
  if (lane_mask < 0 || lane_mask > 31) {
    b.error = "a warp shuffle with lane mask " + std::to_string(lane_mask) + ", outside 0..31 (a GPU takes its "
              "low 5 bits)";
    partner = t;
  } else if (partner >= b.fibers.size()) {
    b.error = "a warp shuffle from a lane past the block's threads";
    partner = t;
  }
  b.partners[t] = partner;
  std::vector<float>& lanes = b.lanes[b.shuffles[t]++ % 2];
  lanes[t] = value;
  cuda_emu::yield_as(cuda_emu::State::at_warp_barrier);
  return lanes[partner];
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

inline int atomicMin(int* address, int value) {
  int old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

template <typename T>
inline T __ldcg(const T* p) { return *p; }

inline float normcdff(float z) { return 0.5f * std::erfc(-z * 0.70710678118654752f); }
