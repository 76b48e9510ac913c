// The backward of LoRA's rank-r term, s * (x A^T) B^T, in one pass over the activation and gradient rows;
// and the forward of a mixed-patch pass's terms, each row its own patch's (lora_rows, at the end).
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

// ---- lora_rows: a mixed-patch inference pass's terms ----
constexpr int kRowsAtOnce = 4;  // rows of one patch that share each load of its A^T and B^T

// t[r * ra + j] = s * sum_i x_r[i] at[i * ra + j] for ROWS rows of one patch and its rank columns in chunks
// of 8 (at zero-padded to ra, a multiple of 8). Two partial sums a row, over even and odd i, added at the
// end: one chain a row would wait on the FMA latency. The order is fixed by k alone.
template <int ROWS>
ET_INLINE void rank_products(const float* const* x, const float* at, int64_t ra, int64_t k, float s, float* t) {
  for (int64_t c = 0; c < ra; c += 8) {
    v8f even[ROWS] = {}, odd[ROWS] = {};
    int64_t i = 0;
    for (; i + 2 <= k; i += 2) {
      const v8f a0 = load8(at + i * ra + c), a1 = load8(at + (i + 1) * ra + c);
      for (int r = 0; r < ROWS; ++r) {
        even[r] += splat(x[r][i]) * a0;
        odd[r] += splat(x[r][i + 1]) * a1;
      }
    }
    if (i < k)
      for (int r = 0; r < ROWS; ++r) even[r] += splat(x[r][i]) * load8(at + i * ra + c);
    for (int r = 0; r < ROWS; ++r) store8(t + r * ra + c, (even[r] + odd[r]) * splat(s));
  }
}

// out_q = y_q + sum_j t[q * ra + j] bt[j * n + :] for ROWS rows, the sum over j in order from y; 16 columns
// at a time, so twice ROWS sums are in flight.
template <int ROWS, int NV>
ET_INLINE void add_ranks_cols(const float* const* y, const float* bt, const float* t, int64_t ra, int64_t r,
                              int64_t n, int64_t i, float* const* out) {
  v8f acc[ROWS][NV];
  for (int q = 0; q < ROWS; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = load8(y[q] + i + 8 * v);
  for (int64_t j = 0; j < r; ++j) {
    v8f b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load8(bt + j * n + i + 8 * v);
    for (int q = 0; q < ROWS; ++q) {
      const v8f tq = splat(t[q * ra + j]);
      for (int v = 0; v < NV; ++v) acc[q][v] += tq * b[v];
    }
  }
  for (int q = 0; q < ROWS; ++q)
    for (int v = 0; v < NV; ++v) store8(out[q] + i + 8 * v, acc[q][v]);
}

template <int ROWS>
ET_INLINE void add_ranks(const float* const* y, const float* bt, const float* t, int64_t ra, int64_t r, int64_t n,
                         float* const* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) add_ranks_cols<ROWS, 2>(y, bt, t, ra, r, n, i, out);
  for (; i + 8 <= n; i += 8) add_ranks_cols<ROWS, 1>(y, bt, t, ra, r, n, i, out);
  for (; i < n; ++i)
    for (int q = 0; q < ROWS; ++q) {
      float acc = y[q][i];
      for (int64_t j = 0; j < r; ++j) acc += t[q * ra + j] * bt[j * n + i];
      out[q][i] = acc;
    }
}

template <int ROWS>
ET_INLINE void lora_rows_block(const float* const* x, const float* const* y, float* const* out, const float* at,
                               int64_t ra, const float* bt, int64_t r, int64_t k, int64_t n, float s, float* t) {
  rank_products<ROWS>(x, at, ra, k, s, t);
  add_ranks<ROWS>(y, bt, t, ra, r, n, out);
}

// Up to kRowsAtOnce rows of one patch: at (k x ra) its A^T, bt (r x n) its B^T.
ET_CLONES_V3 void lora_rows_rows(int rows, const float* const* x, const float* const* y, float* const* out,
                                 const float* at, int64_t ra, const float* bt, int64_t r, int64_t k, int64_t n,
                                 float s, float* t) {
  switch (rows) {
    case 4: return lora_rows_block<4>(x, y, out, at, ra, bt, r, k, n, s, t);
    case 3: return lora_rows_block<3>(x, y, out, at, ra, bt, r, k, n, s, t);
    case 2: return lora_rows_block<2>(x, y, out, at, ra, bt, r, k, n, s, t);
    case 1: return lora_rows_block<1>(x, y, out, at, ra, bt, r, k, n, s, t);
    default: return;
  }
}

