// CPU kernels of the dynamic int8 ops (int8_linear_dynamic, its input gradient, lora_linear): activations
// quantized per token, int8 x int8 -> int32 products, one fused epilogue. Schemas and references: ops.py.

#include "cpu_common.h"
#include "int8_panels.h"

#include <array>

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
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
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

// y[c] = (acc[c] - zp * wsum[c]) * sx * sw[c] + b[c] for one row's run of columns. The one epilogue of every
// path, compiled without FMA contraction: a row's output then never depends on which path (few or many rows,
// so which batch it came in) computed it, and equals the reference's separately rounded float ops.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
ET_CLONES void epilogue_run(const int32_t* acc, int64_t cols, int32_t zp, float sx, const int32_t* wsum,
                            const float* sw, const float* b, float* y) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c)
    y[c] = static_cast<float>(acc[c] - zp * wsum[c]) * sx * (sw ? sw[c] : 1.f) + (b ? b[c] : 0.f);
}
#ifdef ET_X86
// A panel's epilogue (rows x 16 columns, acc[r * 16 + c]) in AVX2: the same separately rounded operations as
// epilogue_run (no FMA in this target; the pragma keeps it so), so the bits match, in one call a panel
// instead of one a row. A missing scale multiplies by 1 (skipped: exact), a missing bias adds +0 as there.
__attribute__((target("avx2"))) void epilogue_panel_avx2(const int32_t* acc, int rows, const int32_t* zp,
                                                         const float* sx, const int32_t* wsum, const float* sw,
                                                         const float* b, float* y, int64_t ldy) {
  for (int h = 0; h < 2; ++h) {
    const __m256i ws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + h * 8));
    const __m256 s = sw ? _mm256_loadu_ps(sw + h * 8) : _mm256_set1_ps(1.f);
    const __m256 bb = b ? _mm256_loadu_ps(b + h * 8) : _mm256_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * 16 + h * 8));
      const __m256i d = _mm256_sub_epi32(a, _mm256_mullo_epi32(_mm256_set1_epi32(zp[r]), ws));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sx[r]));
      if (sw) v = _mm256_mul_ps(v, s);
      _mm256_storeu_ps(y + r * ldy + h * 8, _mm256_add_ps(v, bb));
    }
  }
}
#endif
#pragma GCC pop_options

std::string int8_isa() { return isa_name(picked_isa()); }

// Above this many rows the panel GEMM beats the two-column tiles even for one sentence's tokens: measured on
// a 2-core AVX2 EPYC at 10 rows, 384->384 61 -> 37 us, 1536->384 121 -> 100 us (kDirectMaxRows, 16, is the
// weight-only int8 kernels' threshold).
constexpr int64_t kDynamicDirectMaxRows = 4;

// y (m, n) = epilogue(xu (m, k) @ W^T): W is w_q (n, k) row-major, or with `transposed` the transpose of a
// row-major (k, n) w_q. colsum[c] = sum over the reduction of W's column c (the zero-point correction).
void panel_gemm(const RowQuant& q, int64_t m, int64_t k, int64_t n, const int8_t* w, bool transposed,
                const int32_t* colsum, const float* colscale, const float* bias, float* yp) {
  const int64_t k4 = q.ld;  // x's rows are padded to k4 with zeros: their products with the weight's padding vanish
  const uint8_t* xu = q.row(0);
  const Int8Kernels& kern = picked();
  [[maybe_unused]] const bool avx2 = x86_vector_cores();
  const int64_t bcols = block_cols(k4);
  const int64_t blocks = (n + bcols - 1) / bcols;
  at::parallel_for(0, blocks, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<int8_t> pw(k4 * bcols);
    int32_t acc[4 * 16];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t c0 = blk * bcols;
      if (transposed)
        pack_block_t(w, k, n, c0, k4, bcols, pw.data());
      else
        pack_block(w, n, k, c0, k4, bcols, pw.data());
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
        for (int64_t t = 0; t < bcols / 16 && c0 + t * 16 < n; ++t) {
          kern.panel[rows](xu + r0 * k4, k4, pw.data() + t * 16 * 4, k4, bcols, acc);
          const int64_t cols = std::min<int64_t>(16, n - c0 - t * 16);
          const int64_t cc = c0 + t * 16;
          const float* sw = colscale ? colscale + cc : nullptr;
          const float* b = bias ? bias + cc : nullptr;
#ifdef ET_X86
          if (avx2 && cols == 16)
            epilogue_panel_avx2(acc, rows, &q.zp[r0], &q.sx[r0], colsum + cc, sw, b, yp + r0 * n + cc, n);
          else
#endif
            for (int r = 0; r < rows; ++r)
              epilogue_run(acc + r * 16, cols, q.zp[r0 + r], q.sx[r0 + r], colsum + cc, sw, b, yp + (r0 + r) * n + cc);
          for (int r = 0; r < rows; ++r)
            if (q.bad[r0 + r]) std::fill(yp + (r0 + r) * n + cc, yp + (r0 + r) * n + cc + cols, std::numeric_limits<float>::quiet_NaN());
        }
      }
    }
  });
}

