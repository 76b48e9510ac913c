// 8-float vectors in GCC's vector extensions, shared by the kernels that write their loops with them
// (cpu_attention.cpp, cpu_lora.cpp, cpu_half_saved.cpp): one AVX2 register, two SSE or NEON registers
// elsewhere, so the same source serves every target clone and ARM.
#pragma once

#include <cstdint>
#include <cstring>

namespace edge_tune_vec {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// Helpers are always inlined: called from the target_clones functions, they are compiled for each clone's
// ISA there (out of line they would be the baseline's SSE2, 8 accumulators spilling).
#define ET_INLINE inline __attribute__((always_inline))
// AVX2 with FMA in one clone (ET_CLONES's "avx2,fma" makes two, neither with both)
#if defined(__x86_64__) && defined(__GNUC__)
#define ET_CLONES_V3 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ET_CLONES_V3
#endif

// n rounded up to a whole number of 8-float vectors (the padded sizes of the kernels' buffers)
inline int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

ET_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
ET_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
// Lane 0 shuffled to all eight: one vbroadcastss, where the initializer list v8f{x, x, ...} became eight
// vinsertps in the attention GEMM's inner loop (half its time).
ET_INLINE v8f splat(float x) { return __builtin_shuffle(v8f{x}, v8i{}); }

// exp(x) for x <= 0 (NaN stays NaN): range reduction by ln 2 and a degree-6 polynomial (Cephes expf).
ET_INLINE v8f exp_nonpositive(v8f x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;  // below, exp is denormal: no caller needs it
  const v8i n = -__builtin_convertvector(splat(0.5f) - x * splat(1.44269504088896341f), v8i);  // round(x / ln 2)
  const v8f nf = __builtin_convertvector(n, v8f);
  x = x - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * x + splat(1.3981999507e-3f);
  p = p * x + splat(8.3334519073e-3f);
  p = p * x + splat(4.1665795894e-2f);
  p = p * x + splat(1.6666665459e-1f);
  p = p * x + splat(5.0000001201e-1f);
  p = p * (x * x) + x + splat(1.f);
  v8f scale;
  const v8i bits = (n + 127) << 23;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace edge_tune_vec
