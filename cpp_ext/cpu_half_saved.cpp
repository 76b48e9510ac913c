// The activations training keeps for backward in fp16 (model.py's *HalfSaved functions): the saturating
// fp32 -> fp16 conversion in one pass (unfused: a clamped fp32 copy, then the conversion), and GELU's
// input gradient read straight from the fp16 copy (unfused: an fp32 copy of it, then gelu_backward; three
// passes over the 1024 x 1536 FFN hidden at batch 16 x 64, one here).
//
// GELU's derivative uses the erf ATen's own vectorized GELU uses (Abramowitz & Stegun 7.1.26, |error| <=
// 1.5e-7) and vec8.h's Cephes-style exp: within ~1e-6 of torch's gelu_backward, not bit-identical (the tests bound
// it). The forward GELU stays torch's: training's forward must give the bits inference and activation
// checkpointing's no-grad pass give. Every element goes through the same code whatever its position (tails
// are padded to a full vector), so a row's results never depend on the batch around it.

#include "cpu_common.h"

#include <c10/util/Half.h>

#include "vec8.h"

namespace {
using namespace edge_tune_cpu;

constexpr float kHalfMax = 65504.f;        // the largest finite fp16
constexpr float kSqrtHalf = 0.70710678118654752f;  // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
constexpr int64_t kGrain = 1 << 14;        // elements a thread takes at least

// The scalar path: for CPUs without AVX2+F16C and for other architectures (there the compiler vectorizes).
inline void half_scalar(const float* x, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    out[i] = c10::Half(std::isnan(v) ? v : std::min(kHalfMax, std::max(-kHalfMax, v)));
  }
}

inline void gelu_grad_scalar(const float* g, const c10::Half* h16, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(h16[i]);
    const float cdf = 0.5f * (1.f + std::erf(x * kSqrtHalf));
    out[i] = g[i] * (cdf + x * kInvSqrt2Pi * std::exp(-0.5f * x * x));
  }
}

#ifdef ET_X86
#define ET_GELU_TARGET __attribute__((target("avx2,fma,f16c")))

// exp(x) for x <= 0: vec8.h's (GCC vectors and __m256 are the same 32 bytes)
ET_GELU_TARGET inline __m256 exp_nonpositive(__m256 x) { return (__m256)edge_tune_vec::exp_nonpositive((edge_tune_vec::v8f)x); }

// Phi(x) = 0.5 (1 + erf(x / sqrt 2)), and exp(-x^2 / 2) (the backward's density needs it too).
ET_GELU_TARGET inline __m256 normal_cdf(__m256 x, __m256* e_out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(kSqrtHalf));
  const __m256 zs = _mm256_and_ps(sign, z);
  const __m256 za = _mm256_xor_ps(zs, z);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), za, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp_nonpositive(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));
  *e_out = e;
  const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(e, t), r, one);  // 1 - r t e
  return _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(one, _mm256_xor_ps(zs, erf_abs)));
}

ET_GELU_TARGET inline void half8(const float* x, c10::Half* out) {
  const __m256 v = _mm256_loadu_ps(x);
  const __m256 c = _mm256_min_ps(_mm256_set1_ps(kHalfMax), _mm256_max_ps(_mm256_set1_ps(-kHalfMax), v));
  // max/min return their second operand for NaN: put a NaN back, as torch's clamp keeps it
  const __m256 keep_nan = _mm256_blendv_ps(c, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(keep_nan, _MM_FROUND_TO_NEAREST_INT));
}

ET_GELU_TARGET inline void gelu_grad8(const float* g, const c10::Half* h16, float* out) {
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h16)));
  __m256 e;
  const __m256 cdf = normal_cdf(x, &e);
  const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(x, _mm256_set1_ps(kInvSqrt2Pi)), e, cdf);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_loadu_ps(g), d));
}

ET_GELU_TARGET void half_avx2(const float* x, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) half8(x + i, out + i);
  for (; i < n; ++i) {  // round-to-nearest-even like the vector conversion: the same bits
    const float v = x[i];
    out[i] = c10::Half(std::isnan(v) ? v : std::min(kHalfMax, std::max(-kHalfMax, v)));
  }
}

ET_GELU_TARGET void gelu_grad_avx2(const float* g, const c10::Half* h16, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) gelu_grad8(g + i, h16 + i, out + i);
  if (i < n) {
    float gb[8] = {0}, ob[8];
    c10::Half hb[8] = {};
    std::memcpy(gb, g + i, (n - i) * sizeof(float));
    std::memcpy(hb, h16 + i, (n - i) * sizeof(c10::Half));
    gelu_grad8(gb, hb, ob);
    std::memcpy(out + i, ob, (n - i) * sizeof(float));
  }
}

bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && !std::getenv("EDGE_TUNE_HALF_SAVED_SCALAR");
  return yes;
}
#endif

// Chunks of whole vectors per thread, so that the only padded tail is the tensor's own.
template <typename F>
void for_chunks(int64_t n, F f) {
  at::parallel_for(0, (n + 7) / 8, kGrain / 8, [&](int64_t b, int64_t e) {
    f(b * 8, std::min(n, e * 8) - b * 8);
  });
}

at::Tensor half_saturated(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "half_saturated: x must be float32");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kHalf));
  const float* xp = x.data_ptr<float>();
  c10::Half* op = out.data_ptr<c10::Half>();
  for_chunks(x.numel(), [&](int64_t i, int64_t len) {
#ifdef ET_X86
    if (use_avx2()) return half_avx2(xp + i, op + i, len);
#endif
    half_scalar(xp + i, op + i, len);
  });
  return out;
}

at::Tensor gelu_backward_half(const at::Tensor& grad_in, const at::Tensor& h16_in) {
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat, "gelu_backward_half: grad must be float32");
  TORCH_CHECK(h16_in.scalar_type() == at::kHalf, "gelu_backward_half: h16 must be float16");
  TORCH_CHECK(grad_in.sizes() == h16_in.sizes(), "gelu_backward_half: grad and h16 must have one shape");
  const at::Tensor g = grad_in.contiguous(), h16 = h16_in.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  const float* gp = g.data_ptr<float>();
  const c10::Half* hp = h16.data_ptr<c10::Half>();
  float* op = out.data_ptr<float>();
  for_chunks(g.numel(), [&](int64_t i, int64_t len) {
#ifdef ET_X86
    if (use_avx2()) return gelu_grad_avx2(gp + i, hp + i, op + i, len);
#endif
    gelu_grad_scalar(gp + i, hp + i, op + i, len);
  });
  return out;
}

// Which path the two ops above take on this CPU (for `edge-tune doctor` and the tests).
std::string half_saved_isa() {
#ifdef ET_X86
  if (use_avx2()) return "avx2+f16c";
#endif
  return "scalar";
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) {
  m.impl("half_saturated", &half_saturated);
  m.impl("gelu_backward_half", &gelu_backward_half);
}

TORCH_LIBRARY_FRAGMENT(edge_tune, m) { m.def("half_saved_isa() -> str", &half_saved_isa); }