at::Tensor int8_linear_dynamic(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  check_x(x, k, "int8_linear_dynamic");
  auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto y = at::empty({m, n}, x2.options());
  if (m == 0 || n == 0) return finish(y, x);
  auto wq = w_q.contiguous();
  auto sc = scale.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int8_t* w = wq.data_ptr<int8_t>();
  const float* sw = sc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  RowQuant q = quantize_rows(x2.data_ptr<float>(), m, k);
  std::vector<int32_t> wsum(n);
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) { picked().row_sums(w + lo * k, hi - lo, k, wsum.data() + lo); });
  if (m > kDynamicDirectMaxRows) {
    panel_gemm(q, m, k, n, w, /*transposed=*/false, wsum.data(), sw, bp, yp);
    return finish(y, x);
  }
  // Few rows: 2 weight rows at a time straight from w_q, dot products along k.
  const int64_t pairs = (n + 1) / 2;
  at::parallel_for(0, pairs, 8, [&](int64_t plo, int64_t phi) {
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
      for (int64_t p = plo; p < phi; ++p) {
        const int64_t c0 = 2 * p;
        const int ncols = static_cast<int>(std::min<int64_t>(2, n - c0));
        int32_t acc[8];
        picked().tile[rows](q.row(r0), q.ld, w + c0 * k, k, k, ncols, acc);
        for (int r = 0; r < rows; ++r) {
          const int64_t row = r0 + r;
          float* yr = yp + row * n + c0;
          epilogue_run(acc + r * 2, ncols, q.zp[row], q.sx[row], wsum.data() + c0, sw + c0, bp ? bp + c0 : nullptr, yr);
          if (q.bad[row]) std::fill(yr, yr + ncols, std::numeric_limits<float>::quiet_NaN());
        }
      }
    }
  });
  return finish(y, x);
}


// Input gradient on the int8 path: grad_x = grad_out @ (scale * W). The per-output-channel scale lies along
// this product's reduction, so it multiplies grad_out's columns as its rows are quantized (like x's).
at::Tensor int8_linear_dynamic_grad_input(const at::Tensor& grad_out, const at::Tensor& w_q, const at::Tensor& scale) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  check_x(grad_out, n, "int8_linear_dynamic_grad_input");
  auto g2 = grad_out.reshape({-1, n}).contiguous();
  auto sc = scale.contiguous();
  const int64_t m = g2.size(0);
  auto gx = at::empty({m, k}, g2.options());
  auto sizes = grad_out.sizes().vec();
  sizes.back() = k;
  if (m == 0 || k == 0) return gx.view(sizes);
  auto wq = w_q.contiguous();
  const int8_t* w = wq.data_ptr<int8_t>();
  RowQuant q = quantize_rows(g2.data_ptr<float>(), m, n, sc.data_ptr<float>());
  std::vector<int32_t> colsum(k, 0);
  at::parallel_for(0, k, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t o = 0; o < n; ++o)
      for (int64_t c = lo; c < hi; ++c) colsum[c] += w[o * k + c];
  });
  panel_gemm(q, m, n, k, w, /*transposed=*/true, colsum.data(), nullptr, nullptr, gx.data_ptr<float>());
  return gx.view(sizes);
}

// ---- int4 weights (groups of 32 along k, fp16 scales) with dynamic int8 activations ----
// y[m, n] = (sum over groups g, in order, of float(P[m, n, g] - zp[m] * gsum[n, g]) * s[n, g]) * sx[m] + b[n]
// with P the exact integer product of a group's 32 activations and int4 values, gsum the group's weight sum.
// Each group's product runs on the int8 panels (the weight is unpacked block by block into their layout,
// never whole); only the per-group scale needs a float step, in fp32 without FMA, so the reference
// (ops.int4_linear_dynamic_ref) gives the same bits.
constexpr int64_t kGroup = 32;  // quant.GROUP_SIZE

