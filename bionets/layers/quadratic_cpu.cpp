// The quadratic layer's symmetric form on the CPU, forward and backward (built on first use by
// bionets/layers/cpu_kernels.py; registered as torch.ops.bionets_quadratic_cpu).
//
// With K = C(C+1)/2 products x_i x_j (i <= j) per row of x [m, C], in row-major triangle order
// (i = 0: j = 0..C-1; i = 1: j = 1..C-1; ...), and S [K, C_out] the folded weight
// (bionets/layers/quadratic_sym.py):
//     forward      q  = P S                       P = products(x)  [m, K]
//     dL/dS           = P^T g
//     dL/dx        gp = g S^T                     gp_ij = dL/d(x_i x_j)
//                  dx_k = sum_{j >= k} gp_kj x_j + sum_{i <= k} gp_ik x_i      (pair_grads_to_x)
// The rows are split into blocks; each thread takes consecutive blocks, forms a block's products in
// its own buffer (sized by the caller to stay in cache) and hands them to PyTorch's matmul (MKL),
// single-threaded inside the parallel region. x and dL/dx float32, rows contiguous (any row stride);
// S, the products, g and dL/dS in S's dtype: float32, or bf16 under CPU bf16 autocast (the products
// formed in float32 and rounded once; bf16 matmuls, the blocks' dL/dS summed in float32).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using namespace bionets_cpu;      // Vec, VL, sum_lanes; load / store: the products and dL/d(products)
                                  // float32, or bf16 under CPU bf16 autocast (x, dL/dx and the
                                  // arithmetic stay float32)

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1,
              "bionets quadratic CPU kernels: ", what, " must be float32 [rows, columns] with contiguous rows");
}

// P [n, K] (row stride K) <- the products x_i x_j, i <= j, of n rows of x
template <typename T>
void products(const float* xp, int64_t ldx, int64_t C, int64_t n, T* o) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = xp + r * ldx;
    for (int64_t i = 0; i < C; ++i) {              // triangle row i: x_i x[i:]
      const Vec xi(xr[i]);
      const int64_t len = C - i;
      for (int64_t k = 0; k < len; k += VL) {
        const int64_t cnt = std::min(VL, len - k);
        store(xi * Vec::loadu(xr + i + k, cnt), o + k, cnt);
      }
      o += len;
    }
  }
}

// C = NV vector registers: dx accumulated in registers. Triangle row i read as base[j] = gp_ij with
// base = (its start) - i, so that lane j of each load is column j (lanes j < i, other pairs' values,
// masked out); the first sum, per i a dot product, goes through rowdot.
template <int64_t NV, typename T>
void pair_grads_fixed(const float* xp, int64_t ldx, const T* gpp, int64_t n, float* dp, int64_t ldd) {
  constexpr int64_t C = NV * VL, K = C * (C + 1) / 2;
  float lanes[VL], rowdot[C];
  for (int64_t l = 0; l < VL; ++l) lanes[l] = static_cast<float>(l);
  const Vec lane = Vec::loadu(lanes);
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = xp + r * ldx;
    const T* g = gpp + r * K;
    Vec xs[NV], acc[NV];
    for (int64_t k = 0; k < NV; ++k) {
      xs[k] = Vec::loadu(xr + k * VL);
      acc[k] = Vec(0.f);
    }
    int64_t start = 0;
    for (int64_t i = 0; i < C; ++i) {
      const T* base = g + start - i;
      const Vec xi(xr[i]);
      const int64_t k0 = i / VL;
      Vec dot(0.f);
      for (int64_t k = k0; k < NV; ++k) {
        Vec val = load(base + k * VL);
        if (k == k0) val = Vec::blendv(Vec(0.f), val, lane >= Vec(static_cast<float>(i - k * VL)));
        acc[k] = at::vec::fmadd(val, xi, acc[k]);      // sum_{i <= k} gp_ik x_i, lane k
        dot = at::vec::fmadd(val, xs[k], dot);         // sum_{j >= i} gp_ij x_j
      }
      rowdot[i] = sum_lanes(dot);
      start += C - i;
    }
    for (int64_t k = 0; k < NV; ++k) (acc[k] + Vec::loadu(rowdot + k * VL)).store(dp + r * ldd + k * VL);
  }
}

