// The integer cores of the dynamic int8 ops: u8 x s8 -> int32 dot products for a few rows (tiles, straight
// off the row-major weight) and for many rows (panels, off a packed weight block), the weight's row sums,
// and the choice among them per CPU at run time. Plain C++ with no torch, so that
// tests/int8_panels_check.cpp can run every ISA's version against a triple loop: natively, and for ARM
// under qemu-aarch64 (cross-compiled). cpu_dynamic.cpp builds the ops on them.
//
// Activations are 7-bit unsigned (0..127; see cpu_dynamic.cpp), so a u8 x s8 product fits int16 and two of
// them summed still do (|sum| <= 2 * 127 * 128 = 32512): x86's vpmaddubsw never saturates, and on ARM the
// bytes may be read as signed (sdot is s8 x s8).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ET_INT8_X86 1
#endif
#if defined(__aarch64__) && defined(__GNUC__)
#include <arm_neon.h>
#include <asm/hwcap.h>
#include <sys/auxv.h>
#define ET_INT8_ARM 1
// GCC declares the sdot intrinsics under this target, not under "+dotprod" alone.
#define ET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

namespace edge_tune_int8 {

// ---- the packed weight layout of the panels ----
// The weight is repacked per block of output columns into [k/4][col][4], so that 4 consecutive k of
// several columns lie together: one vector load holds 4 k of 8 (AVX2), 16 (AVX-512) or 4 (NEON) columns,
// and one broadcast 4-byte group of a row of x multiplies them all. A block is as wide as keeps its packed
// bytes (block columns x k) within ~24 KB, so that it stays in L1 while every row tile of x passes over it:
// 64 columns at k = 384, 16 at k = 1536.
constexpr int64_t kL1Block = 24 * 1024;

// `unit`: the panel width of the ISA (Int8Kernels::panel_cols), which a block's width is a multiple of.
inline int64_t block_cols(int64_t k4, int64_t unit = 16) {
  return std::max<int64_t>(unit, std::min<int64_t>(64, kL1Block / (unit * k4) * unit));
}

#ifdef ET_INT8_X86
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline int64_t pack_cols16_vnni(const int8_t* w, int64_t k,
                                                                                        int64_t bcols, int8_t* out,
                                                                                        int32_t* sums);
__attribute__((target("avx2"))) inline int64_t pack_cols8_avx2(const int8_t* w, int64_t k, int64_t bcols, int8_t* out,
                                                              int32_t* sums);
#endif

// The widest vectors pack_block may use: the picked ISA's, so that a forced AVX2 run uses AVX2 alone.
enum class PackWidth { sse2, avx2, avx512 };

// Columns c0.. of a row-major (n, k) weight; k4 = k rounded up to 4, the padding zero. sums[c] = the sum of
// column c0 + c's k weights (the zero-point correction), taken on the way: a second pass over the weight cost
// as much as the packing at a short sentence's few rows. 16 columns at a time in AVX-512, 8 in AVX2, then 4.
inline void pack_block(const int8_t* w, int64_t n, int64_t k, int64_t c0, int64_t k4, int64_t bcols, int8_t* out,
                       int32_t* sums, PackWidth width = PackWidth::sse2) {
  const int64_t cols = std::min(bcols, n - c0);
  // zero only what the copies leave: every column past n (the last block), else the bytes past k
  if (cols < bcols)
    std::fill(out, out + k4 * bcols, 0);
  else if (k4 > k)
    std::fill(out + k / 4 * bcols * 4, out + k4 * bcols, 0);
  int64_t c = 0;
#ifdef ET_INT8_X86
  // 4 columns x 4 k-quads at a time: a 4 x 4 transpose of 32-bit quads in SSE2 (x86-64's baseline). Quad by
  // quad, the copy took ~1 ns a quad: 150 us for a 1536 x 384 weight, more than a short sentence's GEMM.
  // The sums: psadbw adds a row's 16 bytes offset by 128 (w ^ 0x80 read unsigned) into two 64-bit lanes.
  const int wide = width == PackWidth::avx512 ? 16 : width == PackWidth::avx2 ? 8 : 0;
  for (; wide && c + wide <= cols; c += wide) {
    const int8_t* wr = w + (c0 + c) * k;
    const int64_t kb = wide == 16 ? pack_cols16_vnni(wr, k, bcols, out + c * 4, sums + c)
                                  : pack_cols8_avx2(wr, k, bcols, out + c * 4, sums + c);  // quads [0, kb)
    for (int j = 0; j < wide; ++j) {
      for (int64_t kq = kb; kq < k / 4; ++kq) std::memcpy(out + (kq * bcols + c + j) * 4, wr + j * k + kq * 4, 4);
      for (int64_t i = kb * 4; i < k; ++i) sums[c + j] += wr[j * k + i];
    }
  }
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80)), zero = _mm_setzero_si128();
  for (; c + 4 <= cols; c += 4) {
    const int8_t* wr = w + (c0 + c) * k;
    __m128i s[4] = {zero, zero, zero, zero};
    int64_t kb = 0;
    for (; kb + 4 <= k / 4; kb += 4) {
      __m128i r[4];
      for (int j = 0; j < 4; ++j) {
        r[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + j * k + kb * 4));
        s[j] = _mm_add_epi64(s[j], _mm_sad_epu8(_mm_xor_si128(r[j], flip), zero));
      }
      const __m128 r0 = _mm_castsi128_ps(r[0]), r1 = _mm_castsi128_ps(r[1]);
      const __m128 r2 = _mm_castsi128_ps(r[2]), r3 = _mm_castsi128_ps(r[3]);
      const __m128 t0 = _mm_unpacklo_ps(r0, r1), t1 = _mm_unpacklo_ps(r2, r3);
      const __m128 t2 = _mm_unpackhi_ps(r0, r1), t3 = _mm_unpackhi_ps(r2, r3);
      const __m128 q[4] = {_mm_movelh_ps(t0, t1), _mm_movehl_ps(t1, t0), _mm_movelh_ps(t2, t3), _mm_movehl_ps(t3, t2)};
      for (int j = 0; j < 4; ++j)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + ((kb + j) * bcols + c) * 4), _mm_castps_si128(q[j]));
    }
    for (int64_t cc = c; cc < c + 4; ++cc)
      for (int64_t kq = kb; kq < k / 4; ++kq) std::memcpy(out + (kq * bcols + cc) * 4, w + (c0 + cc) * k + kq * 4, 4);
    for (int j = 0; j < 4; ++j) {
      int64_t t = _mm_cvtsi128_si64(s[j]) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(s[j], s[j])) - 128 * 4 * kb;
      for (int64_t i = kb * 4; i < k; ++i) t += wr[j * k + i];
      sums[c + j] = static_cast<int32_t>(t);
    }
  }
