// Scaled dot-product attention for short sequences (an encoder's 64-128 tokens), forward and backward, one
// (batch, head) pair per task: q, k, v of a pair (T x 32 floats each) and its T x T scores fit in L1/L2,
// so each step is a small register-blocked product over cache-resident tiles. torch's CPU flash-attention
// kernels tile for long sequences: at 16 x 12 heads x 64 tokens x 32 they took ~1.4 ms forward and ~2.5 ms
// backward a layer here, plus a forward rerun in backward for the output and log-sum-exp they need.
//
// The backward recomputes the probabilities from q and k (the cheap part) and needs neither the output nor
// the log-sum-exp: D_i = sum_j P_ij dP_ij stands for the flash kernels' dO_i . O_i. So training keeps only
// q, k and v (model._AttentionHalfSaved, fp16: the backward reads them as they are).
//
// Every internal dimension is padded to a multiple of 8 with zeros (padded keys are masked), so the vector
// loops have no tails. softmax's exp is a Cephes-style polynomial (~1 ulp): results are within ~1e-6 of
// torch's SDPA, not bit-identical, and the same for every batch a sequence sits in. The model runs this op
// with and without autograd alike, so training, inference and checkpointing see the same bits.

#include "cpu_common.h"

#include <c10/util/Half.h>

#include "vec8.h"

namespace {
using namespace edge_tune_cpu;
using namespace edge_tune_vec;

inline int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }


#ifdef ET_X86
bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}
__attribute__((target("avx,f16c"))) void half8_to_f32(const c10::Half* src, float* out) {
  _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}
#endif

// C (m x n) = op(A) . B (k x n); n a multiple of 8, rows of B and C n-contiguous; op(A) = A (m x k, rows
// lda apart) or, with TA, A^T for A stored (k x m) (then C = A^T B needs no transposed copy: the broadcast
// reads A down a column). Two rows of C at a time against 32 columns of B (8 accumulators), so each
// loaded vector of B feeds two FMAs.
template <int NV, bool TA>
ET_INLINE void gemm_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                          int64_t rows, int64_t k) {
  v8f acc0[NV] = {}, acc1[NV] = {};
  for (int64_t p = 0; p < k; ++p) {
    const float* a = TA ? A + p * lda : A + p;
    const int64_t next = TA ? 1 : lda;
    const v8f a0 = splat(a[0]), a1 = splat(rows > 1 ? a[next] : 0.f);
    for (int v = 0; v < NV; ++v) {
      const v8f b = load8(B + p * ldb + 8 * v);
      acc0[v] += a0 * b;
      acc1[v] += a1 * b;
    }
  }
  for (int v = 0; v < NV; ++v) {
    store8(C + 8 * v, acc0[v]);
    if (rows > 1) store8(C + ldc + 8 * v, acc1[v]);
  }
}

template <bool TA>
ET_INLINE void gemm_any(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                        int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; i += 2) {
    const int64_t rows = std::min<int64_t>(2, m - i);
    const float* a = TA ? A + i : A + i * lda;
    float* c = C + i * ldc;
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) gemm_block<4, TA>(a, lda, B + j, ldb, c + j, ldc, rows, k);
    for (; j < n; j += 8) gemm_block<1, TA>(a, lda, B + j, ldb, c + j, ldc, rows, k);
  }
}

ET_CLONES_V3 void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t m,
                       int64_t n, int64_t k) {
  gemm_any<false>(A, lda, B, ldb, C, ldc, m, n, k);
}

ET_CLONES_V3 void gemm_ta(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                          int64_t m, int64_t n, int64_t k) {
  gemm_any<true>(A, lda, B, ldb, C, ldc, m, n, k);
}

// One (batch, head) of a (B, H, T, Dh) tensor with any strides but a unit last one, as fp32 into a buffer
// zero-padded to `rows` x `ld`: row-major (T, Dh) or, with transposed, (Dh, T).
void rows_f32(const float* src, int64_t t, int64_t dh, float* out) { std::memcpy(out, src, dh * sizeof(float)); }
void rows_f32(const c10::Half* src, int64_t t, int64_t dh, float* out) {
  int64_t d = 0;
#ifdef ET_X86
  if (has_f16c())
    for (; d + 8 <= dh; d += 8) half8_to_f32(src + d, out + d);
#endif
  for (; d < dh; ++d) out[d] = static_cast<float>(src[d]);
}