// y + each row's own patch's LoRA term, for a pass whose rows belong to several patches (reference:
// lora_rows_ref). The rows are taken patch by patch, four at a time: t = s_p (x A_p^T) as a broadcast
// product against A_p^T (its ranks side by side in a vector, no horizontal sums), then y + t B_p^T, each load
// of A_p^T or B_p^T serving four rows. Each row does only its own patch's ranks (the stacked matmul this
// replaces ran every row against every patch's), and a row's sums run in an order that depends on nothing
// but the row: a sentence gets the same bits whichever pass, batch, neighbours or thread count it has.
at::Tensor lora_rows(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A_in, const at::Tensor& Bt_in,
                     const at::Tensor& row_patch_in, const at::Tensor& rank_offsets_in, const at::Tensor& scales_in) {
  const int64_t R = A_in.size(0), k = A_in.size(1), n = Bt_in.size(1);
  TORCH_CHECK(A_in.dim() == 2 && Bt_in.dim() == 2 && Bt_in.size(0) == R && x.size(-1) == k && y.size(-1) == n,
              "lora_rows: A must be (R, in), Bt (R, out), x (..., in) and y (..., out)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && A_in.scalar_type() == at::kFloat &&
                  Bt_in.scalar_type() == at::kFloat,
              "lora_rows: y, x, A and Bt must be float32");
  const at::Tensor x2 = x.reshape({-1, k}).contiguous(), y2 = y.reshape({-1, n}).contiguous();
  const int64_t m = x2.size(0);
  const at::Tensor row_patch = row_patch_in.to(at::kLong).contiguous(),
                   offsets = rank_offsets_in.to(at::kLong).contiguous(),
                   scales = scales_in.to(at::kFloat).contiguous();
  const int64_t P = scales.numel();
  TORCH_CHECK(y2.size(0) == m && row_patch.numel() == m, "lora_rows: x, y and row_patch must have the same rows");
  const char* bad_offsets = "lora_rows: rank_offsets must be (patches + 1,), non-decreasing, from 0, within A's ranks";
  TORCH_CHECK(offsets.numel() == P + 1, bad_offsets);
  const int64_t *rp = row_patch.data_ptr<int64_t>(), *off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] >= 0, bad_offsets);
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK(off[p + 1] >= off[p] && off[p + 1] <= R, bad_offsets);
  // each patch's A^T, ranks zero-padded to a multiple of 8 (k x ra_p), and its rows in order
  std::vector<int64_t> at_off(P + 1, 0), count(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) at_off[p + 1] = at_off[p] + k * pad8(off[p + 1] - off[p]);
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < P, "lora_rows: every row_patch must name one of the patches");
    ++count[rp[i] + 1];
  }
  for (int64_t p = 0; p < P; ++p) count[p + 1] += count[p];
  std::vector<int64_t> order(m), fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < m; ++i) order[fill[rp[i]]++] = i;
  const at::Tensor A = A_in.contiguous(), Bt = Bt_in.contiguous();
  std::vector<float> at(at_off[P], 0.f);
  const float* ap = A.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t r = off[p + 1] - off[p], ra = pad8(r);
    for (int64_t j = 0; j < r; ++j)
      for (int64_t i = 0; i < k; ++i) at[at_off[p] + i * ra + j] = ap[(off[p] + j) * k + i];
  }
  // work items: up to kRowsAtOnce rows of one patch, a start in `order`
  std::vector<int64_t> items;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = count[p]; i < count[p + 1]; i += kRowsAtOnce) items.push_back(i);
  at::Tensor out = at::empty({m, n}, y2.options());
  const float *xp = x2.data_ptr<float>(), *yp = y2.data_ptr<float>(), *bp = Bt.data_ptr<float>(),
              *sp = scales.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 4, [&](int64_t w0, int64_t w1) {
    std::vector<float> t(kRowsAtOnce * std::max<int64_t>(pad8(R), 8));
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t start = items[w], p = rp[order[start]], r = off[p + 1] - off[p];
      const int rows = static_cast<int>(std::min<int64_t>(kRowsAtOnce, count[p + 1] - start));
      const float* xr[kRowsAtOnce];
      const float* yr[kRowsAtOnce];
      float* orow[kRowsAtOnce];
      for (int q = 0; q < rows; ++q) {
        const int64_t i = order[start + q];
        xr[q] = xp + i * k, yr[q] = yp + i * n, orow[q] = op + i * n;
      }
      lora_rows_rows(rows, xr, yr, orow, at.data() + at_off[p], pad8(r), bp + off[p] * n, r, k, n, sp[p], t.data());
    }
  });
  return out.view(y.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) {
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("lora_rows", &lora_rows);
}
