// RAA's vector and scalar variants as two fused CPU kernels, one pass over the map each way
// (built on first use by bionets/layers/cpu_kernels.py; registered as torch.ops.bionets_raa_cpu).
//
// forward, per feature vector x (one token, or one pixel of a map), c a scalar:
//     s = v . x + c                         (scalar variant: s = c)
//     y = x Phi(x + s)   (gelu form)        y = max(0, x + s)   (relu form)
// backward, with z = x + s and g = dL/dy:
//     gs    = sum_features g dy/ds          (x phi(z), or 1[z > 0])
//     dL/dx = g dy/dx|_s + v gs             (Phi(z) + x phi(z), or 1[z > 0])
//     dL/dv = sum_vectors gs x,  dL/dc = sum_vectors gs
// The two sums are taken per chunk of CHUNK vectors, then over the chunks in order: a fixed split, so
// the result does not depend on the number of threads.
//
// Phi(z) = (1 + erf(z / sqrt 2)) / 2 with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7; the
// formula of ATen's own vectorized erf), whose factor exp(-z^2 / 2) is also sqrt(2 pi) phi(z): one
// exponential per element each way (GELU's backward in ATen takes two).
//
// x is read as [N, C, P] with one stride each: features contiguous (channels_last maps, tokens) or
// pixels contiguous (NCHW maps). float32, or bf16 with the features contiguous (computed in float32;
// the shift and the parameters' gradients are float32).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cpu_vec.h"
#include "raa_autograd.h"
#include "raa_shift.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using namespace bionets_cpu;      // Vec, VL, sum_lanes; load / store: x, y, g and dL/dx in their own
                                  // dtype, float32 or bf16 (computed in float32, rounded once on the way out)
constexpr int64_t CHUNK = 256;   // vectors per task and per row of partial sums
constexpr int64_t ROWS = 32;     // features-contiguous layout: vectors whose shifts are computed together
constexpr float INV_SQRT_2PI = 0.3989422804014327f;

struct Layout {
  int64_t N, C, P, sn, sc, sp;
  bool rows() const { return sc == 1; }
  int64_t chunks() const { return rows() ? (N * P + CHUNK - 1) / CHUNK : N * ((P + CHUNK - 1) / CHUNK); }
};

// dim 1 of a 4-D map (contiguous or channels_last), or the last dim of a contiguous tensor; the
// strides are the memory format's own (a size-1 dimension's stride may be anything)
Layout layout_of(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "bionets RAA CPU kernels take float32 or bf16, got ", x.scalar_type());
  if (dim == 1) {
    TORCH_CHECK(x.dim() == 4, "bionets RAA CPU kernels: a map must be 4-D");
    const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
    if (x.is_contiguous()) return Layout{N, C, P, C * P, P, 1};
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "bionets RAA CPU kernels: map neither NCHW nor channels_last");
    return Layout{N, C, P, C * P, 1, C};
  }
  TORCH_CHECK(x.is_contiguous(), "bionets RAA CPU kernels: features-last tensor not contiguous");
  const int64_t C = x.size(-1);
  return Layout{1, C, C ? x.numel() / C : 0, 0, 1, C};
}

// Phi(z) and e = exp(-z^2 / 2) (so phi(z) = e / sqrt(2 pi))
inline Vec normal_cdf(const Vec& z, Vec& e) {
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f * 0.7071067811865476f), z.abs(), Vec(1.f));
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  e = (z * z * Vec(-0.5f)).exp();
  const Vec tail = Vec(0.5f) * r * t * e;                  // Phi(-|z|)
  return Vec::blendv(tail, Vec(1.f) - tail, z >= Vec(0.f));
}

inline Vec forward_elem(const Vec& x, const Vec& s, bool relu) {
  const Vec z = x + s;
  if (relu) return at::vec::maximum(z, Vec(0.f));
  Vec e;
  return x * normal_cdf(z, e);
}