#endif
  for (; c < cols; ++c) {
    const int8_t* wr = w + (c0 + c) * k;
    for (int64_t kb = 0; kb < k / 4; ++kb) std::memcpy(out + (kb * bcols + c) * 4, wr + kb * 4, 4);
    int32_t t = 0;
    for (int64_t i = 0; i < k; ++i) t += wr[i];
    sums[c] = t;
  }
  for (c = 0; c < cols; ++c)
    for (int64_t i = k / 4 * 4; i < k; ++i) out[((i / 4) * bcols + c) * 4 + (i % 4)] = w[(c0 + c) * k + i];
}

// The same layout from the transpose of a row-major (red, ld) weight: output column c0 + c reads down column
// c0 + c of w (the input gradient reduces over the forward's output dimension).
inline void pack_block_t(const int8_t* w, int64_t red, int64_t ld, int64_t c0, int64_t k4, int64_t bcols,
                         int8_t* out) {
  std::fill(out, out + k4 * bcols, 0);
  const int64_t cols = std::min(bcols, ld - c0);
  int64_t i = 0;
#ifdef ET_INT8_X86
  // 4 rows x 16 columns at a time, interleaved by SSE2 unpacks (x86-64's baseline) into 16 groups of 4 bytes:
  // the byte-by-byte scatter below took ~1 ns a weight byte, a third of the input gradient's extra time.
  for (; i + 4 <= red; i += 4) {
    int8_t* o = out + (i / 4) * bcols * 4;
    for (int64_t c = 0; c + 16 <= cols; c += 16) {
      const int8_t* wr = w + i * ld + c0 + c;
      const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr));
      const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + ld));
      const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 2 * ld));
      const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 3 * ld));
      const __m128i lo01 = _mm_unpacklo_epi8(r0, r1), hi01 = _mm_unpackhi_epi8(r0, r1);
      const __m128i lo23 = _mm_unpacklo_epi8(r2, r3), hi23 = _mm_unpackhi_epi8(r2, r3);
      __m128i* d = reinterpret_cast<__m128i*>(o + c * 4);
      _mm_storeu_si128(d, _mm_unpacklo_epi16(lo01, lo23));
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(lo01, lo23));
      _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(hi01, hi23));
      _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(hi01, hi23));
    }
    for (int64_t r = i; r < i + 4; ++r)
      for (int64_t c = cols / 16 * 16; c < cols; ++c) o[c * 4 + (r % 4)] = w[r * ld + c0 + c];
  }
