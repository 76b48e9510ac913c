// The x86 integer cores of int8_panels.h (AVX2; AVX-512 VNNI) and its wide packing steps: included by it,
// inside namespace edge_tune_int8, after the layout and the scalar cores they fall back on.
#pragma once

#ifdef ET_INT8_X86
__attribute__((target("avx2"))) inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int R>
__attribute__((target("avx2"))) void tile_avx2(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k,
                                               int ncols, int32_t* out) {
  if (ncols < 2) return tile_scalar<R>(x, ldx, w, ldw, k, ncols, out);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + ldw + i));
    for (int r = 0; r < R; ++r) {
      const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * ldx + i));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xr, w0), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xr, w1), ones));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) out[r * 2 + c] = hsum_epi32(acc[r][c]);
  tile_tail<R>(x, ldx, w, ldw, i, k, out);
}

// One k-quad kb of R rows against 16 packed columns (a block `bcols` wide): vpmaddubsw + vpmaddwd leave 8
// columns' partial sums in one register, so no horizontal sums.
template <int R>
__attribute__((target("avx2"), always_inline)) inline void quad_avx2(const uint8_t* x, int64_t ldx, const int8_t* pw,
                                                                    int64_t kb, int64_t bcols, __m256i ones,
                                                                    __m256i (&acc)[R][2]) {
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

template <int R>
__attribute__((target("avx2"))) void panel_avx2(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k4,
                                                int64_t bcols, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t kb = 0; kb < k4 / 4; ++kb) quad_avx2<R>(x, ldx, pw, kb, bcols, ones, acc);
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * 16), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * 16 + 8), acc[r][1]);
  }
}

// vpdpbusd (acc += u8 x * s8 w, 4 products a lane) through asm: GCC 12's builtin kept its accumulator in
// zmm0-15, and the 8 x 32 panel's loop moved all 16 accumulators out of zmm16-31 and back every k-quad
// (two moves a dot product); the "v" constraint lets them stay in any of the 32 registers.
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline __m512i dpbusd(__m512i acc, __m512i x,
                                                                                           __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}

// pack_block's AVX-512 step: 16 weight rows (columns of the packed block), 16 k-quads at a time, transposed
// as a 16 x 16 matrix of 32-bit quads (unpacks by 32 and 64 bits, then two rounds of 128-bit shuffles: 64
// shuffles a KB against the SSE2 4 x 4 transpose's 128); each packed row of 16 quads also goes through one
// vpdpbusd with ones, which adds every column's 4 bytes into its lane of the sums. Returns the quads done
// (k / 4 rounded down to 16); sums[0..16) holds their sums.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12: the _mm512_undefined_epi32() inside the unpacks
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline int64_t pack_cols16_vnni(const int8_t* w, int64_t k,
                                                                                        int64_t bcols, int8_t* out,
                                                                                        int32_t* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sacc = _mm512_setzero_si512();
  int64_t kb = 0;
  for (; kb + 16 <= k / 4; kb += 16) {
    __m512i r[16], t[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_si512(w + j * k + kb * 4);
    for (int j = 0; j < 16; j += 2) {  // per 128-bit chunk: rows j, j+1 interleaved by quad
      t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
      t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int g = 0; g < 16; g += 4) {  // per chunk: rows g..g+3 of quad e in r[g + e]
      r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
      r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
      r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
      r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int e = 0; e < 4; ++e) {  // gather quad 4L + e's four row groups from chunk L of r[e], r[4+e], ...
      const __m512i vlo = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88), vhi = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xDD);
      const __m512i wlo = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
      const __m512i whi = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xDD);
      t[e] = _mm512_shuffle_i32x4(vlo, wlo, 0x88);
      t[8 + e] = _mm512_shuffle_i32x4(vlo, wlo, 0xDD);
      t[4 + e] = _mm512_shuffle_i32x4(vhi, whi, 0x88);
      t[12 + e] = _mm512_shuffle_i32x4(vhi, whi, 0xDD);
    }
    for (int j = 0; j < 16; ++j) {
      _mm512_storeu_si512(out + (kb + j) * bcols * 4, t[j]);
      sacc = dpbusd(sacc, ones, t[j]);
    }
  }
  _mm512_storeu_si512(sums, sacc);
  return kb;
}
#pragma GCC diagnostic pop

