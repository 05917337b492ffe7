// LayerNorm over the spatial map of a channels_last float32 tensor, forward and backward, without
// leaving channels_last (built on first use by bionets/layers/cpu_kernels.py; registered as
// torch.ops.bionets_map_norm_cpu; bionets/layers/map_norm.py holds the equations).
//
// x [N, P, C] (P = H*W positions, channels innermost), one (n, c) plane normalized over its P
// positions, with a per-position affine w [P], b [P]:
//     mean = sum_p x_p / P,   rstd = 1 / sqrt(sum_p (x_p - mean)^2 / P + eps),   xhat = (x - mean) rstd
//     y_p  = xhat_p w_p + b_p
//     dL/dx_p = rstd (gw_p - mean_p(gw) - xhat_p mean_p(gw xhat)),   gw_p = dL/dy_p w_p
//     dL/dw_p = sum_{n,c} dL/dy_p xhat_p,   dL/db_p = sum_{n,c} dL/dy_p
// Each task is one n and a group of up to GROUP channels (a few vector registers wide): its planes
// are read P times with stride C, all from cache. dL/dw, dL/db: one partial per task and position,
// summed over the tasks in order afterwards, so the result is the same on any number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <tuple>

namespace {

using namespace bionets_cpu;      // Vec, VL, sum_lanes
constexpr int64_t NV = 4;         // vector registers per channel group
constexpr int64_t GROUP = NV * VL;

struct Dims {
  int64_t N, P, C, groups;
};

Dims dims_of(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(),
              "bionets map norm CPU kernels: x must be a contiguous float32 [N, H*W, C] (a channels_last map)");
  return {x.size(0), x.size(1), x.size(2), (x.size(2) + GROUP - 1) / GROUP};
}

void check_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              "bionets map norm CPU kernels: ", what, " must be contiguous float32 with ", n, " elements");
}

// The channels [c0, c0 + width) of one sample: vector k covers c0 + k*VL, `counts[k]` lanes of it.
struct Group {
  int64_t c0, nv, counts[NV];
  Group(int64_t g, int64_t C) : c0(g * GROUP), nv(0) {
    for (int64_t k = 0; k < NV && c0 + k * VL < C; ++k, ++nv) counts[k] = std::min(VL, C - c0 - k * VL);
  }
};

// y, mean [N, C], rstd [N, C] <- the normalized x
void forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps, at::Tensor& y,
             at::Tensor& mean, at::Tensor& rstd) {
  const Dims d = dims_of(x);
  TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous() && y.scalar_type() == at::kFloat,
              "bionets map norm CPU kernels: y must be like x");
  check_vector(w, d.P, "w");
  check_vector(b, d.P, "b");
  check_vector(mean, d.N * d.C, "mean");
  check_vector(rstd, d.N * d.C, "rstd");
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float inv_p = 1.f / static_cast<float>(d.P);
  at::parallel_for(0, d.N * d.groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / d.groups;
      const Group g(t % d.groups, d.C);
      const float* xs = xp + n * d.P * d.C + g.c0;
      float* ys = yp + n * d.P * d.C + g.c0;
      Vec mu[NV], var[NV], rs[NV];
      for (int64_t k = 0; k < g.nv; ++k) mu[k] = var[k] = Vec(0.f);
      for (int64_t p = 0; p < d.P; ++p)
        for (int64_t k = 0; k < g.nv; ++k) mu[k] = mu[k] + Vec::loadu(xs + p * d.C + k * VL, g.counts[k]);
      for (int64_t k = 0; k < g.nv; ++k) mu[k] = mu[k] * Vec(inv_p);
      for (int64_t p = 0; p < d.P; ++p)         // two passes: the variance of the centred values
        for (int64_t k = 0; k < g.nv; ++k) {
          const Vec dv = Vec::loadu(xs + p * d.C + k * VL, g.counts[k]) - mu[k];
          var[k] = at::vec::fmadd(dv, dv, var[k]);
        }
      for (int64_t k = 0; k < g.nv; ++k) {
        rs[k] = (var[k] * Vec(inv_p) + Vec(static_cast<float>(eps))).rsqrt();
        mu[k].store(mp + n * d.C + g.c0 + k * VL, g.counts[k]);
        rs[k].store(rp + n * d.C + g.c0 + k * VL, g.counts[k]);
      }
      for (int64_t p = 0; p < d.P; ++p) {
        const Vec wv(wp[p]), bv(bp[p]);
        for (int64_t k = 0; k < g.nv; ++k) {
          const Vec xh = (Vec::loadu(xs + p * d.C + k * VL, g.counts[k]) - mu[k]) * rs[k];
          at::vec::fmadd(xh, wv, bv).store(ys + p * d.C + k * VL, g.counts[k]);
        }
      }
    }
  });
}

