// RAA's vector and scalar variants as CUDA kernels: one kernel each way, one pass over the map
// (built on first use by bionets/layers/cuda_kernels.py; the operators and their C++ autograd are in
// raa_cuda.cpp).
//
// forward, per feature vector x (one token, or one pixel of a map), c a scalar:
//     s = v . x + c                         (scalar variant: s = c)
//     y = x Phi(x + s)   (gelu form)        y = max(0, x + s)   (relu form)
// backward, with z = x + s and g = dL/dy:
//     gs    = sum_features g dy/ds          (x phi(z), or 1[z > 0])
//     dL/dx = g dy/dx|_s + v gs             (Phi(z) + x phi(z), or 1[z > 0])
//     dL/dv = sum_vectors gs x,  dL/dc = sum_vectors gs
//
// x is read as [N, C, P] with one stride each (NCHW maps, channels_last maps, token tensors; no
// copy). Two kernel families:
// - rows (features contiguous, as in channels_last maps and tokens, x 16-byte aligned, C a multiple
//   of 16 bytes' worth of elements, at most 128 such chunks): x is an [M, C] matrix, each thread
//   reads and writes 16 bytes at a time (8 bf16 features); a group of G threads takes one vector (G
//   the power of two >= its chunks, at most 32, a thread up to 4 chunks). The backward keeps a
//   thread's partial sums of dL/dv in registers across the vectors it takes.
// - generic (NCHW maps, and what the rows kernels do not take): one element a thread a step (G = 1
//   when the pixels are contiguous, NCHW: neighbouring threads read neighbouring pixels; else the
//   power of two >= C, at most 32), partial sums in shared memory.
// Sums over a vector are shuffles within the group. Math in float32 for float32, bf16 and fp16 x;
// s and the parameters' gradients are float32. The sums over vectors are taken per block in a fixed
// order, and then over the blocks in a fixed order: by the backward's last block to finish where
// the blocks' partial sums are few (at most 32768 floats), else by a second kernel, 32 columns a
// block (a single block summing ViT-Tiny's 769 columns over hundreds of blocks took ~0.1 ms): the
// same result on every run.
//
// An H200 ran the first kernels of this file (generic only, one bf16 element a thread) 5-20 times
// slower than its memory allows: ResNet-20's 19 RAA layers took 0.87 ms of GPU time in the backward
// a step (ReLU's: 0.04), ViT-Tiny's 12 2.4 ms, and the eager backward, whose launches come from
// autograd's C++ thread, waits on the GPU.
//
// An eager step of a CIFAR-sized model waits on the host in its forward (an H200's: ~3 ms of GPU
// work in 10-14 ms), where each launch costs 13-19 us and each allocation ~7, so the forward's
// buffer of shifts, `s`, also holds the backward's scratch: [M shifts | 1 block counter | blocks x
// width partial sums], the counter zeroed by the forward and again by the backward's last block (so
// a retained graph's second backward finds it zero). The backward then allocates dL/dx and one
// buffer for dL/dv and dL/dc, and launches one kernel. Where the partial sums are more than 32768
// floats (ViT-Tiny's 768-wide MLP) the backward allocates them, and a second kernel sums them.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "raa_shift.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int THREADS = 256;
constexpr int MAX_BLOCKS = 1024;            // backward: a fixed grid, so the order of the sums is fixed
constexpr int ROWS_MAX_BLOCKS = 512;        // (the rows kernels: 16 bytes a load, fewer threads fill the GPU)
constexpr int MAX_CHUNKS = 4;               // rows kernels: 16-byte chunks a thread a vector
constexpr int SHARED_FLOATS = 8192;         // backward: partial sums per block (32 KB)
constexpr float INV_SQRT_2PI = 0.3989422804014327f;

struct Layout {
  int64_t M, C, P, sn, sc, sp;              // M = N P vectors
  int G;                                    // threads per vector
  int64_t Q = 0;                            // rows kernels: 16-byte chunks a vector (0: the generic kernels)
  int64_t rows_Q = 0;                       // the chunks the rows kernels would take were x 16-byte aligned
  __device__ int64_t base(int64_t row) const { return (row / P) * sn + (row % P) * sp; }
};

// 16 bytes of T, read or written as one access (the pointer 16-byte aligned)
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T e[N];
};

__device__ __forceinline__ float group_sum(float a, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) a += __shfl_xor_sync(0xffffffffu, a, offset);
  return a;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p) { return static_cast<float>(*p); }