#endif
  for (; i < red; ++i) {
    const int8_t* wr = w + i * ld + c0;
    int8_t* o = out + (i / 4) * bcols * 4 + (i % 4);
    for (int64_t c = 0; c < cols; ++c) o[c * 4] = wr[c];
  }
}

// A tile: R rows of x (row stride ldx) against `ncols` (1 or 2) weight rows (stride ldw), along k;
// out[r * 2 + c] = sum_k x[r, k] * w[c, k].
using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int, int32_t*);
// A panel: R rows of x (k4 bytes each, stride ldx) against P packed columns of a block `bcols` wide, P the
// ISA's panel_cols (16, or 32 for VNNI); out[r * P + c] = sum_k x[r, k] * w[c, k].
using PanelFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*);
// Row sums of `rows` weight rows of length k (the zero-point correction of the epilogue).
using RowSumFn = void (*)(const int8_t*, int64_t, int64_t, int32_t*);

template <int R>
void tile_scalar(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int ncols, int32_t* out) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < ncols; ++c) {
      int32_t acc = 0;
      for (int64_t i = 0; i < k; ++i) acc += static_cast<int32_t>(x[r * ldx + i]) * w[c * ldw + i];
      out[r * 2 + c] = acc;
    }
}

// The vector tiles sum whole vectors of k; the remaining k from i on are added here, column by column.
template <int R>
void tile_tail(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t i, int64_t k, int32_t* out) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c)
      for (int64_t j = i; j < k; ++j) out[r * 2 + c] += static_cast<int32_t>(x[r * ldx + j]) * w[c * ldw + j];
}

template <int R>
void panel_scalar(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k4, int64_t bcols, int32_t* out) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 16; ++c) {
      int32_t acc = 0;
      for (int64_t i = 0; i < k4; ++i)
        acc += static_cast<int32_t>(x[r * ldx + i]) * pw[((i / 4) * bcols + c) * 4 + i % 4];
      out[r * 16 + c] = acc;
    }
}