// g dy/dx|_s; adds g dy/ds to acc (gelu form: without its factor 1 / sqrt(2 pi), applied to the sum)
inline Vec backward_elem(const Vec& x, const Vec& g, const Vec& s, bool relu, Vec& acc) {
  const Vec z = x + s;
  if (relu) {
    const Vec d = Vec::blendv(Vec(0.f), g, z > Vec(0.f));
    acc = acc + d;
    return d;
  }
  Vec e;
  const Vec cdf = normal_cdf(z, e);
  const Vec xe = x * e;
  acc = at::vec::fmadd(g, xe, acc);
  return g * at::vec::fmadd(xe, Vec(INV_SQRT_2PI), cdf);
}

// ---- features contiguous (channels_last maps, tokens): x is [M, C], vector m at x + m C

// f(relu, nv) with both as compile-time constants: nv = C / VL where C is a multiple of VL up to 4 of
// them (loops then unroll, without masks), else 0 (any C: whole vectors and a masked tail)
template <typename F>
void dispatch(bool relu, int64_t C, const F& f) {
  const auto with = [&](auto relu_c) {
    switch (C % VL ? 0 : C / VL) {
      case 1: return f(relu_c, std::integral_constant<int64_t, 1>{});
      case 2: return f(relu_c, std::integral_constant<int64_t, 2>{});
      case 4: return f(relu_c, std::integral_constant<int64_t, 4>{});
      default: return f(relu_c, std::integral_constant<int64_t, 0>{});
    }
  };
  relu ? with(std::true_type{}) : with(std::false_type{});
}

template <typename T>
void forward_rows(const T* x, const float* v, float c, T* y, float* s, const Layout& l, bool relu) {
  const int64_t M = l.N * l.P;
  dispatch(relu, l.C, [&](auto relu_c, auto nv) {
    constexpr bool RELU = decltype(relu_c)::value;
    const int64_t C = nv ? nv * VL : l.C;
    at::parallel_for(0, (M + ROWS - 1) / ROWS, 4, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t m0 = b * ROWS, m1 = std::min(M, m0 + ROWS);
        for (int64_t m = m0; m < m1; ++m) {       // the shifts first: independent reductions overlap
          Vec acc(0.f);
          for (int64_t k = 0; v && k < C; k += VL) {
            const int64_t n = nv ? VL : std::min(VL, C - k);
            acc = at::vec::fmadd(load(x + m * C + k, n), Vec::loadu(v + k, n), acc);
          }
          s[m] = c + sum_lanes(acc);
        }
        for (int64_t m = m0; m < m1; ++m) {
          const Vec sm(s[m]);
          for (int64_t k = 0; k < C; k += VL) {
            const int64_t n = nv ? VL : std::min(VL, C - k);
            store(forward_elem(load(x + m * C + k, n), sm, RELU), y + m * C + k, n);
          }
        }
      }
    });
  });
}

// a vector of NV registers: one pass (dL/dx finished in registers, partial dL/dv in registers)
template <typename T, bool RELU, int64_t NV>
void backward_rows_fixed(const T* x, const T* g, const float* s, const float* v, T* gx, float* pv,
                         int64_t m0, int64_t m1, float scale) {
  constexpr int64_t C = NV * VL;
  Vec vk[NV], a0[NV], a1[NV];
  for (int64_t j = 0; j < NV; ++j) {
    vk[j] = v ? Vec::loadu(v + j * VL) : Vec(0.f);
    a0[j] = a1[j] = Vec(0.f);
  }
  float gc = 0.f;
  for (int64_t m = m0; m < m1; ++m) {
    const Vec sm(s[m]);
    Vec xs[NV], d[NV], acc(0.f);
    for (int64_t j = 0; j < NV; ++j) {
      xs[j] = load(x + m * C + j * VL);
      d[j] = backward_elem(xs[j], load(g + m * C + j * VL), sm, RELU, acc);
    }
    const float gsm = sum_lanes(acc) * scale;
    gc += gsm;
    const Vec gv(gsm);
    for (int64_t j = 0; j < NV; ++j) {
      if (v) {
        d[j] = at::vec::fmadd(vk[j], gv, d[j]);
        Vec& a = (m & 1) ? a1[j] : a0[j];
        a = at::vec::fmadd(xs[j], gv, a);
      }
      store(d[j], gx + m * C + j * VL);
    }
  }
  for (int64_t j = 0; j < NV; ++j) (a0[j] + a1[j]).store(pv + j * VL);
  pv[C] = gc;
}