template <typename T, bool RELU, bool HAS_V>
__global__ void forward_kernel(const T* __restrict__ x, const float* __restrict__ v, const float* __restrict__ c,
                               T* __restrict__ y, float* __restrict__ s, Layout l) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *reinterpret_cast<unsigned int*>(s + l.M) = 0u;   // the backward's counter
  const int lane = threadIdx.x % l.G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / l.G) + threadIdx.x / l.G;
  const bool valid = row < l.M;
  const int64_t b = valid ? l.base(row) : 0;
  float dot = 0.f;
  if (HAS_V && valid) {
    for (int64_t k = lane; k < l.C; k += l.G) dot += ld(x + b + k * l.sc) * v[k];
  }
  if (HAS_V) dot = group_sum(dot, l.G);                 // every lane of the warp takes part
  if (!valid) return;
  const float shift = dot + c[0];
  if (lane == 0) s[row] = shift;
  for (int64_t k = lane; k < l.C; k += l.G) {
    const float xv = ld(x + b + k * l.sc), z = xv + shift;
    y[b + k * l.sc] = static_cast<T>(RELU ? (z <= 0.f ? 0.f : z) : xv * normcdff(z));   // max keeping NaN
  }
}

// The rows kernels' forward: as forward_kernel, on [M, C] rows of 16-byte chunks (see the top)
template <typename T, bool RELU, bool HAS_V, int CH>
__global__ void forward_rows(const T* __restrict__ x, const float* __restrict__ v, const float* __restrict__ c,
                             T* __restrict__ y, float* __restrict__ s, Layout l) {
  using P = Pack<T>;
  constexpr int N = P::N;
  if (blockIdx.x == 0 && threadIdx.x == 0) *reinterpret_cast<unsigned int*>(s + l.M) = 0u;   // the backward's counter
  const int lane = threadIdx.x % l.G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / l.G) + threadIdx.x / l.G;
  const bool valid = row < l.M;
  const int64_t b = valid ? row * l.Q : 0;
  const P* xp = reinterpret_cast<const P*>(x);
  P xs[CH];
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int64_t j = lane + i * l.G;
    if (!valid || j >= l.Q) continue;
    xs[i] = xp[b + j];
    if (HAS_V) {
#pragma unroll
      for (int e = 0; e < N; ++e) dot += static_cast<float>(xs[i].e[e]) * v[j * N + e];
    }
  }
  if (HAS_V) dot = group_sum(dot, l.G);                 // every lane of the warp takes part
  if (!valid) return;
  const float shift = dot + c[0];
  if (lane == 0) s[row] = shift;
  P* yp = reinterpret_cast<P*>(y);
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int64_t j = lane + i * l.G;
    if (j >= l.Q) continue;
    P out;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float xv = static_cast<float>(xs[i].e[e]), z = xv + shift;
      out.e[e] = static_cast<T>(RELU ? (z <= 0.f ? 0.f : z) : xv * normcdff(z));
    }
    yp[b + j] = out;
  }
}

// dy/dx|_s and dy/ds at x, z = x + s
template <bool RELU>
__device__ __forceinline__ void slopes(float xv, float z, float& dydx, float& dyds) {
  if (RELU) {
    dydx = dyds = z <= 0.f ? 0.f : 1.f;                         // as threshold_backward: NaN passes
  } else {
    dyds = xv * expf(-0.5f * z * z) * INV_SQRT_2PI;            // x phi(z)
    dydx = normcdff(z) + dyds;                                   // Phi(z) + x phi(z)
  }
}