inline void row_sums_scalar(const int8_t* w, int64_t rows, int64_t k, int32_t* out) {
  for (int64_t o = 0; o < rows; ++o) {
    int32_t t = 0;
    for (int64_t i = 0; i < k; ++i) t += w[o * k + i];
    out[o] = t;
  }
}

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
// columns' partial sums in one register, so no horizontal sums. Shared by panel_avx2 and the int4 group
// panel (cpu_int4_dynamic.cpp), which run their own loops over kb.
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
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void panel_vnni(const uint8_t* x, int64_t ldx, const int8_t* pw,
                                                                        int64_t k4, int64_t bcols, int32_t* out) {
  __m512i a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < k4 / 4; ++kb) {
    const int8_t* p = pw + kb * bcols * 4;
    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
    for (int r = 0; r < R; ++r) {
      int32_t f;
      std::memcpy(&f, x + r * ldx + kb * 4, 4);
      const __m512i xb = _mm512_set1_epi32(f);
      a0[r] = dpbusd(a0[r], xb, w0);
      a1[r] = dpbusd(a1[r], xb, w1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_si512(out + r * 32, a0[r]);
    _mm512_storeu_si512(out + r * 32 + 16, a1[r]);
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

#ifdef ET_INT8_ARM
// ARMv8.0 NEON (Cortex-A53/A72: Raspberry Pi Zero 2, 3, 4): smull/smlal pair two byte products in int16,
// sadalp widens and adds neighbouring pairs into int32 lanes; a horizontal add at the end.
template <int R>
void tile_neon(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int ncols, int32_t* out) {
  if (ncols < 2) return tile_scalar<R>(x, ldx, w, ldw, k, ncols, out);
  int32x4_t acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vdupq_n_s32(0);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const int8x16_t w0 = vld1q_s8(w + i), w1 = vld1q_s8(w + ldw + i);
    for (int r = 0; r < R; ++r) {
      const int8x16_t xr = vreinterpretq_s8_u8(vld1q_u8(x + r * ldx + i));
      acc[r][0] = vpadalq_s16(acc[r][0], vmlal_high_s8(vmull_s8(vget_low_s8(xr), vget_low_s8(w0)), xr, w0));
      acc[r][1] = vpadalq_s16(acc[r][1], vmlal_high_s8(vmull_s8(vget_low_s8(xr), vget_low_s8(w1)), xr, w1));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) out[r * 2 + c] = vaddvq_s32(acc[r][c]);
  tile_tail<R>(x, ldx, w, ldw, i, k, out);
}

// One 16-byte load holds 4 k of 4 columns. A row's 4 bytes, doubled to 8, multiply two columns' 4 k at a
// time (smull); two k-quads share one int16 sum before sadalp. Each int32 lane then holds half a column's
// sum (lanes: c k01, c k23, c+1 k01, c+1 k23), and addp folds them at the end. 16 columns take 32
// accumulators for 4 rows, more than the 32 registers hold with the weights, so the panel runs as two
// halves of 8 columns.
template <int R>
void panel_neon(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k4, int64_t bcols, int32_t* out) {
  const int64_t quads = k4 / 4, stride = bcols * 4;
  for (int half = 0; half < 2; ++half) {
    const int8_t* ph = pw + half * 32;
    int32x4_t acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_s32(0);
    int64_t kb = 0;
    for (; kb + 2 <= quads; kb += 2) {
      const int8x16_t a0 = vld1q_s8(ph + kb * stride), a1 = vld1q_s8(ph + kb * stride + 16);
      const int8x16_t b0 = vld1q_s8(ph + (kb + 1) * stride), b1 = vld1q_s8(ph + (kb + 1) * stride + 16);
      for (int r = 0; r < R; ++r) {
        int32_t f0, f1;
        std::memcpy(&f0, x + r * ldx + kb * 4, 4);
        std::memcpy(&f1, x + r * ldx + kb * 4 + 4, 4);
        const int8x8_t x0 = vreinterpret_s8_s32(vdup_n_s32(f0)), x1 = vreinterpret_s8_s32(vdup_n_s32(f1));
        acc[r][0] = vpadalq_s16(acc[r][0], vmlal_s8(vmull_s8(vget_low_s8(a0), x0), vget_low_s8(b0), x1));
        acc[r][1] = vpadalq_s16(acc[r][1], vmlal_s8(vmull_s8(vget_high_s8(a0), x0), vget_high_s8(b0), x1));
        acc[r][2] = vpadalq_s16(acc[r][2], vmlal_s8(vmull_s8(vget_low_s8(a1), x0), vget_low_s8(b1), x1));
        acc[r][3] = vpadalq_s16(acc[r][3], vmlal_s8(vmull_s8(vget_high_s8(a1), x0), vget_high_s8(b1), x1));
      }
    }
    if (kb < quads) {
      const int8x16_t a0 = vld1q_s8(ph + kb * stride), a1 = vld1q_s8(ph + kb * stride + 16);
      for (int r = 0; r < R; ++r) {
        int32_t f0;
        std::memcpy(&f0, x + r * ldx + kb * 4, 4);
        const int8x8_t x0 = vreinterpret_s8_s32(vdup_n_s32(f0));
        acc[r][0] = vpadalq_s16(acc[r][0], vmull_s8(vget_low_s8(a0), x0));
        acc[r][1] = vpadalq_s16(acc[r][1], vmull_s8(vget_high_s8(a0), x0));
        acc[r][2] = vpadalq_s16(acc[r][2], vmull_s8(vget_low_s8(a1), x0));
        acc[r][3] = vpadalq_s16(acc[r][3], vmull_s8(vget_high_s8(a1), x0));
      }
    }
    for (int r = 0; r < R; ++r) {
      vst1q_s32(out + r * 16 + half * 8, vpaddq_s32(acc[r][0], acc[r][1]));
      vst1q_s32(out + r * 16 + half * 8 + 4, vpaddq_s32(acc[r][2], acc[r][3]));
    }
  }
}

// ARMv8.2 dot product (Cortex-A55/A76 and later: Raspberry Pi 5, Jetson Orin, recent phones): sdot adds
// 4 byte products into each int32 lane, so one instruction per 4 columns and k-quad, no widening steps.
template <int R>
ET_DOTPROD void tile_dotprod(const uint8_t* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k, int ncols,
                             int32_t* out) {
  if (ncols < 2) return tile_scalar<R>(x, ldx, w, ldw, k, ncols, out);
  int32x4_t acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vdupq_n_s32(0);
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const int8x16_t w0 = vld1q_s8(w + i), w1 = vld1q_s8(w + ldw + i);
    for (int r = 0; r < R; ++r) {
      const int8x16_t xr = vreinterpretq_s8_u8(vld1q_u8(x + r * ldx + i));
      acc[r][0] = vdotq_s32(acc[r][0], xr, w0);
      acc[r][1] = vdotq_s32(acc[r][1], xr, w1);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) out[r * 2 + c] = vaddvq_s32(acc[r][c]);
  tile_tail<R>(x, ldx, w, ldw, i, k, out);
}

// One k-quad Q of the 4 held in xv: the 16 columns' 4 registers against lane Q (4 bytes) of each row.
template <int R, int Q>
ET_DOTPROD inline void dot_quad(int32x4_t (&acc)[R][4], const int8_t* p, const int8x16_t (&xv)[R]) {
  const int8x16_t w0 = vld1q_s8(p), w1 = vld1q_s8(p + 16), w2 = vld1q_s8(p + 32), w3 = vld1q_s8(p + 48);
  for (int r = 0; r < R; ++r) {
    acc[r][0] = vdotq_laneq_s32(acc[r][0], w0, xv[r], Q);
    acc[r][1] = vdotq_laneq_s32(acc[r][1], w1, xv[r], Q);
    acc[r][2] = vdotq_laneq_s32(acc[r][2], w2, xv[r], Q);
    acc[r][3] = vdotq_laneq_s32(acc[r][3], w3, xv[r], Q);
  }
}

// 16 accumulators for 4 rows x 16 columns; a row's 16 bytes of x (4 k-quads) are loaded once and each quad
// taken by lane.
template <int R>
ET_DOTPROD void panel_dotprod(const uint8_t* x, int64_t ldx, const int8_t* pw, int64_t k4, int64_t bcols,
                              int32_t* out) {
  const int64_t quads = k4 / 4, stride = bcols * 4;
  int32x4_t acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_s32(0);
  int64_t kb = 0;
  for (; kb + 4 <= quads; kb += 4) {
    int8x16_t xv[R];
    for (int r = 0; r < R; ++r) xv[r] = vreinterpretq_s8_u8(vld1q_u8(x + r * ldx + kb * 4));
    dot_quad<R, 0>(acc, pw + kb * stride, xv);
    dot_quad<R, 1>(acc, pw + (kb + 1) * stride, xv);
    dot_quad<R, 2>(acc, pw + (kb + 2) * stride, xv);
    dot_quad<R, 3>(acc, pw + (kb + 3) * stride, xv);
  }
  for (; kb < quads; ++kb) {
    int8x16_t xv[R];
    for (int r = 0; r < R; ++r) {
      int32_t f0;
      std::memcpy(&f0, x + r * ldx + kb * 4, 4);
      xv[r] = vreinterpretq_s8_s32(vdupq_n_s32(f0));
    }
    dot_quad<R, 0>(acc, pw + kb * stride, xv);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) vst1q_s32(out + r * 16 + 4 * j, acc[r][j]);
}

inline void row_sums_neon(const int8_t* w, int64_t rows, int64_t k, int32_t* out) {
  for (int64_t o = 0; o < rows; ++o) {
    const int8_t* r = w + o * k;
    int32x4_t acc = vdupq_n_s32(0);
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) acc = vpadalq_s16(acc, vpaddlq_s8(vld1q_s8(r + i)));
    int32_t t = vaddvq_s32(acc);
    for (; i < k; ++i) t += r[i];
    out[o] = t;
  }
}
#endif  // ET_INT8_ARM

// ---- the choice per CPU ----
enum class Isa { scalar, avx2, vnni, neon, dotprod };
constexpr Isa kAllIsas[] = {Isa::scalar, Isa::avx2, Isa::vnni, Isa::neon, Isa::dotprod};

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::vnni: return "avx512-vnni";
    case Isa::neon: return "neon";
    case Isa::dotprod: return "neon-dotprod";
    default: return "scalar";
  }
}