// any C: dx accumulated in memory, triangle row by triangle row
template <typename T>
void pair_grads_any(const float* xp, int64_t ldx, int64_t C, const T* gpp, int64_t n, float* dp, int64_t ldd) {
  std::vector<float> acc(C);
  const int64_t K = C * (C + 1) / 2;
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = xp + r * ldx;
    const T* g = gpp + r * K;
    float* a = acc.data();
    std::fill(a, a + C, 0.f);
    for (int64_t i = 0; i < C; ++i) {
      const Vec xi(xr[i]);
      const int64_t len = C - i;
      Vec dot(0.f);
      for (int64_t k = 0; k < len; k += VL) {
        const int64_t cnt = std::min(VL, len - k);
        const Vec gk = load(g + k, cnt);
        dot = at::vec::fmadd(gk, Vec::loadu(xr + i + k, cnt), dot);
        at::vec::fmadd(gk, xi, Vec::loadu(a + i + k, cnt)).store(a + i + k, cnt);
      }
      a[i] += sum_lanes(dot);
      g += len;
    }
    std::copy(a, a + C, dp + r * ldd);
  }
}

// dx [n, C] (row stride ldd) <- dL/dx of n rows from gp [n, K] = dL/d(x_i x_j) and x
template <typename T>
void pair_grads_to_x(const float* xp, int64_t ldx, int64_t C, const T* gp, int64_t n, float* dp, int64_t ldd) {
  switch (C % VL ? 0 : C / VL) {
    case 1: return pair_grads_fixed<1>(xp, ldx, gp, n, dp, ldd);
    case 2: return pair_grads_fixed<2>(xp, ldx, gp, n, dp, ldd);
    case 3: return pair_grads_fixed<3>(xp, ldx, gp, n, dp, ldd);
    case 4: return pair_grads_fixed<4>(xp, ldx, gp, n, dp, ldd);
    case 6: return pair_grads_fixed<6>(xp, ldx, gp, n, dp, ldd);
    case 8: return pair_grads_fixed<8>(xp, ldx, gp, n, dp, ldd);
    default: return pair_grads_any(xp, ldx, C, gp, n, dp, ldd);
  }
}

struct Shapes {
  int64_t m, C, K, blocks, threads;     // threads: how many of at::parallel_for's threads get blocks
};

// Checks the operands; the rows split into blocks of `block` rows, each working thread's products in
// its own [block, K] slice of `work` (a thread's blocks are consecutive; at most one thread a block).
Shapes check(const at::Tensor& x, const at::Tensor& s, const at::Tensor& work, int64_t block) {
  check_rows(x, "x");
  TORCH_CHECK((s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16) && s.dim() == 2,
              "bionets quadratic CPU kernels: S must be float32 or bf16 [K, C_out]");
  const int64_t m = x.size(0), C = x.size(1), K = C * (C + 1) / 2;
  TORCH_CHECK(s.size(0) == K, "bionets quadratic CPU kernels: S must have C(C+1)/2 = ", K, " rows, got ", s.size(0));
  TORCH_CHECK(block > 0, "bionets quadratic CPU kernels: block must be positive");
  const int64_t blocks = (m + block - 1) / block;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  TORCH_CHECK(work.scalar_type() == s.scalar_type() && work.is_contiguous() && work.numel() >= threads * block * K,
              "bionets quadratic CPU kernels: work must hold min(threads, blocks) * block * C(C+1)/2 elements of S's dtype");
  return {m, C, K, blocks, threads};
}

// This thread's slot in the per-thread buffers: called from inside another parallel region,
// at::parallel_for runs the whole range on the calling thread, whose number means nothing here.
inline int64_t slot(bool nested) { return nested ? 0 : at::get_thread_num(); }

// out [m, C_out] <- P S, block by block (each block's products stay in its thread's cache); P, S
// and out in T
template <typename T>
void forward_as(const at::Tensor& x, const at::Tensor& s, at::Tensor& out, at::Tensor& work, int64_t block,
                const Shapes& sh) {
  const bool nested = at::in_parallel_region();
  at::parallel_for(0, sh.blocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;   // worker threads do not inherit the caller's mode
    at::Tensor p = work.narrow(0, slot(nested) * block * sh.K, block * sh.K).view({block, sh.K});
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block, n = std::min(block, sh.m - r0);
      products(x.const_data_ptr<float>() + r0 * x.stride(0), x.stride(0), sh.C, n, p.data_ptr<T>());
      at::Tensor o = out.narrow(0, r0, n);
      at::mm_out(o, p.narrow(0, 0, n), s);
    }
  });
}