// This block's partial sums [groups, width] in shared memory (acc) summed over its groups into
// part[block, width]; then, with `done` (the count of finished blocks, zero on entry), the last
// block to finish sums every block's, in a fixed order, into gvc (else sum_columns does, after).
__device__ void sum_blocks(float* acc, int64_t groups, int64_t width, float* part, unsigned int* done, float* gvc) {
  __syncthreads();
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
    float total = 0.f;
    for (int64_t j = 0; j < groups; ++j) total += acc[j * width + k];
    part[blockIdx.x * width + k] = total;
  }
  if (done == nullptr) return;
  // the last block to finish (its partial sums written and made visible first) sums every block's
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // One block sums gridDim.x rows of partials a column, read from L2 (not a stale L1): a load takes
  // hundreds of cycles, so the reads must overlap: a narrow layer's columns are each split into
  // slices of rows, a thread a slice, as many as the block has threads for (ResNet's 17-65
  // columns: 15-3 slices), and every thread keeps UNROLL running sums, a load in flight each. Rows,
  // running sums and slices are combined in a fixed order: the same bits every run.
  constexpr int UNROLL = 8;
  const int64_t rows = gridDim.x;
  const int64_t fit = static_cast<int64_t>(blockDim.x) / width;
  const int64_t slices = fit < 1 ? 1 : fit < groups ? fit : groups;     // acc holds groups x width
  for (int64_t t = threadIdx.x; t < slices * width; t += blockDim.x) {
    const int64_t k = t % width, r = t / width, lo = rows * r / slices, hi = rows * (r + 1) / slices;
    float sums[UNROLL] = {};
    int64_t j = lo;
    for (; j + UNROLL <= hi; j += UNROLL) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) sums[u] += __ldcg(part + (j + u) * width + k);
    }
    for (; j < hi; ++j) sums[0] += __ldcg(part + j * width + k);     // (a constant index keeps sums in registers)
    float total = 0.f;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) total += sums[u];
    acc[r * width + k] = total;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < width; k += blockDim.x) {
    float total = 0.f;
    for (int64_t r = 0; r < slices; ++r) total += acc[r * width + k];
    gvc[k] = total;
  }
  if (threadIdx.x == 0) *done = 0u;                           // for the next backward of this graph
}

// gvc[k] = the sum over `rows` blocks' partial sums part[row, k], 32 columns a block of 256
// threads: 8 slices of rows (a thread every 8th row, 8 loads in flight), combined in a fixed order
constexpr int SUM_THREADS = 256;
__global__ void sum_columns(const float* __restrict__ part, int64_t rows, int64_t width, float* __restrict__ gvc) {
  constexpr int UNROLL = 8, SLICES = SUM_THREADS / 32;
  __shared__ float sliced[SUM_THREADS];
  const int column = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + column;
  float sums[UNROLL] = {};
  if (k < width) {
    int64_t r = slice;
    for (; r + (UNROLL - 1) * SLICES < rows; r += UNROLL * SLICES) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) sums[u] += part[(r + u * SLICES) * width + k];
    }
    for (; r < rows; r += SLICES) sums[0] += part[r * width + k];
  }
  float total = 0.f;
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) total += sums[u];
  sliced[threadIdx.x] = total;
  __syncthreads();
  if (slice == 0 && k < width) {
    float all = 0.f;
    for (int j = 0; j < SLICES; ++j) all += sliced[j * 32 + column];
    gvc[k] = all;
  }
}

// dL/dx; per block the partial sums of dL/dv (C of them, with v) and dL/dc (the last) in
// part[block, width], width = C + 1 (with v) or 1, summed over the blocks by sum_blocks.
template <typename T, bool RELU, bool HAS_V>
__global__ void backward_kernel(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ s,
                                const float* __restrict__ v, T* __restrict__ gx, float* __restrict__ part,
                                unsigned int* __restrict__ done, float* __restrict__ gvc, Layout l) {
  extern __shared__ float acc[];                 // [groups, width]: each entry written by one thread only
  const int groups = blockDim.x / l.G, group = threadIdx.x / l.G, lane = threadIdx.x % l.G;
  const int64_t width = HAS_V ? l.C + 1 : 1;
  for (int64_t k = threadIdx.x; k < groups * width; k += blockDim.x) acc[k] = 0.f;
  __syncthreads();
  float* mine = acc + group * width;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < l.M; first += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = first + group;
    const bool valid = row < l.M;
    const int64_t b = valid ? l.base(row) : 0;
    const float shift = valid ? s[row] : 0.f;
    float gs = 0.f;
    if (valid) {
      for (int64_t k = lane; k < l.C; k += l.G) {
        const float xv = ld(x + b + k * l.sc);
        float dydx, dyds;
        slopes<RELU>(xv, xv + shift, dydx, dyds);
        gs += ld(g + b + k * l.sc) * dyds;
      }
    }
    gs = group_sum(gs, l.G);                                     // every lane of the warp takes part
    if (!valid) continue;
    for (int64_t k = lane; k < l.C; k += l.G) {
      const float xv = ld(x + b + k * l.sc), gv = ld(g + b + k * l.sc);
      float dydx, dyds;
      slopes<RELU>(xv, xv + shift, dydx, dyds);
      float d = gv * dydx;
      if (HAS_V) {
        d += v[k] * gs;
        mine[k] += gs * xv;
      }
      gx[b + k * l.sc] = static_cast<T>(d);
    }
    if (lane == 0) mine[width - 1] += gs;
  }
  sum_blocks(acc, groups, width, part, done, gvc);
}