// dx [N, P, C] from gy; returns (dL/dw, dL/db) [P]
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w,
                                            const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx) {
  const Dims d = dims_of(x);
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.scalar_type() == at::kFloat &&
                  dx.sizes() == x.sizes() && dx.is_contiguous() && dx.scalar_type() == at::kFloat,
              "bionets map norm CPU kernels: gy and dx must be like x");
  check_vector(w, d.P, "w");
  check_vector(mean, d.N * d.C, "mean");
  check_vector(rstd, d.N * d.C, "rstd");
  at::Tensor parts = at::empty({2, d.N * d.groups, d.P}, x.options());    // each task's part, per position
  const float* gp = gy.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  float* pw = parts.data_ptr<float>();
  float* pb = pw + d.N * d.groups * d.P;
  const float inv_p = 1.f / static_cast<float>(d.P);
  at::parallel_for(0, d.N * d.groups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / d.groups, off = n * d.P * d.C;
      const Group g(t % d.groups, d.C);
      const float *xs = xp + off + g.c0, *gs = gp + off + g.c0;
      float* ds = dp + off + g.c0;
      Vec mu[NV], rs[NV], sum_g[NV], sum_gx[NV];
      for (int64_t k = 0; k < g.nv; ++k) {
        mu[k] = Vec::loadu(mp + n * d.C + g.c0 + k * VL, g.counts[k]);
        rs[k] = Vec::loadu(rp + n * d.C + g.c0 + k * VL, g.counts[k]);
        sum_g[k] = sum_gx[k] = Vec(0.f);
      }
      for (int64_t p = 0; p < d.P; ++p) {
        const Vec wv(wp[p]);
        Vec part_w(0.f), part_b(0.f);
        for (int64_t k = 0; k < g.nv; ++k) {
          const Vec gv = Vec::loadu(gs + p * d.C + k * VL, g.counts[k]);     // lanes past C load as 0
          const Vec xh = (Vec::loadu(xs + p * d.C + k * VL, g.counts[k]) - mu[k]) * rs[k];
          part_w = at::vec::fmadd(gv, xh, part_w);
          part_b = part_b + gv;
          sum_g[k] = at::vec::fmadd(gv, wv, sum_g[k]);
          sum_gx[k] = at::vec::fmadd(gv * wv, xh, sum_gx[k]);
        }
        pw[t * d.P + p] = sum_lanes(part_w);
        pb[t * d.P + p] = sum_lanes(part_b);
      }
      for (int64_t k = 0; k < g.nv; ++k) {
        sum_g[k] = sum_g[k] * Vec(inv_p);
        sum_gx[k] = sum_gx[k] * Vec(inv_p);
      }
      for (int64_t p = 0; p < d.P; ++p) {
        const Vec wv(wp[p]);
        for (int64_t k = 0; k < g.nv; ++k) {
          const Vec xh = (Vec::loadu(xs + p * d.C + k * VL, g.counts[k]) - mu[k]) * rs[k];
          const Vec gw = Vec::loadu(gs + p * d.C + k * VL, g.counts[k]) * wv;
          (rs[k] * (gw - sum_g[k] - xh * sum_gx[k])).store(ds + p * d.C + k * VL, g.counts[k]);
        }
      }
    }
  });
  const at::Tensor sums = parts.sum(1);
  return {sums[0], sums[1]};
}

}  // namespace

TORCH_LIBRARY(bionets_map_norm_cpu, m) {
  m.def("forward(Tensor x, Tensor w, Tensor b, float eps, Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd) -> ()");
  m.def("backward(Tensor gy, Tensor x, Tensor w, Tensor mean, Tensor rstd, Tensor(a!) dx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bionets_map_norm_cpu, CPU, m) {
  m.impl("forward", forward);
  m.impl("backward", backward);
}