template <typename T>
void gather(const T* base, int64_t st, int64_t t, int64_t dh, float* out, int64_t ld, int64_t rows,
            bool transposed, float* row_buf) {
  std::fill(out, out + rows * ld, 0.f);
  for (int64_t r = 0; r < t; ++r) {
    if (!transposed) {
      rows_f32(base + r * st, t, dh, out + r * ld);
    } else {
      rows_f32(base + r * st, t, dh, row_buf);
      for (int64_t d = 0; d < dh; ++d) out[d * ld + r] = row_buf[d];
    }
  }
}

// P (tp x tp) = softmax(scale * S + mask) row by row, in place; keep[j] = 1 for a real key, 0 for a masked
// or padded one. A row with no real key gives zeros, as torch's SDPA does.
ET_CLONES_V3 void softmax_rows(float* S, int64_t t, int64_t tp, const float* keep, float scale) {
  const v8f ninf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < t; ++i) {
    float* s = S + i * tp;
    v8f mx = ninf;
    for (int64_t j = 0; j < tp; j += 8) {
      const v8f x = load8(s + j) * splat(scale);
      const v8f z = load8(keep + j) > splat(0.f) ? x : ninf;
      store8(s + j, z);
      mx = z > mx ? z : mx;
    }
    float m = mx[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, mx[l]);
    if (m == -std::numeric_limits<float>::infinity()) {  // no real key: zeros, as torch's SDPA gives
      std::fill(s, s + tp, 0.f);
      continue;
    }
    v8f sum = splat(0.f);
    for (int64_t j = 0; j < tp; j += 8) {
      const v8f e = exp_nonpositive(load8(s + j) - splat(m)) * load8(keep + j);
      store8(s + j, e);
      sum += e;
    }
    float total = 0.f;
    for (int l = 0; l < 8; ++l) total += sum[l];
    const v8f inv = splat(1.f / total);
    for (int64_t j = 0; j < tp; j += 8) store8(s + j, load8(s + j) * inv);
  }
}

// dS = P (dP - D) * scale in place of dP, D_i = sum_j P_ij dP_ij (the flash kernels' dO_i . O_i)
ET_CLONES_V3 void softmax_grad_rows(const float* P, float* dP, int64_t t, int64_t tp, float scale) {
  for (int64_t i = 0; i < t; ++i) {
    const float* pi = P + i * tp;
    float* si = dP + i * tp;
    v8f acc = splat(0.f);
    for (int64_t j = 0; j < tp; j += 8) acc += load8(pi + j) * load8(si + j);
    float di = 0.f;
    for (int l = 0; l < 8; ++l) di += acc[l];
    for (int64_t j = 0; j < tp; j += 8) store8(si + j, load8(pi + j) * (load8(si + j) - splat(di)) * splat(scale));
  }
}

struct Dims {
  int64_t B, H, T, Dh, tp, dp;
};

Dims check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_mask, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), op,
              ": q, k and v must be (batch, heads, tokens, head_dim) of one shape");
  TORCH_CHECK(key_mask.scalar_type() == at::kBool && key_mask.dim() == 2 && key_mask.size(0) == q.size(0) &&
                  key_mask.size(1) == q.size(2),
              op, ": key_mask must be (batch, tokens) bool");
  const int64_t T = q.size(2), Dh = q.size(3);
  return {q.size(0), q.size(1), T, Dh, pad8(T), pad8(Dh)};
}

// (B, H, T, Dh) laid out as (B, T, H, Dh), as the model's heads come from and go back to (B, T, H * Dh):
// the transposes on either side are free.
at::Tensor empty_bthd(const Dims& d, const at::TensorOptions& o) {
  return at::empty({d.B, d.T, d.H, d.Dh}, o).transpose(1, 2);
}

at::Tensor contiguous_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::vector<float> keep_row(const at::Tensor& mask, int64_t b, int64_t tp) {
  std::vector<float> keep(tp, 0.f);
  const bool* m = mask.data_ptr<bool>() + b * mask.stride(0);
  for (int64_t j = 0; j < mask.size(1); ++j) keep[j] = m[j * mask.stride(1)] ? 1.f : 0.f;
  return keep;
}