// The rows kernels' backward: as backward_kernel, on [M, C] rows of 16-byte chunks, a thread's
// chunks j = lane + i G (i < CH); its partial sums of dL/dv in registers until the block sums them.
template <typename T, bool RELU, bool HAS_V, int CH>
__global__ void backward_rows(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ s,
                              const float* __restrict__ v, T* __restrict__ gx, float* __restrict__ part,
                              unsigned int* __restrict__ done, float* __restrict__ gvc, Layout l) {
  using P = Pack<T>;
  constexpr int N = P::N;
  extern __shared__ float acc[];                 // [groups, width]: each entry written by one thread only
  const int groups = blockDim.x / l.G, group = threadIdx.x / l.G, lane = threadIdx.x % l.G;
  const int64_t width = HAS_V ? l.C + 1 : 1;
  const P* xp = reinterpret_cast<const P*>(x);
  const P* gp = reinterpret_cast<const P*>(g);
  P* gxp = reinterpret_cast<P*>(gx);
  float gv_sum[HAS_V ? CH * N : 1] = {}, gc_sum = 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < l.M; first += stride) {
    const int64_t row = first + group;
    const bool valid = row < l.M;
    const int64_t b = valid ? row * l.Q : 0;
    const float shift = valid ? s[row] : 0.f;
    P xs[CH], gs_in[CH];
    float gs = 0.f;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int64_t j = lane + i * l.G;
      if (!valid || j >= l.Q) continue;
      xs[i] = xp[b + j];
      gs_in[i] = gp[b + j];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float xv = static_cast<float>(xs[i].e[e]);
        float dydx, dyds;
        slopes<RELU>(xv, xv + shift, dydx, dyds);
        gs += static_cast<float>(gs_in[i].e[e]) * dyds;
      }
    }
    gs = group_sum(gs, l.G);                                     // every lane of the warp takes part
    if (!valid) continue;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int64_t j = lane + i * l.G;
      if (j >= l.Q) continue;
      P out;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const float xv = static_cast<float>(xs[i].e[e]);
        float dydx, dyds;
        slopes<RELU>(xv, xv + shift, dydx, dyds);
        float d = static_cast<float>(gs_in[i].e[e]) * dydx;
        if (HAS_V) {
          d += v[j * N + e] * gs;
          gv_sum[i * N + e] += gs * xv;
        }
        out.e[e] = static_cast<T>(d);
      }
      gxp[b + j] = out;
    }
    gc_sum += gs;                                                // (the same in every lane: lane 0's is kept)
  }
  float* mine = acc + group * width;                             // every entry written once, zeros included
  if (HAS_V) {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int64_t j = lane + i * l.G;
      if (j >= l.Q) continue;
#pragma unroll
      for (int e = 0; e < N; ++e) mine[j * N + e] = gv_sum[i * N + e];
    }
  }
  if (lane == 0) mine[width - 1] = gc_sum;
  sum_blocks(acc, groups, width, part, done, gvc);
}

// the backward's launch: `groups` vectors a block (each with `width` partial sums in shared memory)
// and `blocks` blocks, decided by the layout alone, so that the forward can size the scratch that the
// backward uses
constexpr int64_t MAX_KEPT_PARTIALS = 32768;                   // floats of partial sums kept in `s` (128 KB)

struct Grid {
  int64_t width, groups;
  int blocks;
  int64_t partials() const { return blocks * width; }
  bool partials_in_s() const { return partials() <= MAX_KEPT_PARTIALS; }
  int64_t scratch() const { return 1 + (partials_in_s() ? partials() : 0); }   // the counter, then the partial sums
  // (the partial sums kept are summed by the last block, which the counter finds; the others by sum_columns)
};

