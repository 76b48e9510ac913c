// CPU kernel of int4_linear_dynamic: int4 weights in groups of 32 (quant.py's packing) against per-token
// dynamic int8 activations. A weight whose group scales fold into int8 (quant.int4_as_int8: quantize_int4's
// always do) runs as that int8 weight on the int8 panels and epilogue (int4_fold.h); any other on the group
// panels below.
// Schema: ops.py; reference: op_references.py.

#include "int4_fold.h"

#include <array>

namespace {

// ---- int4 weights (groups of 32 along k, fp16 scales) with dynamic int8 activations ----
// y[m, n] = (F[m, n] - zp[m] * C[n]) * sx[m] + b[n], F[m, n] = sum over groups g, in order, of
// float(P[m, n, g]) * s[n, g], C[n] = the same sum of float(gsum[n, g]) * s[n, g], with P the exact integer
// product of a group's 32 unsigned activations and int4 values, gsum the group's weight sum. Each group's
// product runs on the int8 panels (the weight is unpacked block by block into their layout, never whole);
// the zero point's share comes off once a column, after the groups (inside them it cost a 32-bit multiply
// per group and accumulator on the vpdpbusd ports). Float steps in fp32 without FMA, in the reference's
// order (ops.int4_linear_dynamic_ref), so the two give the same bits.

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Where a strip of a panel's rows ends up: y[r, c] = (f[r, c] - zp[r] * gcorr[c]) * sx[r] + bias[c] for the
// strip's first `cols` columns (bias may be null: + 0).
struct StripOut {
  const float* gcorr;
  const float* bias;
  const int32_t* zp;
  const float* sx;
  float* y;
  int64_t ldy;
  int64_t cols;
};

#ifdef ET_X86
// 8 x 8 transpose of 16-bit units: in[i] holds row i's 8 units, out[j] the 8 rows' unit j.
__attribute__((target("avx2"), always_inline)) inline void transpose8x8_epi16(const __m128i* in, __m128i* out) {
  __m128i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(in[2 * i], in[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3
    u[4 * h] = _mm_unpacklo_epi32(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm_unpackhi_epi32(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = _mm_unpacklo_epi64(u[i], u[4 + i]);
    out[2 * i + 1] = _mm_unpackhi_epi64(u[i], u[4 + i]);
  }
}

// unpack_block_i4 for 16 whole columns c.. of the block at once (AVX2 + F16C), the same bytes and floats:
// per group, the 16 columns' 16 bytes are transposed as 8 x 8 blocks of 16-bit k-quads, so each quad's
// nibbles of 8 columns expand in one register to the panels' [col][4] bytes (and, shift, interleave)
// instead of one column and 4 bytes at a time; the weight sums come from the same registers (nibble sums
// per byte <= 8 x 30, then vpmaddubsw adds a column's two bytes), the scales convert 8 at a time (vcvtph2ps),
// and C accumulates 8 columns per register in group order. At few rows (a sentence) unpacking the weight
// was most of the op: a 17-row call on MiniLM's shapes took 2.2-2.6x, a 1-row one 2.5-3.8x this time.
__attribute__((target("avx2,f16c"))) void unpack_cols16_avx2(const uint8_t* w, const at::Half* scale, int64_t k,
                                                             int64_t bcols, int64_t c, int8_t* out, float* gscale,
                                                             float* gcorr) {
  const int64_t groups = k / kGroup;
  for (int cc = 0; cc < 16; ++cc) {
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale) + cc * groups;
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      alignas(32) float f[8];
      _mm256_store_ps(f, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + g))));
      for (int i = 0; i < 8; ++i) gscale[(g + i) * bcols + c + cc] = f[i];
    }
    for (; g < groups; ++g) gscale[g * bcols + c + cc] = _cvtsh_ss(sp[g]);
  }
  const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8), ones = _mm_set1_epi8(1);
  const __m256i bias = _mm256_set1_epi32(8 * kGroup);
  __m256 corr[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < groups; ++g) {
    __m128i rows[16], quads[16];  // quads[8h + j]: k-quad j of columns 8h..8h+7, 2 bytes each
    for (int cc = 0; cc < 16; ++cc)
      rows[cc] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + cc * (k / 2) + g * kGroup / 2));
    transpose8x8_epi16(rows, quads);
    transpose8x8_epi16(rows + 8, quads + 8);
    for (int h = 0; h < 2; ++h) {
      __m128i sum = _mm_setzero_si128();
      for (int j = 0; j < 8; ++j) {
        const __m128i b = quads[8 * h + j];
        const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        sum = _mm_add_epi8(sum, _mm_add_epi8(lo, hi));
        int8_t* o = out + ((g * kGroup / 4 + j) * bcols + c + 8 * h) * 4;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight));
      }
      const __m256i gsum = _mm256_sub_epi32(_mm256_cvtepi16_epi32(_mm_maddubs_epi16(sum, ones)), bias);
      const __m256 sc = _mm256_loadu_ps(gscale + g * bcols + c + 8 * h);
      corr[h] = _mm256_add_ps(corr[h], _mm256_mul_ps(_mm256_cvtepi32_ps(gsum), sc));
    }
  }
  _mm256_storeu_ps(gcorr + c, corr[0]);
  _mm256_storeu_ps(gcorr + c + 8, corr[1]);
}
#endif

