// The int4 weights whose group scales fold into int8 (quant.int4_as_int8), for cpu_int4_dynamic.cpp: the
// test of a row's scales, and the GEMM that unfolds such a weight block by block onto the int8 panels.
#pragma once

#include "int8_gemm.h"

#include <array>
#include <atomic>

namespace {

constexpr int64_t kGroup = 32;  // quant.GROUP_SIZE

// ---- int4 weights whose group scales fold into int8 (quant.int4_as_int8) ----
// A row whose group scales are m x u (u = its largest scale / 16, m an integer in [0, 16]) is exactly the
// int8 row q x m (in [-128, 112]) times u: one int8 GEMM then, where the group path (cpu_int4_dynamic.cpp)
// does a float convert, multiply and add per group of 32 and accumulator (on VNNI ~1/8 more work on the
// dot products' ports than the int8 op, which no arrangement of the group path removes).

// u and each group's m for one row, if its fp16 scales fold: m is a rounded candidate, then m x u == s
// exactly (u = largest / 16 has the fp16 scale's 11 significant bits, m <= 16 adds 5: exact in fp32).
// `f`: the row's fp16 scales as floats.
bool fold_row(const float* f, int64_t groups, float* u_out, uint8_t* m_out) {
  float top = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    if (!(f[g] >= 0.f && f[g] <= std::numeric_limits<float>::max())) return false;  // negative, inf or NaN
    top = std::max(top, f[g]);
  }
  if (!(top > 0.f)) return false;
  const float u = top / 16.f, inv = 16.f / top;
  for (int64_t g = 0; g < groups; ++g) {
    const int m = static_cast<int>(f[g] * inv + 0.5f);  // f[g] <= top: within [0, 16.5]
    if (!(m <= 16 && static_cast<float>(m) * u == f[g])) return false;
    m_out[g] = static_cast<uint8_t>(m);
  }
  *u_out = u;
  return true;
}

#ifdef ET_X86
// fold_row for 8 columns at once, their scales gathered group by group (fs: the 8 rows of `groups` floats):
// the same test, each column's u, and m as mt[g * 8 + c]. False where any of the 8 does not fold.
__attribute__((target("avx2"))) bool fold_cols8_avx2(const float* fs, int64_t groups, float* u, uint8_t* mt) {
  const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                        _mm256_set1_epi32(static_cast<int32_t>(groups)));
  const __m256 zero = _mm256_setzero_ps(), big = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 top = zero, bad = zero, kept[64];  // the gathered groups, for the second pass (up to 64 groups)
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 v = _mm256_i32gather_ps(fs + g, at, 4);
    if (g < 64) kept[g] = v;
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(v, zero, _CMP_NGE_UQ), _mm256_cmp_ps(v, big, _CMP_GT_OQ)));
    top = _mm256_max_ps(top, v);
  }
  if (_mm256_movemask_ps(_mm256_or_ps(bad, _mm256_cmp_ps(top, zero, _CMP_NGT_UQ)))) return false;
  const __m256 uu = _mm256_div_ps(top, _mm256_set1_ps(16.f)), inv = _mm256_div_ps(_mm256_set1_ps(16.f), top);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256i sixteen = _mm256_set1_epi32(16);
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 v = g < 64 ? kept[g] : _mm256_i32gather_ps(fs + g, at, 4);
    const __m256i m = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v, inv), half));
    const __m256 same = _mm256_cmp_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(m), uu), v, _CMP_EQ_OQ);
    if (_mm256_movemask_ps(same) != 0xFF || _mm256_movemask_epi8(_mm256_cmpgt_epi32(m, sixteen))) return false;
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(mt + g * 8), _mm_packus_epi16(w16, w16));
  }
  _mm256_storeu_ps(u, uu);
  return true;
}
#endif