Grid backward_grid(const Layout& l, bool has_v) {
  Grid grid{};
  grid.width = has_v ? l.C + 1 : 1;
  grid.groups = std::max<int64_t>(1, std::min<int64_t>(THREADS / l.G, SHARED_FLOATS / grid.width));
  const int64_t most = l.Q ? ROWS_MAX_BLOCKS : MAX_BLOCKS;
  grid.blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(most, (l.M + grid.groups - 1) / grid.groups)));
  return grid;
}

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// l's threads a vector with Q chunks (rows kernels) or none (element kernels)
Layout grouped(Layout l, int64_t Q) {
  l.Q = Q;
  l.G = 1;
  const int64_t wanted = Q ? Q : l.C;
  while (l.sc == 1 && l.G < 32 && l.G < wanted) l.G *= 2;   // (NCHW: one thread a vector)
  return l;
}

// dim 1 of a 4-D map (contiguous or channels_last), or the last dim of a contiguous tensor; the rows
// kernels' where they take it
Layout layout_of(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.is_cuda(), "bionets RAA CUDA kernels take CUDA tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "bionets RAA CUDA kernels take float32, bf16 or fp16, got ", x.scalar_type());
  Layout l{};
  if (dim == 1) {
    TORCH_CHECK(x.dim() == 4, "bionets RAA CUDA kernels: a map must be 4-D");
    const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
    if (x.is_contiguous()) {
      l = Layout{N * P, C, P, C * P, P, 1, 1};
    } else {
      TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "bionets RAA CUDA kernels: map neither NCHW nor channels_last");
      l = Layout{N * P, C, P, C * P, 1, C, 1};
    }
  } else {
    TORCH_CHECK(x.is_contiguous(), "bionets RAA CUDA kernels: features-last tensor not contiguous");
    const int64_t C = x.size(-1);
    l = Layout{C ? x.numel() / C : 0, C, 1, C, 1, 0, 1};
  }
  TORCH_CHECK(l.C + 1 <= SHARED_FLOATS, "bionets RAA CUDA kernels take at most ", SHARED_FLOATS - 1, " features");
  // the features contiguous (an [M, C] matrix): a group of threads per vector, 16-byte chunks where
  // they fit (the rows kernels), else one element a thread a step
  const int64_t per_chunk = 16 / static_cast<int64_t>(x.element_size());
  if (l.sc == 1 && l.C % per_chunk == 0 && l.C / per_chunk <= 32 * MAX_CHUNKS) l.rows_Q = l.C / per_chunk;
  return grouped(l, aligned(x) ? l.rows_Q : 0);
}

// floats of the backward's scratch after the shifts in `s`: enough for either kernel family, since
// the backward chooses by the alignment of the x it gets back, which a saved-tensor hook may change
int64_t scratch_floats(const Layout& l, bool has_v) {
  return std::max(backward_grid(grouped(l, l.rows_Q), has_v).scratch(), backward_grid(grouped(l, 0), has_v).scratch());
}

// the rows kernels' chunks a thread: 1 (at most 32 chunks a vector) or MAX_CHUNKS
int chunks_per_thread(const Layout& l) { return l.Q <= l.G ? 1 : MAX_CHUNKS; }

// v and c in w (raa_shift.h), on x's device
bionets_raa::Shift shift_on(const at::Tensor& w, const Layout& l, const at::Device& device) {
  TORCH_CHECK(w.device() == device, "bionets RAA CUDA kernels: w must be on x's device");
  return bionets_raa::shift_of(w, l.C);
}

// f(T) for x's dtype, T the kernels' element type
template <typename F>
void with_dtype(at::ScalarType t, const F& f) {
  if (t == at::kFloat) return f(float{});
  if (t == at::kBFloat16) return f(c10::BFloat16{});
  return f(c10::Half{});
}

template <typename F>
void with_flags(bool relu, bool has_v, const F& f) {
  const auto with_v = [&](auto relu_c) {
    has_v ? f(relu_c, std::true_type{}) : f(relu_c, std::false_type{});
  };
  relu ? with_v(std::true_type{}) : with_v(std::false_type{});
}

}  // namespace

