// Shared by the CPU kernel files: includes, the runtime CPU dispatch macro, argument checks.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ET_X86 1
#endif

// Runtime CPU dispatch: the hot loops are compiled twice (target_clones: AVX2+FMA and the baseline), and
// the loader picks per CPU, so the binary never crashes on an older CPU.
#if defined(__x86_64__) && defined(__GNUC__)
#define ET_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define ET_CLONES
#endif

namespace edge_tune_cpu {

// Up to this many rows of x the direct (few-row) kernels run; above it the blocked GEMM paths (measured
// by tools/bench_kernels.py).
constexpr int64_t kDirectMaxRows = 16;

inline void check_x(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x's last dimension must be ", k);
}

// y2 (rows, n) back to x's leading dimensions.
inline at::Tensor finish(const at::Tensor& y2, const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = y2.size(1);
  return y2.view(sizes);
}

}  // namespace edge_tune_cpu