// Columns c0.. of a packed int4 (n, k/2) weight (quant.py: byte j holds element 2j + 8 in its low nibble and
// 2j + 1 + 8 in its high one) into the panels' [k/4][col][4] int8 layout; per column and group the scale as
// float (gscale, [g][col]), and per column C (gcorr). Columns past n are zero.
void unpack_block_i4(const uint8_t* w, const at::Half* scale, int64_t n, int64_t k, int64_t c0, int64_t bcols,
                     int8_t* out, float* gscale, float* gcorr, bool wide) {
  const int64_t groups = k / kGroup, cols = std::min(bcols, n - c0);
  if (cols < bcols) std::fill(out, out + k * bcols, 0);
  std::fill(gscale, gscale + groups * bcols, 0.f);
  std::fill(gcorr, gcorr + bcols, 0.f);
  int64_t c = 0;
#ifdef ET_X86
  if (wide)
    for (; c + 16 <= cols; c += 16)
      unpack_cols16_avx2(w + (c0 + c) * (k / 2), scale + (c0 + c) * groups, k, bcols, c, out, gscale, gcorr);
#endif
  for (; c < cols; ++c) {
    const uint8_t* wr = w + (c0 + c) * (k / 2);
    float corr = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t gsum = 0;  // the group's weight sum
#ifdef ET_X86
      // SSE2 (every x86-64): a group's 16 bytes to 32 values, its sum by psadbw; 2.5x the table's speed
      const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + g * kGroup / 2));
      const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      const __m128i sums = _mm_add_epi64(_mm_sad_epu8(lo, _mm_setzero_si128()), _mm_sad_epu8(hi, _mm_setzero_si128()));
      gsum = _mm_cvtsi128_si32(sums) + _mm_cvtsi128_si32(_mm_srli_si128(sums, 8)) - 8 * kGroup;
      alignas(16) int8_t v[kGroup];
      _mm_store_si128(reinterpret_cast<__m128i*>(v), _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight));
      _mm_store_si128(reinterpret_cast<__m128i*>(v + 16), _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight));
      for (int j = 0; j < kGroup / 4; ++j) std::memcpy(out + ((g * kGroup / 4 + j) * bcols + c) * 4, v + j * 4, 4);
#else
      static const auto lut = [] {
        std::array<std::array<int8_t, 2>, 256> t{};
        for (int b = 0; b < 256; ++b) t[b] = {static_cast<int8_t>((b & 15) - 8), static_cast<int8_t>((b >> 4) - 8)};
        return t;
      }();
      for (int64_t q = g * kGroup / 4; q < (g + 1) * kGroup / 4; ++q) {
        const auto &p0 = lut[wr[2 * q]], &p1 = lut[wr[2 * q + 1]];
        int8_t* o = out + (q * bcols + c) * 4;
        std::memcpy(o, p0.data(), 2);
        std::memcpy(o + 2, p1.data(), 2);
        gsum += p0[0] + p0[1] + p1[0] + p1[1];
      }
#endif
      gscale[g * bcols + c] = static_cast<float>(scale[(c0 + c) * groups + g]);
      corr = corr + static_cast<float>(gsum) * gscale[g * bcols + c];
    }
    gcorr[c] = corr;
  }
}

// facc[r, c] += float(acc[r, c]) * gscale[c] for one group of a panel (rows x 16).
ET_CLONES void group_accumulate(const int32_t* acc, int rows, const float* gscale, float* facc) {
  for (int r = 0; r < rows; ++r) {
#pragma omp simd
    for (int c = 0; c < 16; ++c) facc[r * 16 + c] = facc[r * 16 + c] + static_cast<float>(acc[r * 16 + c]) * gscale[c];
  }
}