// (y, s): s holds the shift of each vector, [N * P], then the backward's scratch (see the top)
std::tuple<at::Tensor, at::Tensor> raa_cuda_forward(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
  const Layout l = layout_of(x, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  const bionets_raa::Shift shift = shift_on(w, l, x.device());
  const float* vp = shift.v;
  at::Tensor y = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t size = l.M + scratch_floats(l, vp != nullptr);
  if (l.M == 0 || l.C == 0) return {y, at::zeros({size}, f32)};
  at::Tensor s = at::empty({size}, f32);
  const int64_t per_block = THREADS / l.G;
  const auto blocks = static_cast<unsigned>((l.M + per_block - 1) / per_block);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_dtype(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    with_flags(relu, vp != nullptr, [&](auto relu_c, auto has_v) {
      constexpr bool R = decltype(relu_c)::value, V = decltype(has_v)::value;
      const auto xp = static_cast<const T*>(x.const_data_ptr());
      const auto yp = static_cast<T*>(y.data_ptr());
      const float* cp = shift.c;
      float* sp = s.data_ptr<float>();
      if (!l.Q) {
        forward_kernel<T, R, V><<<blocks, THREADS, 0, stream>>>(xp, vp, cp, yp, sp, l);
      } else if (chunks_per_thread(l) == 1) {
        forward_rows<T, R, V, 1><<<blocks, THREADS, 0, stream>>>(xp, vp, cp, yp, sp, l);
      } else {
        forward_rows<T, R, V, MAX_CHUNKS><<<blocks, THREADS, 0, stream>>>(xp, vp, cp, yp, sp, l);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, s};
}

// (dL/dx, dL/dw = [dL/dv | dL/dc] (scalar variant: [dL/dc]))
std::tuple<at::Tensor, at::Tensor> raa_cuda_backward(const at::Tensor& x, const at::Tensor& g, const at::Tensor& s,
                                                     const at::Tensor& w, int64_t dim, bool relu) {
  const Layout l = layout_of(x, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  const float* vp = shift_on(w, l, x.device()).v;
  const Grid grid = backward_grid(l, vp != nullptr);
  TORCH_CHECK(s.device() == x.device() && s.scalar_type() == at::kFloat && s.is_contiguous() &&
                  s.numel() == l.M + scratch_floats(l, vp != nullptr),
              "bionets RAA CUDA kernels: the saved shift does not match x");
  TORCH_CHECK(g.device() == x.device() && g.sizes() == x.sizes(), "bionets RAA CUDA kernels: the gradient does not match x");
  // the gradient is read with x's strides (and alignment, by the rows kernels): one copy where it
  // arrives in another layout or dtype
  const bool as_x = g.strides() == x.strides() && g.scalar_type() == x.scalar_type() && (!l.Q || aligned(g));
  const at::Tensor grad = as_x ? g : at::empty_like(x).copy_(g);
  at::Tensor gx = at::empty_like(x);
  // dL/dv and dL/dc in one tensor, the gradient of w
  at::Tensor gvc = at::empty({grid.width}, x.options().dtype(at::kFloat));
  float* scratch = s.data_ptr<float>() + l.M;                 // the forward left it for this
  const at::Tensor partials = grid.partials_in_s() ? at::Tensor() : at::empty({grid.partials()}, gvc.options());
  float* part = grid.partials_in_s() ? scratch + 1 : partials.data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  unsigned int* done = grid.partials_in_s() ? reinterpret_cast<unsigned int*>(scratch) : nullptr;
  const auto threads = static_cast<int>(grid.groups * l.G);
  const size_t shared = grid.groups * grid.width * sizeof(float);
  with_dtype(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    with_flags(relu, vp != nullptr, [&](auto relu_c, auto has_v) {
      constexpr bool R = decltype(relu_c)::value, V = decltype(has_v)::value;
      const auto xp = static_cast<const T*>(x.const_data_ptr());
      const auto gp = static_cast<const T*>(grad.const_data_ptr());
      const auto gxp = static_cast<T*>(gx.data_ptr());
      const float* sp = s.const_data_ptr<float>();
      float* gvcp = gvc.data_ptr<float>();
      if (!l.Q) {
        backward_kernel<T, R, V><<<grid.blocks, threads, shared, stream>>>(xp, gp, sp, vp, gxp, part, done, gvcp, l);
      } else if (chunks_per_thread(l) == 1) {
        backward_rows<T, R, V, 1><<<grid.blocks, threads, shared, stream>>>(xp, gp, sp, vp, gxp, part, done, gvcp, l);
      } else {
        backward_rows<T, R, V, MAX_CHUNKS><<<grid.blocks, threads, shared, stream>>>(xp, gp, sp, vp, gxp, part, done,
                                                                                     gvcp, l);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!done) {
    const auto column_blocks = static_cast<unsigned>((grid.width + 31) / 32);
    sum_columns<<<column_blocks, SUM_THREADS, 0, stream>>>(part, grid.blocks, grid.width, gvc.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gx, gvc};
}
