// RAA's shift parameters as its kernels read them, shared by raa_cpu.cpp and raa_cuda.cu: one
// float32 vector w = [v | c] (vector variant, C + 1 entries) or [c] (scalar variant), read through
// pointers into it (no view made a call: a view is a dispatcher call on the eager step's host).
#pragma once

#include <ATen/core/Tensor.h>

namespace bionets_raa {

struct Shift {
  const float* v;   // the C weights of v, or nullptr (scalar variant)
  const float* c;   // the constant c
  bool has_v() const { return v != nullptr; }
};

inline Shift shift_of(const at::Tensor& w, int64_t C) {
  const bool sized = w.dim() == 1 && (w.numel() == C + 1 || w.numel() == 1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && sized,
              "bionets RAA kernels: w must be a contiguous float32 vector [v | c] of the feature size + 1, or [c]");
  const float* p = w.const_data_ptr<float>();
  return {w.numel() > 1 ? p : nullptr, p + w.numel() - 1};
}

}  // namespace bionets_raa