#ifdef ET_X86
// The same for every group of a 16-column strip in one call, in AVX2: each group's integer products stay in
// registers and go into the float sums as the group ends, instead of a panel call and a group_accumulate
// call per group (those measured 2x the int8 op's time). A product pair of 7-bit activations and int4 values
// is within +-2032, so a group's 8 quads add up in int16 (+-16256) with vpaddw, and one vpmaddwd a group
// widens them: 2 integer ops a quad and accumulator where the int8 panel needs 3. Explicit multiply then
// add, no FMA in this target: the bits of group_accumulate.
template <int R>
__attribute__((target("avx2"))) void panel_groups_avx2(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k,
                                                       int64_t bcols, const float* gscale, float* facc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < k / kGroup; ++g) {
    __m256i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int64_t kb0 = g * kGroup / 4;
    // Not unrolled: unrolled, GCC reassociates the 8 quads' sums into a tree and spills the products.
#pragma GCC unroll 1
    for (int j = 0; j < kGroup / 4; ++j) {
      const int8_t* p = pw + (kb0 + j) * bcols * 4;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, x + r * ldx + (kb0 + j) * 4, 4);
        const __m256i xb = _mm256_set1_epi32(four);
        acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(xb, w0));
        acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(xb, w1));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sc = _mm256_loadu_ps(gscale + g * bcols + h * 8);
      for (int r = 0; r < R; ++r)
        f[r][h] = _mm256_add_ps(f[r][h], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][h], ones)), sc));
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(facc + r * 16, f[r][0]);
    _mm256_storeu_ps(facc + r * 16 + 8, f[r][1]);
  }
}

// The same with AVX-512 VNNI on up to 6 rows x 32 columns: one vpdpbusd per row, k-quad and 16 columns,
// each broadcast row quad feeding two of them (8 loads per 12 dot products, 12 chains against vpdpbusd's
// latency; 12 integer and 12 float accumulators fill 24 of the 32 registers). A group's end is one
// convert, multiply and add per 16 lanes; the strip's end goes straight to y (group_epilogue's steps). The
// integers are those of group_accumulate, and the float steps the same separately rounded operations (no
// FMA: the pragma above), so the bits of the AVX2 path.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void panel_groups_vnni(const uint8_t* x, int64_t ldx,
                                                                               const int8_t* pw, int64_t k,
                                                                               int64_t bcols, const float* gscale,
                                                                               const StripOut& o) {
  __m512 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < k / kGroup; ++g) {
    __m512i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
    const int64_t kb0 = g * kGroup / 4;
    for (int j = 0; j < kGroup / 4; ++j) {
      const int8_t* p = pw + (kb0 + j) * bcols * 4;
      const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, x + r * ldx + (kb0 + j) * 4, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        a[r][0] = dpbusd(a[r][0], xb, w0);
        a[r][1] = dpbusd(a[r][1], xb, w1);
      }
    }
    const __m512 sc0 = _mm512_loadu_ps(gscale + g * bcols), sc1 = _mm512_loadu_ps(gscale + g * bcols + 16);
    for (int r = 0; r < R; ++r) {
      f[r][0] = _mm512_add_ps(f[r][0], _mm512_mul_ps(_mm512_cvtepi32_ps(a[r][0]), sc0));
      f[r][1] = _mm512_add_ps(f[r][1], _mm512_mul_ps(_mm512_cvtepi32_ps(a[r][1]), sc1));
    }
  }
  const __mmask16 m0 = static_cast<__mmask16>((1u << std::min<int64_t>(16, o.cols)) - 1);
  const __mmask16 m1 = static_cast<__mmask16>((1u << std::max<int64_t>(0, o.cols - 16)) - 1);
  const __m512 c0 = _mm512_maskz_loadu_ps(m0, o.gcorr), c1 = _mm512_maskz_loadu_ps(m1, o.gcorr + 16);
  const __m512 b0 = o.bias ? _mm512_maskz_loadu_ps(m0, o.bias) : _mm512_setzero_ps();
  const __m512 b1 = o.bias ? _mm512_maskz_loadu_ps(m1, o.bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const __m512 zp = _mm512_set1_ps(static_cast<float>(o.zp[r])), sx = _mm512_set1_ps(o.sx[r]);
    float* yr = o.y + r * o.ldy;
    _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(f[r][0], _mm512_mul_ps(zp, c0)), sx), b0));
    _mm512_mask_storeu_ps(yr + 16, m1,
                          _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(f[r][1], _mm512_mul_ps(zp, c1)), sx), b1));
  }
}
using PanelGroupsFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const float*, float*);
constexpr PanelGroupsFn kPanelGroupsAvx2[5] = {nullptr, panel_groups_avx2<1>, panel_groups_avx2<2>,
                                               panel_groups_avx2<3>, panel_groups_avx2<4>};
using PanelGroupsOutFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const float*,
                                  const StripOut&);
constexpr PanelGroupsOutFn kPanelGroupsVnni[7] = {nullptr,
                                               panel_groups_vnni<1>,
                                               panel_groups_vnni<2>,
                                               panel_groups_vnni<3>,
                                               panel_groups_vnni<4>,
                                               panel_groups_vnni<5>,
                                               panel_groups_vnni<6>};
