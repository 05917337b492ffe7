// What every C++ kernel source beside this file shares (bionets/layers/cpu_kernels.py hashes this
// header into each build's name, so that a change here rebuilds them all): float vectors of ATen's
// Vectorized (AVX512, AVX2 or plain, as torch dispatches here), their lane sum, and loads and stores
// that read and write float32 or bf16 memory while the arithmetic stays float32.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>

namespace bionets_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();

inline float sum_lanes(const Vec& a) {
  return at::vec::vec_reduce_all<float>([](const Vec& p, const Vec& q) { return p + q; }, a);
}

inline Vec load(const float* p, int64_t n = VL) { return Vec::loadu(p, n); }
inline Vec load(const at::BFloat16* p, int64_t n = VL) {
  return std::get<0>(at::vec::convert_bfloat16_float(at::vec::Vectorized<at::BFloat16>::loadu(p, n)));
}
inline void store(const Vec& a, float* p, int64_t n = VL) { a.store(p, n); }
inline void store(const Vec& a, at::BFloat16* p, int64_t n = VL) { at::vec::convert_float_bfloat16(a, Vec(0.f)).store(p, n); }

}  // namespace bionets_cpu
