// The integer cores of the dynamic int8 ops: u8 x s8 -> int32 dot products for a few rows (tiles, straight
// off the row-major weight) and for many rows (panels, off a packed weight block), the weight's row sums,
// and the choice among them per CPU at run time (the x86 and ARM cores in int8_panels_x86.h and
// int8_panels_arm.h). Plain C++ with no torch, so that
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
  // 4 columns x 4 k-quads at a time: a 4 x 4 transpose of 32-bit quads in SSE2 (x86-64's baseline). Quad by
  // quad, the copy took ~1 ns a quad: 150 us for a 1536 x 384 weight, more than a short sentence's GEMM.
  // The sums: psadbw adds a row's 16 bytes offset by 128 (w ^ 0x80 read unsigned) into two 64-bit lanes.
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

// each ISA family's cores, inside this namespace and after the scalar ones they fall back on
#include "int8_panels_x86.h"
#include "int8_panels_arm.h"

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
