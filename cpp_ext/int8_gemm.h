// The dynamic ops' GEMM over an int8 weight packed for the panels: the parallel split (split_panels,
// run_panels), a row strip through a block (block_rows) and the one epilogue, y = (acc - zp x wsum) x sx x
// sw + b. Shared by cpu_dynamic.cpp (int8 weights) and int4_fold.h (int4 weights that fold into int8), so
// both give the same bits for the same integers.
#pragma once

#include "row_quant.h"

namespace {

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
// A panel's epilogue (rows x 16 columns, acc[r * lda + c]) in AVX2: the same separately rounded operations as
// epilogue_run (no FMA in this target; the pragma keeps it so), so the bits match, in one call a panel
// instead of one a row. A missing scale multiplies by 1 (skipped: exact), a missing bias adds +0 as there.
__attribute__((target("avx2"))) void epilogue_panel_avx2(const int32_t* acc, int64_t lda, int rows, const int32_t* zp,
                                                         const float* sx, const int32_t* wsum, const float* sw,
                                                         const float* b, float* y, int64_t ldy) {
  for (int h = 0; h < 2; ++h) {
    const __m256i ws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + h * 8));
    const __m256 s = sw ? _mm256_loadu_ps(sw + h * 8) : _mm256_set1_ps(1.f);
    const __m256 bb = b ? _mm256_loadu_ps(b + h * 8) : _mm256_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * lda + h * 8));
      const __m256i d = _mm256_sub_epi32(a, _mm256_mullo_epi32(_mm256_set1_epi32(zp[r]), ws));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sx[r]));
      if (sw) v = _mm256_mul_ps(v, s);
      _mm256_storeu_ps(y + r * ldy + h * 8, _mm256_add_ps(v, bb));
    }
  }
}

// Where a VNNI panel's rows go: y[r, c] = epilogue_run's value for the panel's first `cols` columns.
struct PanelOut {
  const int32_t* zp;
  const float* sx;
  const int32_t* wsum;
  const float* sw;  // may be null: * 1 (skipped: exact)
  const float* b;   // may be null: + 0, as epilogue_run
  float* y;
  int64_t ldy;
  int64_t cols;
};

// panel_vnni (int8_panels_x86.h) with the epilogue applied to its sums in registers, 16 columns a
// vector, instead of storing them and running epilogue_panel_avx2 over them 8 at a time: the same
// separately rounded operations (no FMA: the pragma), so the same bits. At K = 384 the store, reload and
// 8-wide epilogue were ~15% of a panel's dot products.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void panel_vnni_out(const uint8_t* x, int64_t ldx,
                                                                            const int8_t* pw, int64_t k4,
                                                                            int64_t bcols, const PanelOut& o) {
  __m512i a[R][2];
  panel_vnni_sums<R>(x, ldx, pw, k4, bcols, a);
  for (int h = 0; h < 2; ++h) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, o.cols - 16 * h));
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
    if (!m) break;
    const __m512i ws = _mm512_maskz_loadu_epi32(m, o.wsum + 16 * h);
    const __m512 s = o.sw ? _mm512_maskz_loadu_ps(m, o.sw + 16 * h) : _mm512_set1_ps(1.f);
    const __m512 bb = o.b ? _mm512_maskz_loadu_ps(m, o.b + 16 * h) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512i d = _mm512_sub_epi32(a[r][h], _mm512_mullo_epi32(_mm512_set1_epi32(o.zp[r]), ws));
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(o.sx[r]));
      if (o.sw) v = _mm512_mul_ps(v, s);
      _mm512_mask_storeu_ps(o.y + r * o.ldy + 16 * h, m, _mm512_add_ps(v, bb));
    }
  }
}
using PanelOutFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const PanelOut&);
constexpr PanelOutFn kPanelVnniOut[kMaxPanelRows + 1] = {
    nullptr,           panel_vnni_out<1>, panel_vnni_out<2>, panel_vnni_out<3>, panel_vnni_out<4>,
    panel_vnni_out<5>, panel_vnni_out<6>, panel_vnni_out<7>, panel_vnni_out<8>};
#endif
#pragma GCC pop_options