// AVX-512 VNNI: one 64-byte load holds 4 k of 16 columns, one vpdpbusd per row, k-quad and 16 columns (it
// does vpmaddubsw + vpmaddwd + vpaddd in one; with 7-bit activations vpmaddubsw never saturates, so both
// paths give the same integers). Up to 8 rows x 32 columns: 16 independent accumulators cover vpdpbusd's
// latency, and each broadcast row quad feeds two of them, so the loads (2 + R a quad) stay under the dot
// products (2R). The earlier 4 x 16 panel (5 loads per 4 dot products, 8 chains) ran at ~100 GMAC/s a
// core on a Sapphire Rapids Xeon, below fbgemm's whole op.
// The panel's sums into a[r][0..1] (columns 0-15, 16-31); panel_vnni stores them, the dynamic op's
// panel_vnni_out (cpu_dynamic.cpp) applies its epilogue to them in registers.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void panel_vnni_sums(
    const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k4, int64_t bcols, __m512i (&a)[R][2]) {
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < k4 / 4; ++kb) {
    const int8_t* p = pw + kb * bcols * 4;
    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
    for (int r = 0; r < R; ++r) {
      int32_t f;
      std::memcpy(&f, x + r * ldx + kb * 4, 4);
      const __m512i xb = _mm512_set1_epi32(f);
      a[r][0] = dpbusd(a[r][0], xb, w0);
      a[r][1] = dpbusd(a[r][1], xb, w1);
    }
  }
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void panel_vnni(const uint8_t* x, int64_t ldx, const int8_t* pw,
                                                                        int64_t k4, int64_t bcols, int32_t* out) {
  __m512i a[R][2];
  panel_vnni_sums<R>(x, ldx, pw, k4, bcols, a);
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_si512(out + r * 32, a[r][0]);
    _mm512_storeu_si512(out + r * 32 + 16, a[r][1]);
  }
}

// pack_block's AVX2 step: 8 weight rows, 8 k-quads at a time, transposed as an 8 x 8 matrix of 32-bit quads
// (unpacks by 32 and 64 bits, then 128-bit permutes: 24 shuffles for 256 bytes); the sums by vpmaddubsw with
// ones (|pair| <= 256: no saturation) and vpmaddwd. Returns the quads done (k / 4 rounded down to 8).
__attribute__((target("avx2"))) inline int64_t pack_cols8_avx2(const int8_t* w, int64_t k, int64_t bcols, int8_t* out,
                                                              int32_t* sums) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i sacc = _mm256_setzero_si256();
  int64_t kb = 0;
  for (; kb + 8 <= k / 4; kb += 8) {
    __m256i r[8], t[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * k + kb * 4));
    for (int j = 0; j < 8; j += 2) {
      t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
      t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int g = 0; g < 8; g += 4) {  // per 128-bit lane L: rows g..g+3 of quad 4L + e in r[g + e]
      r[g] = _mm256_unpacklo_epi64(t[g], t[g + 2]);
      r[g + 1] = _mm256_unpackhi_epi64(t[g], t[g + 2]);
      r[g + 2] = _mm256_unpacklo_epi64(t[g + 1], t[g + 3]);
      r[g + 3] = _mm256_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int e = 0; e < 4; ++e) {
      t[e] = _mm256_permute2x128_si256(r[e], r[4 + e], 0x20);
      t[4 + e] = _mm256_permute2x128_si256(r[e], r[4 + e], 0x31);
    }
    for (int j = 0; j < 8; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (kb + j) * bcols * 4), t[j]);
      sacc = _mm256_add_epi32(sacc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, t[j]), ones16));
    }
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums), sacc);
  return kb;
}

__attribute__((target("avx2"))) inline void row_sums_avx2(const int8_t* w, int64_t rows, int64_t k, int32_t* out) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t o = 0; o < rows; ++o) {
    const int8_t* r = w + o * k;
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {  // |pair sums| <= 256: no int16 saturation in maddubs
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
    }
    int32_t t = hsum_epi32(acc);
    for (; i < k; ++i) t += r[i];
    out[o] = t;
  }
}
#endif  // ET_INT8_X86