// any C: whole vectors and a masked tail, in two loops over a block of rows (dL/dx held in float32
// in tmp, [ROWS, C], between them)
template <typename T, bool RELU>
void backward_rows_any(const T* x, const T* g, const float* s, const float* v, T* gx, float* pv,
                       int64_t M0, int64_t M1, int64_t C, float scale, float* tmp) {
  float gs[ROWS];
  std::fill(pv, pv + C + 1, 0.f);
  for (int64_t m0 = M0; m0 < M1; m0 += ROWS) {
    const int64_t R = std::min(ROWS, M1 - m0);
    const T* xb = x + m0 * C; const T* gb = g + m0 * C; T* gxb = gx + m0 * C;
    for (int64_t r = 0; r < R; ++r) {            // dL/dx without v gs, and gs
      const Vec sr(s[m0 + r]);
      Vec acc(0.f);
      for (int64_t k = 0; k < C; k += VL) {
        const int64_t n = std::min(VL, C - k);    // lanes past C load 0 and add 0 to acc
        backward_elem(load(xb + r * C + k, n), load(gb + r * C + k, n), sr, RELU, acc).store(tmp + r * C + k, n);
      }
      gs[r] = sum_lanes(acc) * scale;
      pv[C] += gs[r];
    }
    for (int64_t k = 0; k < C; k += VL) {         // dL/dx += v gs; partial dL/dv in registers
      const int64_t n = std::min(VL, C - k);
      const Vec vk = v ? Vec::loadu(v + k, n) : Vec(0.f);
      Vec a0(0.f), a1(0.f);
      for (int64_t r = 0; r < R; ++r) {
        const Vec gr(gs[r]);
        const Vec t = Vec::loadu(tmp + r * C + k, n);
        store(v ? at::vec::fmadd(vk, gr, t) : t, gxb + r * C + k, n);   // no v: no 0 * gs (a NaN gs stays in its element)
        Vec& a = (r & 1) ? a1 : a0;
        a = at::vec::fmadd(load(xb + r * C + k, n), gr, a);
      }
      (Vec::loadu(pv + k, n) + a0 + a1).store(pv + k, n);
    }
  }
}

template <typename T>
void backward_rows(const T* x, const T* g, const float* s, const float* v, T* gx, float* part, const Layout& l,
                   bool relu) {
  const int64_t M = l.N * l.P, C = l.C;
  const float scale = relu ? 1.f : INV_SQRT_2PI;
  dispatch(relu, C, [&](auto relu_c, auto nv) {
    constexpr bool RELU = decltype(relu_c)::value;
    at::parallel_for(0, l.chunks(), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tmp(nv > 0 ? 0 : ROWS * C);
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t m0 = ch * CHUNK, m1 = std::min(M, m0 + CHUNK);
        if constexpr (nv > 0)
          backward_rows_fixed<T, RELU, nv>(x, g, s, v, gx, part + ch * (C + 1), m0, m1, scale);
        else
          backward_rows_any<T, RELU>(x, g, s, v, gx, part + ch * (C + 1), m0, m1, C, scale, tmp.data());
      }
    });
  });
}

// ---- pixels contiguous (NCHW): a task is CHUNK pixels of one image, all channels