// Rows r0..r0 + rows of y through one packed block (the panels' [k4/4][bcols][4] bytes of output columns
// c0.., up to n): the int8 panels, then the epilogue. wsum, sw (may be null) and b (may be null) start at
// the block's first column; rows of x that held a non-finite value come out NaN.
void block_rows(const RowQuant& q, int64_t r0, int rows, const int8_t* pb, int64_t bcols, int64_t c0, int64_t n,
                const int32_t* wsum, const float* sw, const float* b, float* yp) {
  const Int8Kernels& kern = picked();
  const int64_t k4 = q.ld, pc = kern.panel_cols;
  const uint8_t* xr = q.row(r0);
  for (int64_t t = 0; t < bcols / pc && c0 + t * pc < n; ++t) {
#ifdef ET_X86
    if (picked_isa() == Isa::vnni) {
      const int64_t cc = c0 + t * pc, cols = std::min<int64_t>(pc, n - cc), lc = t * pc;
      const PanelOut o{&q.zp[r0], &q.sx[r0], wsum + lc, sw ? sw + lc : nullptr, b ? b + lc : nullptr,
                       yp + r0 * n + cc, n, cols};
      kPanelVnniOut[rows](xr, k4, pb + t * pc * 4, k4, bcols, o);
      for (int r = 0; r < rows; ++r)
        if (q.bad[r0 + r]) std::fill_n(yp + (r0 + r) * n + cc, cols, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
#endif
    int32_t acc[kMaxPanelRows * 32];
    kern.panel[rows](xr, k4, pb + t * pc * 4, k4, bcols, acc);
    for (int64_t g = 0; g < pc && c0 + t * pc + g < n; g += 16) {
      const int64_t cc = c0 + t * pc + g, lc = t * pc + g, cols = std::min<int64_t>(16, n - cc);
      const int32_t* ag = acc + g;  // this 16-column group's sums: row r at ag[r * pc]
      const float* s = sw ? sw + lc : nullptr;
      const float* bb = b ? b + lc : nullptr;
#ifdef ET_X86
      if (x86_vector_cores() && cols == 16)
        epilogue_panel_avx2(ag, pc, rows, &q.zp[r0], &q.sx[r0], wsum + lc, s, bb, yp + r0 * n + cc, n);
      else
#endif
        for (int r = 0; r < rows; ++r)
          epilogue_run(ag + r * pc, cols, q.zp[r0 + r], q.sx[r0 + r], wsum + lc, s, bb, yp + (r0 + r) * n + cc);
      for (int r = 0; r < rows; ++r)
        if (q.bad[r0 + r]) std::fill(yp + (r0 + r) * n + cc, yp + (r0 + r) * n + cc + cols, std::numeric_limits<float>::quiet_NaN());
    }
  }
}

// The parallel split of panel_gemm. The weight is packed once a call (a block of `bcols` output columns
// after another) and the work cut into tasks of (row chunk, column block), row chunks outermost: a thread
// then takes whole chunks of x (a chunk's bytes stay in its L2 while every block passes over them) and
// reads the whole packed weight, instead of streaming all of x from L3 once per block (1536 -> 384 at 1024
// rows: 1.5 MB of x per 32-column block). Rows are split only where x outweighs the weight (m > n); a few
// rows split by blocks. Integer sums are exact in any order, so the split never changes a result.
constexpr int64_t kChunkBytes = 256 * 1024;  // x's bytes per row chunk: within the L2 of every target CPU
constexpr int64_t kMinTaskMacs = 1 << 20;    // a thread's least work (~10 us): fewer MACs run on one thread
constexpr int64_t kMinPassBytes = 1 << 17;   // the same for the byte passes (packing, weight sums)

struct PanelSplit {
  int64_t bcols, blocks, chunks, panels, grain;  // panels: x's rows in panel-row units (panel_rows rows each)
  // Chunk c's rows start here: the panels shared out evenly (chunk sizes differ by one panel at most), so a
  // thread's chunks hold as many rows as another's (1536 -> 384 at 1024 rows: 6 chunks of 176 rows and a last
  // of 144 left one of two threads 6% short).
  int64_t row_begin(int64_t c, int64_t m, int64_t pr) const { return std::min(m, c * panels / chunks * pr); }
};

PanelSplit split_panels(int64_t m, int64_t n, int64_t k4, const Int8Kernels& kern) {
  PanelSplit s{};
  s.bcols = block_cols(k4, kern.panel_cols);
  s.blocks = (n + s.bcols - 1) / s.bcols;
  const int64_t threads = at::get_num_threads();
  s.chunks = std::max<int64_t>(1, (m * k4 + kChunkBytes - 1) / kChunkBytes);
  if (m > n && threads > 1) s.chunks = (std::max(s.chunks, threads) + threads - 1) / threads * threads;
  const int64_t pr = kern.panel_rows;
  s.panels = (m + pr - 1) / pr;
  s.chunks = std::max<int64_t>(1, std::min(s.chunks, s.panels));
  s.grain = std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, s.panels * pr / s.chunks * s.bcols * k4));
  return s;
}

// A packed block as block_rows takes it: its bytes, and its columns' sums and scales (sw may be null).
struct PanelBlock {
  const int8_t* pw;
  const int32_t* wsum;
  const float* sw;
};

// y (m, n) = the epilogue over x's rows (q) @ a packed weight, block by block: the tasks of split_panels, each
// a row chunk against a block through block_rows. block(blk, scratch) gives the block (pw null: stop, the
// caller's weight could not be had); scratch is a Scratch per thread's run of tasks, for a block made on the
// fly (int4_fold.h's unfolded ones).
template <class Scratch, class BlockFn>
void run_panels(const RowQuant& q, int64_t m, int64_t n, const PanelSplit& sp, const float* bias, float* yp,
                BlockFn&& block) {
  const int64_t bcols = sp.bcols, pr = picked().panel_rows;
  at::parallel_for(0, sp.chunks * sp.blocks, sp.grain, [&](int64_t lo, int64_t hi) {
    Scratch scratch;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t blk = task % sp.blocks, c0 = blk * bcols;
      const PanelBlock b = block(blk, scratch);
      if (b.pw == nullptr) return;
      const int64_t chunk = task / sp.blocks, row_end = sp.row_begin(chunk + 1, m, pr);
      for (int64_t r0 = sp.row_begin(chunk, m, pr); r0 < row_end; r0 += pr)
        block_rows(q, r0, static_cast<int>(std::min<int64_t>(pr, row_end - r0)), b.pw, bcols, c0, n, b.wsum, b.sw,
                   bias ? bias + c0 : nullptr, yp);
    }
  });
}

}  // namespace