#endif

// y[c] = (facc[c] - zp * gcorr[c]) * sx + b[c] for one row's run of columns.
ET_CLONES void group_epilogue(const float* facc, const float* gcorr, int64_t cols, float zp, float sx, const float* b,
                              float* y) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) y[c] = (facc[c] - zp * gcorr[c]) * sx + (b ? b[c] : 0.f);
}
#pragma GCC pop_options

at::Tensor int4_linear_dynamic(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_packed.size(0), k = w_packed.size(1) * 2;
  check_x(x, k, "int4_linear_dynamic");
  TORCH_CHECK(k % kGroup == 0 && scale.size(0) == n && scale.size(1) == k / kGroup,
              "int4_linear_dynamic: expects groups of ", kGroup);
  auto wp = w_packed.contiguous();
  auto sc = scale.contiguous();
  auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto y = at::empty({m, n}, x2.options());
  if (m == 0 || n == 0) return finish(y, x);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const uint8_t* w = wp.data_ptr<uint8_t>();
  const at::Half* s = sc.data_ptr<at::Half>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  RowQuant q = quantize_rows(x2.data_ptr<float>(), m, k);  // rows of k bytes: k is a multiple of 32
  if (folded_gemm(q, m, n, k, w, s, bp, yp)) return finish(y, x);
  const Int8Kernels& kern = picked();
  [[maybe_unused]] const bool avx2 = x86_vector_cores();
  bool wide = false;  // unpack 16 columns at a time (unpack_cols16_avx2)
#ifdef ET_X86
  wide = avx2 && __builtin_cpu_supports("f16c");
#endif
  // strips of sw columns and rs rows: 32 x 6 for the VNNI group panel, 16 x 4 for the others (bcols a
  // multiple of sw)
  int64_t sw = 16, rs = 4;
#ifdef ET_X86
  const bool vnni = picked_isa() == Isa::vnni;
  if (vnni) sw = 32, rs = 6;
#endif
  const int64_t groups = k / kGroup, bcols = block_cols(k, sw), blocks = (n + bcols - 1) / bcols;
  at::parallel_for(0, blocks, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<int8_t> pw(k * bcols);
    std::vector<float> gscale(groups * bcols), gcorr(bcols);
    int32_t acc[4 * 16];
    float facc[4 * 16];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t c0 = blk * bcols;
      unpack_block_i4(w, s, n, k, c0, bcols, pw.data(), gscale.data(), gcorr.data(), wide);
      for (int64_t r0 = 0; r0 < m; r0 += rs) {
        const int rows = static_cast<int>(std::min<int64_t>(rs, m - r0));
        for (int64_t t = 0; t < bcols / sw && c0 + t * sw < n; ++t) {
          const int64_t cc = c0 + t * sw, cols = std::min<int64_t>(sw, n - cc);
#ifdef ET_X86
          if (vnni) {
            const StripOut o{gcorr.data() + t * sw, bp ? bp + cc : nullptr, &q.zp[r0], &q.sx[r0], yp + r0 * n + cc, n, cols};
            kPanelGroupsVnni[rows](q.row(r0), q.ld, pw.data() + t * sw * 4, k, bcols, gscale.data() + t * sw, o);
            for (int r = 0; r < rows; ++r)
              if (q.bad[r0 + r]) std::fill_n(yp + (r0 + r) * n + cc, cols, std::numeric_limits<float>::quiet_NaN());
            continue;
          }
          if (avx2)
            kPanelGroupsAvx2[rows](q.row(r0), q.ld, pw.data() + t * sw * 4, k, bcols, gscale.data() + t * sw, facc);
          else
#endif
          {
            std::fill(facc, facc + 4 * 16, 0.f);
            for (int64_t g = 0; g < groups; ++g) {
              kern.panel[rows](q.row(r0) + g * kGroup, q.ld, pw.data() + (g * kGroup / 4 * bcols + t * 16) * 4,
                               kGroup, bcols, acc);
              group_accumulate(acc, rows, gscale.data() + g * bcols + t * 16, facc);
            }
          }
          for (int r = 0; r < rows; ++r) {
            float* yr = yp + (r0 + r) * n + cc;
            if (q.bad[r0 + r])
              std::fill(yr, yr + cols, std::numeric_limits<float>::quiet_NaN());
            else
              group_epilogue(facc + r * sw, gcorr.data() + t * sw, cols, static_cast<float>(q.zp[r0 + r]),
                             q.sx[r0 + r], bp ? bp + cc : nullptr, yr);
          }
        }
      }
    }
  });
  return finish(y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) { m.impl("int4_linear_dynamic", &int4_linear_dynamic); }