// kTimes[m][v] = (v - 8) x m: a stored nibble's int4 value times m.
const std::array<std::array<int8_t, 16>, 17> kTimes = [] {
  std::array<std::array<int8_t, 16>, 17> t{};
  for (int m = 0; m <= 16; ++m)
    for (int v = 0; v < 16; ++v) t[m][v] = static_cast<int8_t>((v - 8) * m);
  return t;
}();

// One packed int4 column (k/2 bytes) to its k int8 values times each group's m (group g's at m[g * ms]);
// returns their sum.
int32_t unfold_column(const uint8_t* w, const uint8_t* m, int64_t ms, int64_t k, int8_t* out) {
  int32_t sum = 0;
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const int8_t* t = kTimes[m[g * ms]].data();
    for (int64_t j = g * kGroup / 2; j < (g + 1) * kGroup / 2; ++j) {
      out[2 * j] = t[w[j] & 15];
      out[2 * j + 1] = t[w[j] >> 4];
      sum += out[2 * j] + out[2 * j + 1];
    }
  }
  return sum;
}

#ifdef ET_X86
// fp16 to fp32 8 at a time: how many it converted (the whole 8s of count).
__attribute__((target("avx,f16c"))) int64_t half_to_float_f16c(const at::Half* h, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  return i;
}

// unfold_column two groups a vector (AVX2): each nibble looks its value up in its group's table (pshufb,
// within each 128-bit half: one group's table in each); the sum from the values + 128 (psadbw), less 128 a
// value, once a column. An odd last group by the C++ loop.
__attribute__((target("avx2"))) int32_t unfold_column_avx2(const uint8_t* w, const uint8_t* m, int64_t ms,
                                                           int64_t k, int8_t* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i zero = _mm256_setzero_si256();
  __m256i sums = zero;
  const int64_t groups = k / kGroup;
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const __m256i t = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kTimes[m[g * ms]].data()))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(kTimes[m[(g + 1) * ms]].data())), 1);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * kGroup / 2));
    const __m256i vl = _mm256_shuffle_epi8(t, _mm256_and_si256(b, low4));
    const __m256i vh = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
    const __m256i lo = _mm256_unpacklo_epi8(vl, vh), hi = _mm256_unpackhi_epi8(vl, vh);  // per half: a group's
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * kGroup), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (g + 1) * kGroup), _mm256_permute2x128_si256(lo, hi, 0x31));
    sums = _mm256_add_epi64(sums, _mm256_add_epi64(_mm256_sad_epu8(_mm256_xor_si256(vl, flip), zero),
                                                   _mm256_sad_epu8(_mm256_xor_si256(vh, flip), zero)));
  }
  const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
  int64_t sum = _mm_cvtsi128_si64(s2) + _mm_cvtsi128_si64(_mm_srli_si128(s2, 8)) - 128 * (g * kGroup);
  if (g < groups) sum += unfold_column(w + g * kGroup / 2, m + g * ms, ms, kGroup, out + g * kGroup);
  return static_cast<int32_t>(sum);
}

// cols_to_panels for 8 columns x 8 k-quads at a time: an 8 x 8 transpose of 32-bit units (AVX2).
__attribute__((target("avx2"))) void cols_to_panels_avx2(const int8_t* cols, int64_t k, int64_t bcols, int8_t* out) {
  for (int64_t c = 0; c < bcols; c += 8)
    for (int64_t q = 0; q < k / 4; q += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(cols + (c + i) * k + q * 4));
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 2; ++i) {
        r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        t[i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x20);
        t[4 + i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x31);
      }
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(out + ((q + i) * bcols + c) * 4), t[i]);
    }
}
#endif

// A block's bcols columns, each k unfolded bytes in cols[c * k], into the int8 panels' [k/4][bcols][4] layout.
void cols_to_panels(const int8_t* cols, int64_t k, int64_t bcols, int8_t* out) {
#ifdef ET_X86
  if (x86_vector_cores()) return cols_to_panels_avx2(cols, k, bcols, out);
#endif
  for (int64_t q = 0; q < k / 4; ++q)
    for (int64_t c = 0; c < bcols; ++c) std::memcpy(out + (q * bcols + c) * 4, cols + c * k + q * 4, 4);
}