void forward_planes(const float* x, const float* v, float c, float* y, float* s, const Layout& l, bool relu) {
  const int64_t C = l.C, P = l.P, blocks = (P + CHUNK - 1) / CHUNK;
  at::parallel_for(0, l.N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, p0 = (t % blocks) * CHUNK, B = std::min(CHUNK, P - p0);
      float* sb = s + n * P + p0;
      std::fill(sb, sb + B, c);
      for (int64_t k = 0; v && k < C; ++k) {
        const float* xk = x + n * l.sn + k * l.sc + p0;
        for (int64_t p = 0; p < B; p += VL) {
          const int64_t cnt = std::min(VL, B - p);
          at::vec::fmadd(Vec::loadu(xk + p, cnt), Vec(v[k]), Vec::loadu(sb + p, cnt)).store(sb + p, cnt);
        }
      }
      for (int64_t k = 0; k < C; ++k) {
        const int64_t o = n * l.sn + k * l.sc + p0;
        for (int64_t p = 0; p < B; p += VL) {
          const int64_t cnt = std::min(VL, B - p);
          forward_elem(Vec::loadu(x + o + p, cnt), Vec::loadu(sb + p, cnt), relu).store(y + o + p, cnt);
        }
      }
    }
  });
}

void backward_planes(const float* x, const float* g, const float* s, const float* v, float* gx, float* part,
                     const Layout& l, bool relu) {
  const int64_t C = l.C, P = l.P, blocks = (P + CHUNK - 1) / CHUNK;
  const float scale = relu ? 1.f : INV_SQRT_2PI;
  at::parallel_for(0, l.N * blocks, 1, [&](int64_t begin, int64_t end) {
    float gs[CHUNK];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, p0 = (t % blocks) * CHUNK, B = std::min(CHUNK, P - p0);
      const float* sb = s + n * P + p0;
      float* pv = part + t * (C + 1);
      std::fill(gs, gs + B, 0.f);
      for (int64_t k = 0; k < C; ++k) {           // dL/dx without v gs, and gs
        const int64_t o = n * l.sn + k * l.sc + p0;
        for (int64_t p = 0; p < B; p += VL) {
          const int64_t cnt = std::min(VL, B - p);
          Vec acc = Vec::loadu(gs + p, cnt);
          backward_elem(Vec::loadu(x + o + p, cnt), Vec::loadu(g + o + p, cnt), Vec::loadu(sb + p, cnt), relu, acc)
              .store(gx + o + p, cnt);
          acc.store(gs + p, cnt);
        }
      }
      Vec total(0.f);
      for (int64_t p = 0; p < B; p += VL) {
        const int64_t cnt = std::min(VL, B - p);
        const Vec gp = Vec::loadu(gs + p, cnt) * Vec(scale);
        gp.store(gs + p, cnt);
        total = total + gp;
      }
      pv[C] = sum_lanes(total);
      for (int64_t k = 0; k < C; ++k) {           // dL/dx += v gs; partial dL/dv
        pv[k] = 0.f;
        if (!v) continue;
        const int64_t o = n * l.sn + k * l.sc + p0;
        Vec acc(0.f);
        for (int64_t p = 0; p < B; p += VL) {
          const int64_t cnt = std::min(VL, B - p);
          const Vec gp = Vec::loadu(gs + p, cnt);
          at::vec::fmadd(Vec(v[k]), gp, Vec::loadu(gx + o + p, cnt)).store(gx + o + p, cnt);
          acc = at::vec::fmadd(Vec::loadu(x + o + p, cnt), gp, acc);
        }
        pv[k] = sum_lanes(acc);
      }
    }
  });
}