// Columns c0.. of a packed int4 (n, k/2) weight (quant.py: byte j holds element 2j + 8 in its low nibble and
// 2j + 1 + 8 in its high one) into the panels' [k/4][col][4] int8 layout; per column and group, the weight
// sum (gsum) and the scale as float (gscale), both [g][col]. Columns past n are zero.
void unpack_block_i4(const uint8_t* w, const at::Half* scale, int64_t n, int64_t k, int64_t c0, int64_t bcols,
                     int8_t* out, int32_t* gsum, float* gscale) {
  static const auto lut = [] {
    std::array<std::array<int8_t, 2>, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = {static_cast<int8_t>((b & 15) - 8), static_cast<int8_t>((b >> 4) - 8)};
    return t;
  }();
  const int64_t groups = k / kGroup, cols = std::min(bcols, n - c0);
  if (cols < bcols) std::fill(out, out + k * bcols, 0);
  std::fill(gsum, gsum + groups * bcols, 0);
  std::fill(gscale, gscale + groups * bcols, 0.f);
  for (int64_t c = 0; c < cols; ++c) {
    const uint8_t* wr = w + (c0 + c) * (k / 2);
#ifdef ET_X86
    // SSE2 (every x86-64): a group's 16 bytes to 32 values, its sum by psadbw; 2.5x the table's speed
    const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    for (int64_t g = 0; g < groups; ++g) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + g * kGroup / 2));
      const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      const __m128i sums = _mm_add_epi64(_mm_sad_epu8(lo, _mm_setzero_si128()), _mm_sad_epu8(hi, _mm_setzero_si128()));
      gsum[g * bcols + c] = _mm_cvtsi128_si32(sums) + _mm_cvtsi128_si32(_mm_srli_si128(sums, 8)) - 8 * kGroup;
      alignas(16) int8_t v[kGroup];
      _mm_store_si128(reinterpret_cast<__m128i*>(v), _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight));
      _mm_store_si128(reinterpret_cast<__m128i*>(v + 16), _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight));
      for (int j = 0; j < kGroup / 4; ++j) std::memcpy(out + ((g * kGroup / 4 + j) * bcols + c) * 4, v + j * 4, 4);
    }
    for (int64_t g = 0; g < groups; ++g) gscale[g * bcols + c] = static_cast<float>(scale[(c0 + c) * groups + g]);
    continue;
#endif
    for (int64_t q = 0; q < k / 4; ++q) {
      int8_t* o = out + (q * bcols + c) * 4;
      std::memcpy(o, lut[wr[2 * q]].data(), 2);
      std::memcpy(o + 2, lut[wr[2 * q + 1]].data(), 2);
      gsum[(q * 4 / kGroup) * bcols + c] += lut[wr[2 * q]][0] + lut[wr[2 * q]][1] + lut[wr[2 * q + 1]][0] + lut[wr[2 * q + 1]][1];
    }
    for (int64_t g = 0; g < groups; ++g) gscale[g * bcols + c] = static_cast<float>(scale[(c0 + c) * groups + g]);
  }
}

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// facc[r, c] += float(acc[r, c] - zp[r] * gsum[c]) * gscale[c] for one group of a panel (rows x 16).
ET_CLONES void group_accumulate(const int32_t* acc, int rows, const int32_t* zp, const int32_t* gsum,
                                const float* gscale, float* facc) {
  for (int r = 0; r < rows; ++r) {
#pragma omp simd
    for (int c = 0; c < 16; ++c)
      facc[r * 16 + c] = facc[r * 16 + c] + static_cast<float>(acc[r * 16 + c] - zp[r] * gsum[c]) * gscale[c];
  }
}

#ifdef ET_X86
// The same for every group of a 16-column strip in one call, in AVX2: each group's integer products stay in
// registers (vpmaddubsw + vpmaddwd as in panel_avx2) and go into the float sums as the group ends, instead of
// a panel call and a group_accumulate call per group (those measured 2x the int8 op's time). Explicit
// multiply then add, no FMA in this target: the bits of group_accumulate.
template <int R>
__attribute__((target("avx2"))) void panel_groups_avx2(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k,
                                                       int64_t bcols, const int32_t* zp, const int32_t* gsum,
                                                       const float* gscale, float* facc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < k / kGroup; ++g) {
    __m256i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int64_t kb0 = g * kGroup / 4;
#pragma GCC unroll 8
    for (int j = 0; j < kGroup / 4; ++j) {
      const int64_t kb = kb0 + j;
      const int8_t* p = pw + kb * bcols * 4;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, x + r * ldx + kb * 4, 4);
        const __m256i xb = _mm256_set1_epi32(four);
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i gs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gsum + g * bcols + h * 8));
      const __m256 sc = _mm256_loadu_ps(gscale + g * bcols + h * 8);
      for (int r = 0; r < R; ++r) {
        const __m256i d = _mm256_sub_epi32(acc[r][h], _mm256_mullo_epi32(_mm256_set1_epi32(zp[r]), gs));
        f[r][h] = _mm256_add_ps(f[r][h], _mm256_mul_ps(_mm256_cvtepi32_ps(d), sc));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(facc + r * 16, f[r][0]);
    _mm256_storeu_ps(facc + r * 16 + 8, f[r][1]);
  }
}
using PanelGroupsFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const int32_t*,
                               const int32_t*, const float*, float*);