void forward(const at::Tensor& x, const at::Tensor& s, at::Tensor& out, at::Tensor& work, int64_t block) {
  const Shapes sh = check(x, s, work, block);
  TORCH_CHECK(out.scalar_type() == s.scalar_type() && out.dim() == 2 && out.size(0) == sh.m && out.size(1) == s.size(1),
              "bionets quadratic CPU kernels: out must be [m, C_out] in S's dtype");
  if (s.scalar_type() == at::kBFloat16) return forward_as<at::BFloat16>(x, s, out, work, block, sh);
  forward_as<float>(x, s, out, work, block, sh);
}

// dx [m, C] <- dL/dx (g S^T unfolded) and ds [K, C_out] <- P^T g, block by block; an empty dx or ds
// is not computed. ds sums each thread's part (in `partial`, float32 [threads, K, C_out]) in thread
// order. g, ds, the products and dL/d(products) in S's dtype T; x and dx float32.
template <typename T>
void backward_as(const at::Tensor& x, const at::Tensor& s, const at::Tensor& g, at::Tensor& dx, at::Tensor& ds,
                 at::Tensor& work, at::Tensor& partial, int64_t block, const Shapes& sh) {
  const bool want_x = dx.numel() > 0, want_s = ds.numel() > 0;
  const at::Tensor st = s.t();
  const bool nested = at::in_parallel_region();
  at::parallel_for(0, sh.blocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;   // worker threads do not inherit the caller's mode
    const int64_t t = slot(nested);
    at::Tensor p = work.narrow(0, t * block * sh.K, block * sh.K).view({block, sh.K});
    at::Tensor part = want_s ? partial.select(0, t) : at::Tensor();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block, n = std::min(block, sh.m - r0);
      const at::Tensor gb = g.narrow(0, r0, n);
      at::Tensor pb = p.narrow(0, 0, n);
      if (want_s) {                                  // dL/dS += P^T g
        products(x.const_data_ptr<float>() + r0 * x.stride(0), x.stride(0), sh.C, n, p.data_ptr<T>());
        if constexpr (std::is_same_v<T, float>) {
          part.addmm_(pb.t(), gb);
        } else {
          part.add_(at::mm(pb.t(), gb));             // bf16 matmul, float32 sum over the blocks
        }
      }
      if (want_x) {                                  // dL/d(x_i x_j) = g S^T, then dL/dx
        at::mm_out(pb, gb, st);
        pair_grads_to_x(x.const_data_ptr<float>() + r0 * x.stride(0), x.stride(0), sh.C, p.const_data_ptr<T>(), n,
                        dx.data_ptr<float>() + r0 * dx.stride(0), dx.stride(0));
      }
    }
  });
  if (want_s) ds.copy_(partial.narrow(0, 0, sh.threads).sum(0));
}

void backward(const at::Tensor& x, const at::Tensor& s, const at::Tensor& g, at::Tensor& dx, at::Tensor& ds,
              at::Tensor& work, at::Tensor& partial, int64_t block) {
  const Shapes sh = check(x, s, work, block);
  TORCH_CHECK(g.scalar_type() == s.scalar_type() && g.dim() == 2 && g.size(0) == sh.m && g.size(1) == s.size(1),
              "bionets quadratic CPU kernels: g must be [m, C_out] in S's dtype");
  if (dx.numel() > 0) check_rows(dx, "dx");
  if (ds.numel() > 0) {
    TORCH_CHECK(ds.scalar_type() == s.scalar_type() && ds.sizes() == s.sizes() && partial.scalar_type() == at::kFloat &&
                    partial.dim() == 3 && partial.size(0) >= sh.threads && partial.size(1) == sh.K &&
                    partial.size(2) == s.size(1),
                "bionets quadratic CPU kernels: ds must be like S, partial float32 [min(threads, blocks), K, C_out]");
    partial.zero_();
  }
  if (s.scalar_type() == at::kBFloat16) return backward_as<at::BFloat16>(x, s, g, dx, ds, work, partial, block, sh);
  backward_as<float>(x, s, g, dx, ds, work, partial, block, sh);
}

}  // namespace

TORCH_LIBRARY(bionets_quadratic_cpu, m) {
  m.def("forward(Tensor x, Tensor s, Tensor(a!) out, Tensor(b!) work, int block) -> ()");
  m.def("backward(Tensor x, Tensor s, Tensor g, Tensor(a!) dx, Tensor(b!) ds, Tensor(c!) work, Tensor(d!) partial, "
        "int block) -> ()");
}

TORCH_LIBRARY_IMPL(bionets_quadratic_cpu, CPU, m) {
  m.impl("forward", forward);
  m.impl("backward", backward);
}