// fp16 to fp32, 8 at a time with F16C where the CPU has it.
void half_to_float(const at::Half* h, int64_t count, float* out) {
  int64_t i = 0;
#ifdef ET_X86
  if (x86_vector_cores() && __builtin_cpu_supports("f16c")) i = half_to_float_f16c(h, count, out);
#endif
  for (; i < count; ++i) out[i] = static_cast<float>(h[i]);
}

// Columns c0..c0 + ncols of the weight (rows of the stored (n, k/2) int4 weight, scales (n, k/32)), each
// unfolded to k bytes in out[c * k], with its sum of them (wsum) and its scale (u); false where one's scales
// do not fold (then nothing is meant by what was written).
bool unfold_columns(const uint8_t* w, const at::Half* s, int64_t k, int64_t c0, int64_t ncols, int8_t* out,
                    int32_t* wsum, float* u) {
  const int64_t groups = k / kGroup;
  float f[2 * 64 * 48];  // a block's scales: <= 64 columns of <= 48 groups at MiniLM's widths; else the heap
  std::vector<float> big(ncols * groups > 2 * 64 * 48 ? ncols * groups : 0);
  float* fs = big.empty() ? f : big.data();
  half_to_float(s + c0 * groups, ncols * groups, fs);
  auto unfold = unfold_column;
  [[maybe_unused]] bool by8 = false;  // 8 columns' scales tested at once
#ifdef ET_X86
  if (x86_vector_cores()) unfold = unfold_column_avx2, by8 = true;  // the scalar cores keep the C++ loops
#endif
  uint8_t small_m[8 * 64];  // group multiples: 8 columns' (k <= 2048; else the heap)
  std::vector<uint8_t> big_m(groups > 64 ? 8 * groups : 0);
  uint8_t* mt = big_m.empty() ? small_m : big_m.data();
  int64_t c = 0;
#ifdef ET_X86
  if (by8)
    for (; c + 8 <= ncols; c += 8) {
      if (!fold_cols8_avx2(fs + c * groups, groups, u + c, mt)) return false;
      for (int64_t i = 0; i < 8; ++i)
        wsum[c + i] = unfold(w + (c0 + c + i) * (k / 2), mt + i, 8, k, out + (c + i) * k);
    }
#endif
  for (; c < ncols; ++c) {  // the rest one by one
    if (!fold_row(fs + c * groups, groups, u + c, mt)) return false;
    wsum[c] = unfold(w + (c0 + c) * (k / 2), mt, 1, k, out + c * k);
  }
  return true;
}

// The block of output columns c0.. (bcols wide; columns past n zero) tested and unfolded into the panels'
// layout (pw), with its columns' sums and scales; false, and `folds` cleared, where its scales do not fold
// (or another block's did not). cols: scratch of bcols x k bytes.
bool unfold_block(const uint8_t* w, const at::Half* s, int64_t n, int64_t k, int64_t c0, int64_t bcols, int8_t* cols,
                  int8_t* pw, int32_t* wsum, float* u, std::atomic<bool>& folds) {
  const int64_t ncols = std::min(bcols, n - c0);
  if (!folds.load(std::memory_order_relaxed) || !unfold_columns(w, s, k, c0, ncols, cols, wsum, u)) {
    folds = false;
    return false;
  }
  std::fill(cols + ncols * k, cols + bcols * k, 0);
  cols_to_panels(cols, k, bcols, pw);
  return true;
}