// One (batch, head) pair's q, k or v (any strides, unit last one; fp32 or fp16) into a padded fp32 buffer.
void load_pair(const at::Tensor& t, int64_t b, int64_t h, const Dims& d, float* out, bool transposed,
               float* row_buf) {
  const int64_t off = b * t.stride(0) + h * t.stride(1);
  const int64_t ld = transposed ? d.tp : d.dp, rows = transposed ? d.dp : d.tp;
  if (t.scalar_type() == at::kHalf)
    gather(t.data_ptr<c10::Half>() + off, t.stride(2), d.T, d.Dh, out, ld, rows, transposed, row_buf);
  else
    gather(t.data_ptr<float>() + off, t.stride(2), d.T, d.Dh, out, ld, rows, transposed, row_buf);
}

void store_pair(at::Tensor& t, int64_t b, int64_t h, const Dims& d, const float* src) {
  float* o = t.data_ptr<float>() + b * t.stride(0) + h * t.stride(1);
  for (int64_t r = 0; r < d.T; ++r) std::memcpy(o + r * t.stride(2), src + r * d.dp, d.Dh * sizeof(float));
}

// S = softmax(scale * Q K^T, masked) for one pair; Q row-major (tp, dp), Kt (dp, tp).
void probabilities(const float* Q, const float* Kt, const float* keep, const Dims& d, float scale, float* S) {
  gemm(Q, d.dp, Kt, d.tp, S, d.tp, d.T, d.tp, d.dp);
  softmax_rows(S, d.T, d.tp, keep, scale);
  std::fill(S + d.T * d.tp, S + d.tp * d.tp, 0.f);  // padded query rows
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& key_mask) {
  const Dims d = check(q_in, k_in, v_in, key_mask, "attention");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "attention: q, k and v must be float32");
  const at::Tensor q = contiguous_last(q_in), k = contiguous_last(k_in), v = contiguous_last(v_in);
  at::Tensor out = empty_bthd(d, q.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(d.Dh));
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t p0, int64_t p1) {
    const int64_t tp = d.tp, dp = d.dp;
    std::vector<float> Q(tp * dp), Kt(dp * tp), V(tp * dp), S(tp * tp), O(tp * dp), keep, row(dp);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / d.H, h = p % d.H;
      if (p == p0 || h == 0) keep = keep_row(key_mask, b, tp);
      load_pair(q, b, h, d, Q.data(), false, row.data());
      load_pair(k, b, h, d, Kt.data(), true, row.data());
      load_pair(v, b, h, d, V.data(), false, row.data());
      probabilities(Q.data(), Kt.data(), keep.data(), d, scale, S.data());
      gemm(S.data(), tp, V.data(), dp, O.data(), dp, d.T, dp, tp);  // O = P V
      store_pair(out, b, h, d, O.data());
    }
  });
  return out;
}

