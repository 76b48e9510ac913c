// CPU kernel of int4_linear_dynamic: int4 weights in groups of 32 (quant.py's packing) against per-token
// dynamic int8 activations, on the int8 panels of int8_panels.h. Schema: ops.py; reference: op_references.py.

#include "row_quant.h"

#include <array>

namespace {

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
    // Not unrolled: unrolled, GCC reassociates the 8 quads' sums into a tree and spills the products.
#pragma GCC unroll 1
    for (int j = 0; j < kGroup / 4; ++j) quad_avx2<R>(x, ldx, pw, kb0 + j, bcols, ones, acc);
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

// The same with AVX-512 VNNI on 4 rows x 32 columns: one vpdpbusd per row, k-quad and 16 columns, each
// broadcast row quad feeding two of them (6 loads per 8 dot products, 8 chains against vpdpbusd's latency).
// Each group's integer sums start at -zp * gsum, so its end is one convert, multiply and add per 16 lanes
// (a subtract and a bank sum there cost the int4 op a third of its time). The integers are those of
// group_accumulate, and the float steps the same separately rounded operations (no FMA: the pragma above),
// so the bits of the AVX2 path.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void panel_groups_vnni(
    const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k, int64_t bcols, const int32_t* zp,
    const int32_t* gsum, const float* gscale, float* facc) {
  __m512 f[R][2];
  __m512i nz[R];
  for (int r = 0; r < R; ++r) {
    f[r][0] = f[r][1] = _mm512_setzero_ps();
    nz[r] = _mm512_set1_epi32(static_cast<int32_t>(0u - static_cast<uint32_t>(zp[r])));
  }
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const __m512i gs0 = _mm512_loadu_si512(gsum + g * bcols), gs1 = _mm512_loadu_si512(gsum + g * bcols + 16);
    __m512i a[R][2];
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm512_mullo_epi32(nz[r], gs0);
      a[r][1] = _mm512_mullo_epi32(nz[r], gs1);
    }
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
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(facc + r * 32, f[r][0]);
    _mm512_storeu_ps(facc + r * 32 + 16, f[r][1]);
  }
}
using PanelGroupsFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const int32_t*,
                               const int32_t*, const float*, float*);
constexpr PanelGroupsFn kPanelGroupsAvx2[5] = {nullptr, panel_groups_avx2<1>, panel_groups_avx2<2>,
                                               panel_groups_avx2<3>, panel_groups_avx2<4>};
constexpr PanelGroupsFn kPanelGroupsVnni[5] = {nullptr, panel_groups_vnni<1>, panel_groups_vnni<2>,
                                               panel_groups_vnni<3>, panel_groups_vnni<4>};
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
  // strips of sw columns: 32 for the VNNI group panel, 16 for the others (bcols a multiple of it)
  int64_t sw = 16;
#ifdef ET_X86
  const bool vnni = picked_isa() == Isa::vnni;
  const PanelGroupsFn* panel_groups = vnni ? kPanelGroupsVnni : kPanelGroupsAvx2;
  if (vnni) sw = 32;
#endif
  const int64_t groups = k / kGroup, bcols = block_cols(k, sw), blocks = (n + bcols - 1) / bcols;
  at::parallel_for(0, blocks, 1, [&](int64_t blo, int64_t bhi) {
    std::vector<int8_t> pw(k * bcols);
    std::vector<int32_t> gsum(groups * bcols);
    std::vector<float> gscale(groups * bcols);
    int32_t acc[4 * 16];
    float facc[4 * 32];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t c0 = blk * bcols;
      unpack_block_i4(w, s, n, k, c0, bcols, pw.data(), gsum.data(), gscale.data());
      for (int64_t r0 = 0; r0 < m; r0 += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
        for (int64_t t = 0; t < bcols / sw && c0 + t * sw < n; ++t) {
#ifdef ET_X86
          if (avx2)
            panel_groups[rows](q.row(r0), q.ld, pw.data() + t * sw * 4, k, bcols, &q.zp[r0], gsum.data() + t * sw,
                               gscale.data() + t * sw, facc);
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
          const int64_t cc = c0 + t * sw, cols = std::min<int64_t>(sw, n - cc);
          for (int r = 0; r < rows; ++r) {
            float* yr = yp + (r0 + r) * n + cc;
            if (q.bad[r0 + r])
              std::fill(yr, yr + cols, std::numeric_limits<float>::quiet_NaN());
            else
              group_epilogue(facc + r * sw, cols, q.sx[r0 + r], bp ? bp + cc : nullptr, yr);
          }
        }
      }
    }
  });
  return finish(y, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) { m.impl("int4_linear_dynamic", &int4_linear_dynamic); }