// (y, s): s holds the shift of each vector, [N * P]
std::tuple<at::Tensor, at::Tensor> raa_forward(const at::Tensor& x, const at::Tensor& w, int64_t dim, bool relu) {
  const Layout l = layout_of(x, dim);
  const bionets_raa::Shift shift = bionets_raa::shift_of(w, l.C);
  at::Tensor y = at::empty_like(x);
  at::Tensor s = at::empty({l.N * l.P}, x.options().dtype(at::kFloat));
  const float* vp = shift.v;
  const float c0 = *shift.c;
  if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(l.rows(), "bionets RAA CPU kernels: bf16 maps must be channels_last");
    forward_rows(x.const_data_ptr<at::BFloat16>(), vp, c0, y.data_ptr<at::BFloat16>(), s.data_ptr<float>(), l, relu);
  } else if (l.rows()) {
    forward_rows(x.const_data_ptr<float>(), vp, c0, y.data_ptr<float>(), s.data_ptr<float>(), l, relu);
  } else {
    forward_planes(x.const_data_ptr<float>(), vp, c0, y.data_ptr<float>(), s.data_ptr<float>(), l, relu);
  }
  return {y, s};
}

// (dL/dx, dL/dw = [dL/dv | dL/dc] (scalar variant: [dL/dc]))
std::tuple<at::Tensor, at::Tensor> raa_backward(const at::Tensor& x, const at::Tensor& g, const at::Tensor& s,
                                                const at::Tensor& w, int64_t dim, bool relu) {
  const Layout l = layout_of(x, dim);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == l.N * l.P,
              "bionets RAA CPU kernels: the saved shift does not match x");
  // the gradient is read with x's strides: one copy where it arrives in another layout
  const at::Tensor grad = g.strides() == x.strides() && g.scalar_type() == x.scalar_type() ? g : at::empty_like(x).copy_(g);
  at::Tensor gx = at::empty_like(x);
  std::vector<float> part(l.chunks() * (l.C + 1));
  const float* vp = bionets_raa::shift_of(w, l.C).v;
  if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(l.rows(), "bionets RAA CPU kernels: bf16 maps must be channels_last");
    backward_rows(x.const_data_ptr<at::BFloat16>(), grad.const_data_ptr<at::BFloat16>(), s.const_data_ptr<float>(), vp,
                  gx.data_ptr<at::BFloat16>(), part.data(), l, relu);
  } else if (l.rows()) {
    backward_rows(x.const_data_ptr<float>(), grad.const_data_ptr<float>(), s.const_data_ptr<float>(), vp,
                  gx.data_ptr<float>(), part.data(), l, relu);
  } else {
    backward_planes(x.const_data_ptr<float>(), grad.const_data_ptr<float>(), s.const_data_ptr<float>(), vp,
                    gx.data_ptr<float>(), part.data(), l, relu);
  }
  // the partial sums added in chunk order: the same result on any number of threads
  std::vector<double> total(l.C + 1, 0.0);
  for (int64_t ch = 0; ch < l.chunks(); ++ch)
    for (int64_t k = 0; k <= l.C; ++k) total[k] += part[ch * (l.C + 1) + k];
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gw = at::empty({vp ? l.C + 1 : 1}, f32);
  float* out = gw.data_ptr<float>();
  for (int64_t k = 0; k + 1 < gw.numel(); ++k) out[k] = static_cast<float>(total[k]);
  out[gw.numel() - 1] = static_cast<float>(total[l.C]);
  return {gx, gw};
}

struct Kernels {
  static constexpr auto forward = raa_forward;
  static constexpr auto backward = raa_backward;
};

}  // namespace

TORCH_LIBRARY(bionets_raa_cpu, m) {
  m.def("forward(Tensor x, Tensor w, int dim, bool relu) -> (Tensor, Tensor)");
  m.def("backward(Tensor x, Tensor g, Tensor s, Tensor w, int dim, bool relu) -> (Tensor, Tensor)");
  m.def(bionets_raa::RAA_SCHEMA);
}

TORCH_LIBRARY_IMPL(bionets_raa_cpu, CPU, m) {
  m.impl("forward", raa_forward);
  m.impl("backward", raa_backward);
  m.impl("raa", bionets_raa::raa_no_grad<Kernels>);
}

TORCH_LIBRARY_IMPL(bionets_raa_cpu, AutogradCPU, m) {
  m.impl("raa", bionets_raa::raa<Kernels>);
}
