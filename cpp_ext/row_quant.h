// Shared by the dynamic ops' CPU files (cpu_dynamic.cpp: int8 weights; cpu_int4_dynamic.cpp: int4 weights):
// the integer cores picked for this CPU, and the per-token quantization of the activations.
#pragma once

#include "cpu_common.h"
#include "int8_panels.h"

namespace {
using namespace edge_tune_cpu;
using namespace edge_tune_int8;

// The integer cores for this CPU, chosen once per process (int8_panels.h: its fastest ISA, or the one
// EDGE_TUNE_INT8_ISA names).
Isa picked_isa() {
  static const Isa isa = best_isa();
  return isa;
}
const Int8Kernels& picked() {
  static const Int8Kernels k = int8_kernels(picked_isa());
  return k;
}

// ---- dynamic int8: per-token activation quantization, int8 x int8 -> int32 GEMM, fused epilogue ----
// Activations are quantized per row to 7-bit unsigned with a zero point (as fbgemm's reduce_range does on
// x86): u8 x s8 pairs summed by vpmaddubsw then stay below 2^15, so the int16 step never saturates.
// y[m, n] = (float)(sum_k xu[m,k] * w[n,k] - zp[m] * wsum[n]) * sx[m] * sw[n] + bias[n]
constexpr float kActLevels = 127.f;

struct RowQuant {
  // (m, ld) bytes, each row zero-padded to ld = k rounded up to 4 (the panels' k-quads). A tensor, not a
  // vector: it comes from the c10 allocator, so the tensor cache hands back the same pages every call.
  at::Tensor xu;
  int64_t ld;
  std::vector<float> sx;    // (m,)
  std::vector<int32_t> zp;  // (m,)
  std::vector<uint8_t> bad; // (m,) 1 where the row holds a non-finite value

  const uint8_t* row(int64_t r) const { return xu.data_ptr<uint8_t>() + r * ld; }
};

// The rows quantized are x * cm (cm: a per-column multiplier, or none): the input gradient folds the weight
// scale in here instead of writing grad * scale out first. The product is the same fp32 multiply as torch's.

// The row's range, which always holds 0 (so 0 is exact), and whether every value is finite: one pass.
ET_CLONES bool row_range(const float* x, const float* cm, int64_t k, float* mn_out, float* mx_out) {
  float mn = 0.f, mx = 0.f;
  int bad = 0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(| : bad)
  for (int64_t i = 0; i < k; ++i) {
    const float v = cm ? x[i] * cm[i] : x[i];
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    bad |= !(std::fabs(v) <= std::numeric_limits<float>::max());
  }
  *mn_out = mn;
  *mx_out = mx;
  return !bad;
}

ET_CLONES void quantize_row(const float* x, const float* cm, int64_t k, float s, float z, uint8_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) {
    const float v = std::nearbyint((cm ? x[i] * cm[i] : x[i]) / s) + z;
    out[i] = static_cast<uint8_t>(std::min(kActLevels, std::max(0.f, v)));
  }
}

using RangeFn = bool (*)(const float*, const float*, int64_t, float*, float*);
using QuantizeFn = void (*)(const float*, const float*, int64_t, float, float, uint8_t*);

// Whether the picked integer cores are x86 vector ones (then the float passes around them use AVX2 too).
bool x86_vector_cores() { return picked_isa() == Isa::avx2 || picked_isa() == Isa::vnni; }

#ifdef ET_X86
// The same two passes in AVX2 intrinsics. The auto-vectorized loops above stay in 16-byte vectors and
// clamp through integer casts: 1.3 ns a value (1024 x 1536 rows: 1.9 ms of a 9 ms single-thread GEMM); these
// take 0.4 ns. Multiply, division, round-to-nearest-even and the clamp are the same IEEE operations, so the
// bytes are identical (test_every_int8_isa_gives_the_same_outputs compares them with the scalar cores').
__attribute__((target("avx2"))) inline __m256 load8(const float* x, const float* cm, int64_t i) {
  const __m256 v = _mm256_loadu_ps(x + i);
  return cm ? _mm256_mul_ps(v, _mm256_loadu_ps(cm + i)) : v;
}

__attribute__((target("avx2"))) bool row_range_avx2(const float* x, const float* cm, int64_t k, float* mn_out,
                                                    float* mx_out) {
  __m256 mn = _mm256_setzero_ps(), mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = load8(x, cm, i);
    mn = _mm256_min_ps(mn, v);
    mx = _mm256_max_ps(mx, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), big, _CMP_NLE_UQ));  // inf or NaN
  }
  alignas(32) float lo[8], hi[8];
  _mm256_store_ps(lo, mn);
  _mm256_store_ps(hi, mx);
  float tmn, tmx;
  const bool ok = _mm256_movemask_ps(bad) == 0 && row_range(x + i, cm ? cm + i : nullptr, k - i, &tmn, &tmx);
  for (int j = 0; j < 8; ++j) tmn = std::min(tmn, lo[j]), tmx = std::max(tmx, hi[j]);
  *mn_out = tmn;
  *mx_out = tmx;
  return ok;
}

__attribute__((target("avx2"))) inline __m256i quantize8_avx2(const float* x, const float* cm, int64_t i, __m256 s,
                                                              __m256 z) {
  const __m256 v = _mm256_round_ps(_mm256_div_ps(load8(x, cm, i), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(kActLevels), _mm256_max_ps(_mm256_setzero_ps(), _mm256_add_ps(v, z))));
}

__attribute__((target("avx2"))) void quantize_row_avx2(const float* x, const float* cm, int64_t k, float s, float z,
                                                       uint8_t* out) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m256i ab = _mm256_packs_epi32(quantize8_avx2(x, cm, i, vs, vz), quantize8_avx2(x, cm, i + 8, vs, vz));
    const __m256i cd = _mm256_packs_epi32(quantize8_avx2(x, cm, i + 16, vs, vz), quantize8_avx2(x, cm, i + 24, vs, vz));
    // the packs work per 128-bit lane: put the 8 groups of 4 bytes back in order
    const __m256i r = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), r);
  }
  quantize_row(x + i, cm ? cm + i : nullptr, k - i, s, z, out + i);
}
#endif

RowQuant quantize_rows(const float* x, int64_t m, int64_t k, const float* cm = nullptr) {
  const int64_t ld = (k + 3) / 4 * 4;
  RowQuant q{at::empty({m, ld}, at::kByte), ld, std::vector<float>(m), std::vector<int32_t>(m), std::vector<uint8_t>(m)};
  uint8_t* xb = q.xu.data_ptr<uint8_t>();
  RangeFn range = row_range;
  QuantizeFn quantize = quantize_row;
#ifdef ET_X86
  if (x86_vector_cores()) range = row_range_avx2, quantize = quantize_row_avx2;
#endif
  // at least 64 KB of x a thread: a short sentence's rows are not worth waking a second thread for
  at::parallel_for(0, m, std::max<int64_t>(16, (1 << 14) / std::max<int64_t>(1, k)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = x + r * k;
      float mn, mx;
      q.bad[r] = !range(xr, cm, k, &mn, &mx);
      if (q.bad[r]) mn = mx = 0.f;
      float s = (mx - mn) / kActLevels;
      if (!(s > 0.f)) s = 1.f;
      const float z = std::nearbyint(-mn / s);
      q.sx[r] = s;
      q.zp[r] = static_cast<int32_t>(z);
      uint8_t* out = xb + r * ld;
      if (!q.bad[r]) quantize(xr, cm, k, s, z, out);
      std::fill(out + (q.bad[r] ? 0 : k), out + ld, 0);
    }
  });
  return q;
}

}  // namespace
