// The element-wise halves of the quadratic layer's symmetric form on the CPU, around PyTorch's matmuls
// (built on first use by bionets/layers/cpu_kernels.py; registered as torch.ops.bionets_quadratic_cpu).
//
// With K = C(C+1)/2 products x_i x_j (i <= j) per row of x [m, C], in row-major triangle order
// (i = 0: j = 0..C-1; i = 1: j = 1..C-1; ...), and S [K, C_out] the folded weight
// (bionets/layers/quadratic_sym.py):
//     forward      q  = P S                       P = products(x)  [m, K]
//     dL/dS           = P^T g
//     dL/dx        gp = g S^T                     gp_ij = dL/d(x_i x_j)
//                  dx_k = sum_{j >= k} gp_kj x_j + sum_{i <= k} gp_ik x_i      (pair_grads_to_x)
// The matmuls are PyTorch's (MKL); these kernels replace the C per-triangle-row PyTorch ops per chunk
// of rows that formed P and unfolded gp. float32, rows contiguous (any row stride).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();

inline float sum_lanes(const Vec& a) {
  return at::vec::vec_reduce_all<float>([](const Vec& p, const Vec& q) { return p + q; }, a);
}

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1,
              "bionets quadratic CPU kernels: ", what, " must be float32 [rows, columns] with contiguous rows");
}

// out [m, K] <- the products x_i x_j, i <= j, of every row of x [m, C]
void products(const at::Tensor& x, at::Tensor& out) {
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t m = x.size(0), C = x.size(1), ldx = x.stride(0), ldo = out.stride(0);
  TORCH_CHECK(out.size(0) == m && out.size(1) == C * (C + 1) / 2, "bionets quadratic CPU kernels: out must be [m, C(C+1)/2]");
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * ldx;
      float* o = op + r * ldo;
      for (int64_t i = 0; i < C; ++i) {            // triangle row i: x_i x[i:]
        const Vec xi(xr[i]);
        const int64_t n = C - i;
        for (int64_t k = 0; k < n; k += VL) {
          const int64_t cnt = std::min(VL, n - k);
          (xi * Vec::loadu(xr + i + k, cnt)).store(o + k, cnt);
        }
        o += n;
      }
    }
  });
}

// C = NV vector registers: dx accumulated in registers. Triangle row i read as base[j] = gp_ij with
// base = (its start) - i, so that lane j of each load is column j (lanes j < i, other pairs' values,
// masked out); the first sum, per i a dot product, goes through rowdot.
template <int64_t NV>
void pair_grads_fixed(const float* xp, const float* gpp, float* dp, int64_t m, int64_t ldx, int64_t ldg, int64_t ldd) {
  constexpr int64_t C = NV * VL;
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    float lanes[VL], rowdot[C];
    for (int64_t l = 0; l < VL; ++l) lanes[l] = static_cast<float>(l);
    const Vec lane = Vec::loadu(lanes);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * ldx;
      const float* g = gpp + r * ldg;
      Vec xs[NV], acc[NV];
      for (int64_t k = 0; k < NV; ++k) {
        xs[k] = Vec::loadu(xr + k * VL);
        acc[k] = Vec(0.f);
      }
      int64_t start = 0;
      for (int64_t i = 0; i < C; ++i) {
        const float* base = g + start - i;
        const Vec xi(xr[i]);
        const int64_t k0 = i / VL;
        Vec dot(0.f);
        for (int64_t k = k0; k < NV; ++k) {
          Vec val = Vec::loadu(base + k * VL);
          if (k == k0) val = Vec::blendv(Vec(0.f), val, lane >= Vec(static_cast<float>(i - k * VL)));
          acc[k] = at::vec::fmadd(val, xi, acc[k]);      // sum_{i <= k} gp_ik x_i, lane k
          dot = at::vec::fmadd(val, xs[k], dot);         // sum_{j >= i} gp_ij x_j
        }
        rowdot[i] = sum_lanes(dot);
        start += C - i;
      }
      for (int64_t k = 0; k < NV; ++k) (acc[k] + Vec::loadu(rowdot + k * VL)).store(dp + r * ldd + k * VL);
    }
  });
}

// any C: dx accumulated in memory, triangle row by triangle row
void pair_grads_any(const float* xp, const float* gpp, float* dp, int64_t m, int64_t C, int64_t ldx, int64_t ldg,
                    int64_t ldd) {
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * ldx;
      const float* g = gpp + r * ldg;
      float* a = acc.data();
      std::fill(a, a + C, 0.f);
      for (int64_t i = 0; i < C; ++i) {
        const Vec xi(xr[i]);
        const int64_t n = C - i;
        Vec dot(0.f);
        for (int64_t k = 0; k < n; k += VL) {
          const int64_t cnt = std::min(VL, n - k);
          const Vec gk = Vec::loadu(g + k, cnt);
          dot = at::vec::fmadd(gk, Vec::loadu(xr + i + k, cnt), dot);
          at::vec::fmadd(gk, xi, Vec::loadu(a + i + k, cnt)).store(a + i + k, cnt);
        }
        a[i] += sum_lanes(dot);
        g += n;
      }
      std::copy(a, a + C, dp + r * ldd);
    }
  });
}

// dx [m, C] <- dL/dx from gp [m, K] = dL/d(x_i x_j) and x [m, C]
void pair_grads_to_x(const at::Tensor& gp, const at::Tensor& x, at::Tensor& dx) {
  check_rows(gp, "gp");
  check_rows(x, "x");
  check_rows(dx, "dx");
  const int64_t m = x.size(0), C = x.size(1);
  TORCH_CHECK(gp.size(0) == m && gp.size(1) == C * (C + 1) / 2 && dx.size(0) == m && dx.size(1) == C,
              "bionets quadratic CPU kernels: gp must be [m, C(C+1)/2] and dx [m, C]");
  const float* xp = x.const_data_ptr<float>();
  const float* gpp = gp.const_data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldg = gp.stride(0), ldd = dx.stride(0);
  switch (C % VL ? 0 : C / VL) {
    case 1: return pair_grads_fixed<1>(xp, gpp, dp, m, ldx, ldg, ldd);
    case 2: return pair_grads_fixed<2>(xp, gpp, dp, m, ldx, ldg, ldd);
    case 3: return pair_grads_fixed<3>(xp, gpp, dp, m, ldx, ldg, ldd);
    case 4: return pair_grads_fixed<4>(xp, gpp, dp, m, ldx, ldg, ldd);
    case 6: return pair_grads_fixed<6>(xp, gpp, dp, m, ldx, ldg, ldd);
    case 8: return pair_grads_fixed<8>(xp, gpp, dp, m, ldx, ldg, ldd);
    default: return pair_grads_any(xp, gpp, dp, m, C, ldx, ldg, ldd);
  }
}

}  // namespace

TORCH_LIBRARY(bionets_quadratic_cpu, m) {
  m.def("products(Tensor x, Tensor(a!) out) -> ()");
  m.def("pair_grads_to_x(Tensor gp, Tensor x, Tensor(a!) dx) -> ()");
}

TORCH_LIBRARY_IMPL(bionets_quadratic_cpu, CPU, m) {
  m.impl("products", products);
  m.impl("pair_grads_to_x", pair_grads_to_x);
}