// Attention over sequences packed back to back: q, k, v (N, H, Dh), sequence s on rows offsets[s] to
// offsets[s + 1]. Each (sequence, head) pair runs as `attention` runs it, padded to its own length (rounded
// up to 8) instead of the batch's longest, and reads and writes the packed rows in place. A pair's padding
// adds only zeros to its sums, so every sequence gets the bits the padded op gives it (tests).
at::Tensor attention_packed(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& offsets_in) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "attention_packed: q, k and v must be (tokens, heads, head_dim) of one shape");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "attention_packed: q, k and v must be float32");
  TORCH_CHECK(offsets_in.dim() == 1 && offsets_in.numel() >= 1, "attention_packed: offsets must be (sequences + 1,)");
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t S = offsets.numel() - 1, N = q_in.size(0), H = q_in.size(1), Dh = q_in.size(2);
  TORCH_CHECK(S >= 0 && off[0] == 0 && off[S] == N, "attention_packed: offsets must run from 0 to the tokens");
  int64_t longest = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(off[s + 1] >= off[s], "attention_packed: offsets must not decrease");
    longest = std::max(longest, off[s + 1] - off[s]);
  }
  const at::Tensor q = contiguous_last(q_in), k = contiguous_last(k_in), v = contiguous_last(v_in);
  at::Tensor out = at::empty({N, H, Dh}, q.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, S * H, 1, [&](int64_t p0, int64_t p1) {
    const int64_t tpm = pad8(longest), dp = pad8(Dh);
    std::vector<float> Q(tpm * dp), Kt(dp * tpm), V(tpm * dp), P(tpm * tpm), O(tpm * dp), keep(tpm), row(dp);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s = p / H, h = p % H, T = off[s + 1] - off[s];
      if (T == 0) continue;
      const Dims d{1, H, T, Dh, pad8(T), dp};
      std::fill(keep.begin(), keep.end(), 0.f);
      std::fill(keep.begin(), keep.begin() + T, 1.f);
      const auto pair_at = [&](const at::Tensor& t) { return off[s] * t.stride(0) + h * t.stride(1); };
      gather(qp + pair_at(q), q.stride(0), T, Dh, Q.data(), dp, d.tp, false, row.data());
      gather(kp + pair_at(k), k.stride(0), T, Dh, Kt.data(), d.tp, dp, true, row.data());
      gather(vp + pair_at(v), v.stride(0), T, Dh, V.data(), dp, d.tp, false, row.data());
      probabilities(Q.data(), Kt.data(), keep.data(), d, scale, P.data());
      gemm(P.data(), d.tp, V.data(), dp, O.data(), dp, T, dp, d.tp);  // O = P V
      float* o = op + pair_at(out);
      for (int64_t r = 0; r < T; ++r) std::memcpy(o + r * out.stride(0), O.data() + r * dp, Dh * sizeof(float));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                                  const at::Tensor& k_in, const at::Tensor& v_in,
                                                                  const at::Tensor& key_mask) {
  const Dims d = check(q_in, k_in, v_in, key_mask, "attention_backward");
  const auto dt = q_in.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kHalf) && k_in.scalar_type() == dt && v_in.scalar_type() == dt,
              "attention_backward: q, k and v must be float32 or float16, all one dtype");
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat && grad_in.sizes() == q_in.sizes(),
              "attention_backward: grad must be float32, shaped like q");
  const at::Tensor g = contiguous_last(grad_in), q = contiguous_last(q_in), k = contiguous_last(k_in),
                   v = contiguous_last(v_in);
  const auto opts = g.options();
  at::Tensor dq = empty_bthd(d, opts), dk = empty_bthd(d, opts), dv = empty_bthd(d, opts);
  const float scale = 1.f / std::sqrt(static_cast<float>(d.Dh));
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t p0, int64_t p1) {
    const int64_t tp = d.tp, dp = d.dp;
    std::vector<float> Q(tp * dp), K(tp * dp), Kt(dp * tp), Vt(dp * tp), G(tp * dp), P(tp * tp), dS(tp * tp),
        R(tp * dp), keep, row(dp);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / d.H, h = p % d.H;
      if (p == p0 || h == 0) keep = keep_row(key_mask, b, tp);
      load_pair(q, b, h, d, Q.data(), false, row.data());
      load_pair(k, b, h, d, K.data(), false, row.data());
      load_pair(k, b, h, d, Kt.data(), true, row.data());
      load_pair(v, b, h, d, Vt.data(), true, row.data());
      load_pair(g, b, h, d, G.data(), false, row.data());
      probabilities(Q.data(), Kt.data(), keep.data(), d, scale, P.data());
      gemm_ta(P.data(), tp, G.data(), dp, R.data(), dp, tp, dp, tp);  // dV = P^T dO
      store_pair(dv, b, h, d, R.data());
      gemm(G.data(), dp, Vt.data(), tp, dS.data(), tp, d.T, tp, dp);  // dP = dO V^T
      softmax_grad_rows(P.data(), dS.data(), d.T, tp, scale);         // dS
      std::fill(dS.begin() + d.T * tp, dS.end(), 0.f);
      gemm(dS.data(), tp, K.data(), dp, R.data(), dp, d.T, dp, tp);  // dQ = dS K
      store_pair(dq, b, h, d, R.data());
      gemm_ta(dS.data(), tp, Q.data(), dp, R.data(), dp, tp, dp, tp);  // dK = dS^T Q
      store_pair(dk, b, h, d, R.data());
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) {
  m.impl("attention", &attention);
  m.impl("attention_packed", &attention_packed);
  m.impl("attention_backward", &attention_backward);
}