constexpr PanelGroupsFn kPanelGroupsAvx2[5] = {nullptr, panel_groups_avx2<1>, panel_groups_avx2<2>,
                                               panel_groups_avx2<3>, panel_groups_avx2<4>};
#endif

// y[c] = facc[c] * sx + b[c] for one row's run of columns.
ET_CLONES void group_epilogue(const float* facc, int64_t cols, float sx, const float* b, float* y) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) y[c] = facc[c] * sx + (b ? b[c] : 0.f);
}
#pragma GCC pop_options

at::Tensor int4_linear_dynamic(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_packed.size(0), k = w_packed.size(1) * 2;
  check_x(x, k, "int4_linear_dynamic");
  TORCH_CHECK(k % kGroup == 0 && scale.size(0) == n && scale.size(1) == k / kGroup,
              "int4_linear_dynamic: expects groups of ", kGroup);
  auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto y = at::empty({m, n}, x2.options());
  if (m == 0 || n == 0) return finish(y, x);
  auto wp = w_packed.contiguous();
  auto sc = scale.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const uint8_t* w = wp.data_ptr<uint8_t>();
  const at::Half* s = sc.data_ptr<at::Half>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  RowQuant q = quantize_rows(x2.data_ptr<float>(), m, k);  // rows of k bytes: k is a multiple of 32
  const Int8Kernels& kern = picked();
  [[maybe_unused]] const bool avx2 = x86_vector_cores();
  const int64_t groups = k / kGroup, bcols = block_cols(k), blocks = (n + bcols - 1) / bcols;
  at::parallel_for(0, blocks, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<int8_t> pw(k * bcols);
    std::vector<int32_t> gsum(groups * bcols);
    std::vector<float> gscale(groups * bcols);
    int32_t acc[4 * 16];
    float facc[4 * 16];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t c0 = blk * bcols;
      unpack_block_i4(w, s, n, k, c0, bcols, pw.data(), gsum.data(), gscale.data());
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
        for (int64_t t = 0; t < bcols / 16 && c0 + t * 16 < n; ++t) {
#ifdef ET_X86
          if (avx2)
            for (int h = 0; h < rows; h += 2)  // two rows a call: their sums and the group's fit in 16 registers
              kPanelGroupsAvx2[std::min(2, rows - h)](q.row(r0 + h), q.ld, pw.data() + t * 16 * 4, k, bcols,
                                                      &q.zp[r0 + h], gsum.data() + t * 16, gscale.data() + t * 16,
                                                      facc + h * 16);
          else
#endif
          {
            std::fill(facc, facc + 4 * 16, 0.f);
            for (int64_t g = 0; g < groups; ++g) {
              kern.panel[rows](q.row(r0) + g * kGroup, q.ld, pw.data() + (g * kGroup / 4 * bcols + t * 16) * 4,
                               kGroup, bcols, acc);
              group_accumulate(acc, rows, &q.zp[r0], gsum.data() + g * bcols + t * 16,
                               gscale.data() + g * bcols + t * 16, facc);
            }
          }
          const int64_t cc = c0 + t * 16, cols = std::min<int64_t>(16, n - cc);
          for (int r = 0; r < rows; ++r) {
            float* yr = yp + (r0 + r) * n + cc;
            if (q.bad[r0 + r])
              std::fill(yr, yr + cols, std::numeric_limits<float>::quiet_NaN());
            else
              group_epilogue(facc + r * 16, cols, q.sx[r0 + r], bp ? bp + cc : nullptr, yr);
          }
        }
      }
    }
  });
  return finish(y, x);
}

// ---- LoRA on the dynamic int8 base: the rank-r term goes into the output in place (one addmm) ----
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B, double lora_scale) {
  const int64_t k = w_q.size(1);
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(1) == k && B.size(0) == w_q.size(0) && B.size(1) == A.size(0),
              "lora_linear: A must be (r, in) and B (out, r)");
  auto y = int8_linear_dynamic(x, w_q, scale, bias);
  auto x2 = x.reshape({-1, k});
  auto y2 = y.view({-1, w_q.size(0)});
  if (x2.size(0) > 0) y2.addmm_(at::mm(x2, A.t()), B.t(), 1.0, lora_scale);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) {
  m.impl("int8_linear_dynamic", &int8_linear_dynamic);
  m.impl("lora_linear", &lora_linear);
  m.impl("int8_linear_dynamic_grad_input", &int8_linear_dynamic_grad_input);
  m.impl("int4_linear_dynamic", &int4_linear_dynamic);
}

// Which integer cores run here (for `edge-tune doctor`).
TORCH_LIBRARY_FRAGMENT(edge_tune, m) { m.def("int8_isa() -> str", &int8_isa); }
