// The backward of LoRA's rank-r term, s * (x A^T) B^T, in one pass over the activation and gradient rows.
//
// As GEMMs it is five skinny products (M x 384 by 384 x 8, and so on), each reading a whole activation or
// gradient for r columns of work; BLAS ran them at ~20 GMAC/s here (~160 us each at M = 1024, ~10 ms of a
// LoRA step). Row by row, a row of x and of the gradient stay in L1 while every product that needs them
// runs, and A, B and the per-block partial gradients (r x 384 floats each) stay in L1/L2.
//
// dA and dB are sums over rows: each block of kRowBlock rows writes its own partial, and the partials are
// added in block order, so the result does not depend on the thread count.

#include "cpu_common.h"
#include "vec8.h"

namespace {
using namespace edge_tune_cpu;
using namespace edge_tune_vec;

constexpr int64_t kMaxRank = 64;    // above it the GEMM composition runs (ranks here are 4-16)
constexpr int64_t kRowBlock = 64;   // rows per partial of dA and dB


// out[t] = sum_i a[t * k + i] * v[i] for t < JN: JN independent accumulators, so the FMAs do not wait on
// each other (one accumulator per dot ran at a quarter of the FMA rate, bound by its latency).
template <int JN>
ET_CLONES void dots_block(const float* a, const float* v, int64_t k, float* out) {
  v8f acc[JN] = {};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    v8f xv;
    std::memcpy(&xv, v + i, sizeof(xv));
    for (int t = 0; t < JN; ++t) {
      v8f av;
      std::memcpy(&av, a + t * k + i, sizeof(av));
      acc[t] += av * xv;
    }
  }
  for (int t = 0; t < JN; ++t) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += acc[t][l];
    for (int64_t ii = i; ii < k; ++ii) s += a[t * k + ii] * v[ii];
    out[t] = s;
  }
}

// acc[j] = sum_i a[j * k + i] * v[i] for j < r, eight rows of a at a time
void dots(const float* a, const float* v, int64_t r, int64_t k, float* acc) {
  int64_t j = 0;
  for (; j + 8 <= r; j += 8) dots_block<8>(a + j * k, v, k, acc + j);
  switch (r - j) {
    case 7: return dots_block<7>(a + j * k, v, k, acc + j);
    case 6: return dots_block<6>(a + j * k, v, k, acc + j);
    case 5: return dots_block<5>(a + j * k, v, k, acc + j);
    case 4: return dots_block<4>(a + j * k, v, k, acc + j);
    case 3: return dots_block<3>(a + j * k, v, k, acc + j);
    case 2: return dots_block<2>(a + j * k, v, k, acc + j);
    case 1: return dots_block<1>(a + j * k, v, k, acc + j);
    default: return;
  }
}

// out[i] += sum_j c[j] * a[j * k + i]
ET_CLONES void combine(const float* a, const float* c, int64_t r, int64_t k, float* out) {
  for (int64_t j = 0; j < r; ++j) {
    const float* aj = a + j * k;
    const float cj = c[j];
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) out[i] += cj * aj[i];
  }
}

// d[j * k + i] += c[j] * v[i]: a rank-1 update of an (r, k) partial
ET_CLONES void outer_add(const float* c, const float* v, int64_t r, int64_t k, float* d) {
  for (int64_t j = 0; j < r; ++j) {
    float* dj = d + j * k;
    const float cj = c[j];
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) dj[i] += cj * v[i];
  }
}

bool fits(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B) {
  return A.size(0) <= kMaxRank && x2.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat &&
         B.scalar_type() == at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& A_in, const at::Tensor& B_in,
                                                        double lora_scale, const c10::optional<at::Tensor>& grad_x) {
  const int64_t r = A_in.size(0), k = A_in.size(1), n = B_in.size(0);
  TORCH_CHECK(B_in.size(1) == r && x.size(-1) == k && grad.size(-1) == n,
              "lora_linear_backward: A must be (r, in), B (out, r), x (..., in) and grad (..., out)");
  const at::Tensor x2 = x.reshape({-1, k}).contiguous(), g2 = grad.reshape({-1, n}).contiguous();
  const int64_t m = x2.size(0);
  TORCH_CHECK(g2.size(0) == m, "lora_linear_backward: x and grad must have the same rows");
  if (grad_x) {
    TORCH_CHECK(grad_x->is_contiguous() && grad_x->numel() == m * k && grad_x->scalar_type() == at::kFloat,
                "lora_linear_backward: grad_x must be a contiguous float32 (..., in) tensor");
  }
  const float s = static_cast<float>(lora_scale);
  if (!fits(x2, A_in, B_in)) {  // the GEMM composition (the reference's)
    const at::Tensor gb = at::mm(g2, B_in);
    if (grad_x) grad_x->view({m, k}).add_(at::mm(gb, A_in), s);
    return {at::mm(gb.t(), x2).mul_(s), at::mm(g2.t(), at::mm(x2, A_in.t())).mul_(s)};
  }
  const at::Tensor A = A_in.contiguous(), Bt = B_in.t().contiguous();  // (r, k), (r, n)
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  at::Tensor part_a = at::zeros({std::max<int64_t>(blocks, 1), r, k}, x2.options());
  at::Tensor part_b = at::zeros({std::max<int64_t>(blocks, 1), r, n}, x2.options());
  const float *xp = x2.data_ptr<float>(), *gp = g2.data_ptr<float>();
  const float *ap = A.data_ptr<float>(), *bp = Bt.data_ptr<float>();
  float* gxp = grad_x ? grad_x->data_ptr<float>() : nullptr;
  float *pa = part_a.data_ptr<float>(), *pb = part_b.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float xa[kMaxRank], gb[kMaxRank], sgb[kMaxRank];
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t row = b * kRowBlock; row < std::min(m, (b + 1) * kRowBlock); ++row) {
        const float *xm = xp + row * k, *gm = gp + row * n;
        dots(ap, xm, r, k, xa);  // x_m A^T
        dots(bp, gm, r, n, gb);  // g_m B
        outer_add(xa, gm, r, n, pb + b * r * n);  // dB^T += (x_m A^T)^T g_m
        outer_add(gb, xm, r, k, pa + b * r * k);  // dA += (g_m B)^T x_m
        if (gxp) {
          for (int64_t j = 0; j < r; ++j) sgb[j] = s * gb[j];
          combine(ap, sgb, r, k, gxp + row * k);  // grad_x_m += s (g_m B) A
        }
      }
    }
  });
  // block partials summed in order, then scaled
  at::Tensor grad_A = at::empty({r, k}, x2.options()), grad_Bt = at::empty({r, n}, x2.options());
  for (auto [part, out, len] : {std::make_tuple(pa, grad_A.data_ptr<float>(), r * k),
                                std::make_tuple(pb, grad_Bt.data_ptr<float>(), r * n)}) {
    for (int64_t i = 0; i < len; ++i) {
      float acc = part[i];
      for (int64_t b = 1; b < blocks; ++b) acc += part[b * len + i];
      out[i] = acc * s;
    }
  }
  return {grad_A, grad_Bt.t().contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) {
  m.impl("lora_linear_backward", &lora_linear_backward);
}
