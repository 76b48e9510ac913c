// Every integer core of cpp_ext/int8_panels.h that this CPU supports, against a plain triple loop: tiles
// (1-4 rows x 1-2 columns), panels (1 to the ISA's rows x its 16 or 32 packed columns, both packings), row sums; k and n odd,
// short, and MiniLM's; random bytes and the extremes (x = 127 against w = -128 and 127).
// Prints "best <isa>", then per ISA "<isa> <cases> cases <wrong> wrong" or "<isa> unsupported"; exit 1 on
// any wrong value. Built and run by tests/test_int8_panels.py, natively and under qemu-aarch64.
#include <cstdio>
#include <vector>

#include "../cpp_ext/int8_panels.h"

using namespace edge_tune_int8;

namespace {
uint32_t seed = 12345;
uint32_t next_u32() {
  seed = seed * 1664525u + 1013904223u;
  return seed >> 8;
}

struct Count {
  long cases = 0, wrong = 0;
  void check(int64_t got, int64_t want) {
    ++cases;
    if (got != want) ++wrong;
  }
};

void check_shape(Isa isa, const Int8Kernels& kern, int64_t k, int64_t n, int fill, Count& count) {
  const int64_t k4 = (k + 3) / 4 * 4, rows = kMaxPanelRows;
  std::vector<uint8_t> x(rows * k4, 0);  // padded to k4 with zeros, as panel_gemm does
  std::vector<int8_t> w(n * k), wt(k * n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) x[r * k4 + i] = fill ? 127 : next_u32() % 128;
  for (int64_t c = 0; c < n; ++c)
    for (int64_t i = 0; i < k; ++i) {
      const int8_t v = fill == 1 ? -128 : fill == 2 ? 127 : static_cast<int8_t>(next_u32() % 256 - 128);
      w[c * k + i] = v;
      wt[i * n + c] = v;
    }
  std::vector<int64_t> ref(rows * n, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c)
      for (int64_t i = 0; i < k; ++i) ref[r * n + c] += static_cast<int64_t>(x[r * k4 + i]) * w[c * k + i];

  int32_t out[kMaxPanelRows * 32];
  const int64_t pc = kern.panel_cols;
  for (int R = 1; R <= kern.panel_rows; ++R) {
    for (int64_t c0 = 0; R <= 4 && c0 < n; c0 += 2) {
      const int ncols = static_cast<int>(std::min<int64_t>(2, n - c0));
      kern.tile[R](x.data(), k4, w.data() + c0 * k, k, k, ncols, out);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < ncols; ++c) count.check(out[r * 2 + c], ref[r * n + c0 + c]);
    }
    const int64_t bcols = block_cols(k4, pc);
    std::vector<int8_t> pw(k4 * bcols), pwt(k4 * bcols);
    std::vector<int32_t> psum(bcols);
    for (int64_t c0 = 0; c0 < n; c0 += bcols) {
      pack_block_t(wt.data(), k, n, c0, k4, bcols, pwt.data());
      // SSE2 4 x 4 transposes; AVX2 8 x 8 and AVX-512 16 x 16 where the ISA runs
      for (PackWidth width : {PackWidth::sse2, isa == Isa::scalar ? PackWidth::sse2 : PackWidth::avx2,
                              isa == Isa::vnni ? PackWidth::avx512 : PackWidth::sse2}) {
        pack_block(w.data(), n, k, c0, k4, bcols, pw.data(), psum.data(), width);
        count.check(pw == pwt, 1);
        for (int64_t c = 0; c < std::min<int64_t>(bcols, n - c0); ++c) {
          int64_t want = 0;
          for (int64_t i = 0; i < k; ++i) want += w[(c0 + c) * k + i];
          count.check(psum[c], want);
        }
      }
      for (int64_t t = 0; t < bcols / pc && c0 + t * pc < n; ++t) {
        kern.panel[R](x.data(), k4, pw.data() + t * pc * 4, k4, bcols, out);
        for (int r = 0; r < R; ++r)
          for (int64_t c = 0; c < std::min<int64_t>(pc, n - c0 - t * pc); ++c)
            count.check(out[r * pc + c], ref[r * n + c0 + t * pc + c]);
      }
    }
  }
  std::vector<int32_t> sums(n);
  kern.row_sums(w.data(), n, k, sums.data());
  for (int64_t c = 0; c < n; ++c) {
    int64_t want = 0;
    for (int64_t i = 0; i < k; ++i) want += w[c * k + i];
    count.check(sums[c], want);
  }
}
}  // namespace

int main() {
  std::printf("best %s\n", isa_name(best_isa()));
  long all_wrong = 0;
  for (Isa isa : kAllIsas) {
    if (!isa_supported(isa)) {
      std::printf("%s unsupported\n", isa_name(isa));
      continue;
    }
    const Int8Kernels kern = int8_kernels(isa);
    Count count;
    for (int64_t k : {1, 3, 4, 15, 16, 17, 31, 33, 64, 70, 384, 1536})
      for (int64_t n : {1, 2, 3, 16, 17, 40, 96})
        for (int fill = 0; fill < 3; ++fill) check_shape(isa, kern, k, n, fill, count);
    std::printf("%s %ld cases %ld wrong\n", isa_name(isa), count.cases, count.wrong);
    all_wrong += count.wrong;
  }
  return all_wrong ? 1 : 0;
}