// y = the int8 epilogue over the folded weight, if every row of it folds (else false, y to be overwritten):
// at <= 4 rows 16 columns unfolded at a time, then the int8 op's tiles; more, int8_linear_dynamic's split
// and panels (run_panels) over blocks unfolded into the panels' layout: by each task as it starts its block
// (~24 KB) where the rows are one chunk (every block then runs once), else all first, into an int8 copy
// for the call (as int8_linear_dynamic packs its weight each call): that op's bits on that weight.
bool folded_gemm(const RowQuant& q, int64_t m, int64_t n, int64_t k, const uint8_t* w, const at::Half* s,
                 const float* bias, float* yp) {
  const Int8Kernels& kern = picked();
  std::atomic<bool> folds{true};
  if (m <= 4) {  // a sentence's few rows: the int8 op's tiles, over 16 columns unfolded at a time
    constexpr int64_t kCols = 16;
    at::parallel_for(0, (n + kCols - 1) / kCols, 4, [&](int64_t lo, int64_t hi) {
      std::vector<int8_t> cols(kCols * k);
      int32_t wsum[kCols];
      float u[kCols];
      for (int64_t blk = lo; blk < hi && folds.load(std::memory_order_relaxed); ++blk) {
        const int64_t c0 = blk * kCols, ncols = std::min(kCols, n - c0);
        if (!unfold_columns(w, s, k, c0, ncols, cols.data(), wsum, u)) {
          folds = false;
          return;
        }
        for (int64_t p = 0; p < ncols; p += 2) {
          const int pc = static_cast<int>(std::min<int64_t>(2, ncols - p));
          int32_t acc[8];
          kern.tile[m](q.row(0), q.ld, cols.data() + p * k, k, k, pc, acc);
          for (int64_t r = 0; r < m; ++r) {
            float* yr = yp + r * n + c0 + p;
            epilogue_run(acc + r * 2, pc, q.zp[r], q.sx[r], wsum + p, u + p, bias ? bias + c0 + p : nullptr, yr);
            if (q.bad[r]) std::fill(yr, yr + pc, std::numeric_limits<float>::quiet_NaN());
          }
        }
      }
    });
    return folds;
  }
  const PanelSplit sp = split_panels(m, n, k, kern);
  const int64_t bcols = sp.bcols;
  if (sp.chunks > 1) {  // each block would be unfolded once a chunk: unfold the weight once, for the call
    // A tensor, not a vector: from the c10 allocator, so the tensor cache hands back the same pages every call.
    at::Tensor packed = at::empty({sp.blocks * k * bcols}, at::kChar);
    int8_t* pw = packed.data_ptr<int8_t>();
    std::vector<int32_t> wsum(sp.blocks * bcols);
    std::vector<float> u(sp.blocks * bcols);
    at::parallel_for(0, sp.blocks, std::max<int64_t>(1, kMinPassBytes / (k * bcols)), [&](int64_t blo, int64_t bhi) {
      std::vector<int8_t> cols(bcols * k);
      for (int64_t blk = blo; blk < bhi; ++blk)
        if (!unfold_block(w, s, n, k, blk * bcols, bcols, cols.data(), pw + blk * k * bcols, &wsum[blk * bcols],
                          &u[blk * bcols], folds))
          return;
    });
    if (!folds) return false;
    struct NoScratch {};
    run_panels<NoScratch>(q, m, n, sp, bias, yp, [&](int64_t blk, NoScratch&) {
      return PanelBlock{pw + blk * k * bcols, &wsum[blk * bcols], &u[blk * bcols]};
    });
    return true;
  }
  struct Unfolded {  // a thread's block: its columns unfolded, then laid out as panels
    std::vector<int8_t> cols, pw;
    std::vector<int32_t> wsum;
    std::vector<float> u;
  };
  run_panels<Unfolded>(q, m, n, sp, bias, yp, [&](int64_t blk, Unfolded& b) -> PanelBlock {
    if (b.pw.empty()) b.cols.resize(bcols * k), b.pw.resize(bcols * k), b.wsum.resize(bcols), b.u.resize(bcols);
    if (!unfold_block(w, s, n, k, blk * bcols, bcols, b.cols.data(), b.pw.data(), b.wsum.data(), b.u.data(), folds))
      return {nullptr, nullptr, nullptr};
    return {b.pw.data(), b.wsum.data(), b.u.data()};
  });
  return folds;
}

}  // namespace