inline bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::scalar: return true;
#ifdef ET_INT8_X86
    case Isa::avx2: return __builtin_cpu_supports("avx2");
    case Isa::vnni: return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#endif
#ifdef ET_INT8_ARM
    case Isa::neon: return true;  // Advanced SIMD is part of every AArch64 CPU
    case Isa::dotprod: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
    default: return false;
  }
}

// The fastest ISA this CPU has, unless EDGE_TUNE_INT8_ISA names another one it has (to compare paths on
// one machine, and to test each).
inline Isa best_isa() {
  if (const char* want = std::getenv("EDGE_TUNE_INT8_ISA"))
    for (Isa isa : kAllIsas)
      if (std::strcmp(want, isa_name(isa)) == 0 && isa_supported(isa)) return isa;
  for (Isa isa : {Isa::vnni, Isa::dotprod, Isa::avx2, Isa::neon})
    if (isa_supported(isa)) return isa;
  return Isa::scalar;
}

constexpr int kMaxPanelRows = 8;

// panel[R] handles R = 1..panel_rows rows of x against panel_cols columns; tile[R] R = 1..4 rows.
struct Int8Kernels {
  PanelFn panel[kMaxPanelRows + 1];
  TileFn tile[5];
  RowSumFn row_sums;
  int panel_rows;
  int panel_cols;
};

// One ISA's table: its panels of up to 4 rows x 16 columns, tiles for 1..4 rows, and its row sums.
#define ET_INT8_TABLE(panel, tile, row_sums)                                                                  \
  Int8Kernels {                                                                                               \
    {nullptr, panel<1>, panel<2>, panel<3>, panel<4>}, {nullptr, tile<1>, tile<2>, tile<3>, tile<4>}, row_sums, \
        4, 16                                                                                                 \
  }

inline Int8Kernels int8_kernels(Isa isa) {
  switch (isa) {
#ifdef ET_INT8_X86
    case Isa::vnni:  // 8 x 32 panels; the AVX2 tiles measured faster for a few rows
      return Int8Kernels{{nullptr, panel_vnni<1>, panel_vnni<2>, panel_vnni<3>, panel_vnni<4>, panel_vnni<5>,
                          panel_vnni<6>, panel_vnni<7>, panel_vnni<8>},
                         {nullptr, tile_avx2<1>, tile_avx2<2>, tile_avx2<3>, tile_avx2<4>},
                         row_sums_avx2,
                         8,
                         32};
    case Isa::avx2: return ET_INT8_TABLE(panel_avx2, tile_avx2, row_sums_avx2);
#endif
#ifdef ET_INT8_ARM
    case Isa::dotprod: return ET_INT8_TABLE(panel_dotprod, tile_dotprod, row_sums_neon);
    case Isa::neon: return ET_INT8_TABLE(panel_neon, tile_neon, row_sums_neon);
#endif
    default: return ET_INT8_TABLE(panel_scalar, tile_scalar, row_sums_scalar);
  }
}
#undef ET_INT8_TABLE

}  // namespace edge_tune_int8
