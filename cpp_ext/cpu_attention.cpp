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
// loops have no tails. The forward reads q and v and writes its output where they lie (a head dim that is a
// multiple of 8, as every BERT's is) and copies only k, transposed; a short sentence's pair is a few
// thousand cycles, so copies and the GEMM's blocking for 8-24 columns decide its speed. softmax's exp is a Cephes-style polynomial (~1 ulp): results are within ~1e-6 of
// torch's SDPA, not bit-identical, and the same for every batch a sequence sits in. The model runs this op
// with and without autograd alike, so training, inference and checkpointing see the same bits.

#include "cpu_common.h"

#include <c10/util/Half.h>

#include "vec8.h"

namespace {
using namespace edge_tune_cpu;
using namespace edge_tune_vec;



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
// reads A down a column). R rows of C against NV vectors of B's columns, R * NV accumulators: each loaded
// vector of B feeds R FMAs, and enough independent sums are in flight to cover the FMA latency even where
// n is a short sequence's 8-24 columns (one 8-wide block with two rows left the FMA units mostly idle).
// Every element's sum runs over k in order whatever the blocking, so the bits are the same for any shape.
template <int R, int NV, bool TA>
ET_INLINE void gemm_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                          int64_t k) {
  v8f acc[R][NV] = {};
  for (int64_t p = 0; p < k; ++p) {
    v8f b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load8(B + p * ldb + 8 * v);
    for (int r = 0; r < R; ++r) {
      const v8f a = splat(TA ? A[p * lda + r] : A[r * lda + p]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store8(C + r * ldc + 8 * v, acc[r][v]);
}

// The last rows < R of a column block, as one smaller block.
template <int R, int NV, bool TA>
ET_INLINE void gemm_rows_tail(int64_t rows, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                              int64_t ldc, int64_t k) {
  if constexpr (R > 0) {
    if (rows == R)
      gemm_block<R, NV, TA>(A, lda, B, ldb, C, ldc, k);
    else
      gemm_rows_tail<R - 1, NV, TA>(rows, A, lda, B, ldb, C, ldc, k);
  }
}

// Rows of R (as many as 16 vector registers hold with B's vectors: 2 x 4, 3 x 3, 4 x 2, 6 x 1) down one
// block of NV column vectors.
template <int NV, bool TA>
ET_INLINE void gemm_columns(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                            int64_t m, int64_t k) {
  constexpr int R = NV == 4 ? 2 : NV == 3 ? 3 : NV == 2 ? 4 : 6;
  const int64_t step = TA ? 1 : lda;  // from one row of op(A) to the next
  int64_t i = 0;
  for (; i + R <= m; i += R) gemm_block<R, NV, TA>(A + i * step, lda, B, ldb, C + i * ldc, ldc, k);
  if (i < m) gemm_rows_tail<R - 1, NV, TA>(m - i, A + i * step, lda, B, ldb, C + i * ldc, ldc, k);
}

template <bool TA>
ET_INLINE void gemm_any(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                        int64_t m, int64_t n, int64_t k) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) gemm_columns<4, TA>(A, lda, B + j, ldb, C + j, ldc, m, k);
  switch ((n - j) / 8) {
    case 3: gemm_columns<3, TA>(A, lda, B + j, ldb, C + j, ldc, m, k); break;
    case 2: gemm_columns<2, TA>(A, lda, B + j, ldb, C + j, ldc, m, k); break;
    case 1: gemm_columns<1, TA>(A, lda, B + j, ldb, C + j, ldc, m, k); break;
    default: break;
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

// t rows of dh values (st apart, fp32 or fp16) as fp32 into a buffer zero-padded to `rows` x `ld`.
void rows_f32(const float* src, int64_t dh, float* out) { std::memcpy(out, src, dh * sizeof(float)); }
void rows_f32(const c10::Half* src, int64_t dh, float* out) {
  int64_t d = 0;
#ifdef ET_X86
  if (has_f16c())
    for (; d + 8 <= dh; d += 8) half8_to_f32(src + d, out + d);
#endif
  for (; d < dh; ++d) out[d] = static_cast<float>(src[d]);
}

template <typename T>
void gather(const T* base, int64_t st, int64_t t, int64_t dh, float* out, int64_t ld, int64_t rows) {
  std::fill(out, out + rows * ld, 0.f);
  for (int64_t r = 0; r < t; ++r) rows_f32(base + r * st, dh, out + r * ld);
}

// k (T rows, ldk apart; head dim dh a multiple of 8) as kt (dh x ld), columns T.. zero: eight rows by eight
// dims at a time through a register transpose (a scalar scatter was a fifth of a short pair's time).
ET_CLONES_V3 void transpose_rows(const float* k, int64_t ldk, int64_t T, int64_t dh, float* kt, int64_t ld) {
  for (int64_t r0 = 0; r0 < ld; r0 += 8) {
    for (int64_t d0 = 0; d0 < dh; d0 += 8) {
      v8f r[8];
      for (int i = 0; i < 8; ++i) r[i] = r0 + i < T ? load8(k + (r0 + i) * ldk + d0) : splat(0.f);
      v8f t[8], u[8];
      for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
        t[i] = __builtin_shuffle(r[i], r[i + 1], v8i{0, 8, 1, 9, 4, 12, 5, 13});
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], v8i{2, 10, 3, 11, 6, 14, 7, 15});
      }
      for (int i = 0; i < 8; i += 4) {  // quads: u[i + j] holds dims j and j + 4 of four rows
        u[i + 0] = __builtin_shuffle(t[i], t[i + 2], v8i{0, 1, 8, 9, 4, 5, 12, 13});
        u[i + 1] = __builtin_shuffle(t[i], t[i + 2], v8i{2, 3, 10, 11, 6, 7, 14, 15});
        u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], v8i{0, 1, 8, 9, 4, 5, 12, 13});
        u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], v8i{2, 3, 10, 11, 6, 7, 14, 15});
      }
      for (int j = 0; j < 4; ++j) {
        store8(kt + (d0 + j) * ld + r0, __builtin_shuffle(u[j], u[j + 4], v8i{0, 1, 2, 3, 8, 9, 10, 11}));
        store8(kt + (d0 + j + 4) * ld + r0, __builtin_shuffle(u[j], u[j + 4], v8i{4, 5, 6, 7, 12, 13, 14, 15}));
      }
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

// One (batch, head) pair's q, k or v (any strides, unit last one; fp32 or fp16) into a padded fp32 (tp, dp).
void load_pair(const at::Tensor& t, int64_t b, int64_t h, const Dims& d, float* out) {
  const int64_t off = b * t.stride(0) + h * t.stride(1);
  if (t.scalar_type() == at::kHalf)
    gather(t.data_ptr<c10::Half>() + off, t.stride(2), d.T, d.Dh, out, d.dp, d.tp);
  else
    gather(t.data_ptr<float>() + off, t.stride(2), d.T, d.Dh, out, d.dp, d.tp);
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

// Work buffers of one thread, sized for pairs of up to tp tokens and dp (padded) head dims.
struct ForwardBuffers {
  std::vector<float> Q, Kt, V, P, O;
  ForwardBuffers(int64_t tp, int64_t dp) : Q(tp * dp), Kt(dp * tp), V(tp * dp), P(tp * tp), O(tp * dp) {}
};

// One (sequence, head) pair's forward: o (T rows, ldo apart) = softmax(scale * q k^T, keep) v, for fp32
// q, k, v rows ldq / ldk / ldv apart. Only k^T is copied (the product needs its columns contiguous); where
// the head dim is a multiple of 8, q and v are read and o written where they lie. Otherwise they go
// through zero-padded buffers. Either way each output's sums are the same: a padded key's zero probability
// times its zero row adds +0, which changes no sum (none is ever -0), so the bits match a padded pass.
void forward_pair(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv, float* o,
                  int64_t ldo, int64_t T, int64_t Dh, const float* keep, float scale, ForwardBuffers& buf) {
  const Dims d{1, 1, T, Dh, pad8(T), pad8(Dh)};
  if (Dh % 8 == 0) {
    transpose_rows(k, ldk, T, Dh, buf.Kt.data(), d.tp);
    gemm(q, ldq, buf.Kt.data(), d.tp, buf.P.data(), d.tp, T, d.tp, Dh);
    softmax_rows(buf.P.data(), T, d.tp, keep, scale);
    gemm(buf.P.data(), d.tp, v, ldv, o, ldo, T, Dh, T);  // O = P V over the real keys
    return;
  }
  gather(k, ldk, T, Dh, buf.O.data(), d.dp, d.tp);  // O is free until P V
  transpose_rows(buf.O.data(), d.dp, T, d.dp, buf.Kt.data(), d.tp);
  gather(q, ldq, T, Dh, buf.Q.data(), d.dp, d.tp);
  gather(v, ldv, T, Dh, buf.V.data(), d.dp, d.tp);
  probabilities(buf.Q.data(), buf.Kt.data(), keep, d, scale, buf.P.data());
  gemm(buf.P.data(), d.tp, buf.V.data(), d.dp, buf.O.data(), d.dp, T, d.dp, d.tp);
  for (int64_t r = 0; r < T; ++r) std::memcpy(o + r * ldo, buf.O.data() + r * d.dp, Dh * sizeof(float));
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& key_mask) {
  const Dims d = check(q_in, k_in, v_in, key_mask, "attention");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "attention: q, k and v must be float32");
  const at::Tensor q = contiguous_last(q_in), k = contiguous_last(k_in), v = contiguous_last(v_in);
  at::Tensor out = empty_bthd(d, q.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(d.Dh));
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t p0, int64_t p1) {
    ForwardBuffers buf(d.tp, d.dp);
    std::vector<float> keep;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / d.H, h = p % d.H;
      if (p == p0 || h == 0) keep = keep_row(key_mask, b, d.tp);
      const auto pair_at = [&](const at::Tensor& t) { return b * t.stride(0) + h * t.stride(1); };
      forward_pair(qp + pair_at(q), q.stride(2), kp + pair_at(k), k.stride(2), vp + pair_at(v), v.stride(2),
                   op + pair_at(out), out.stride(2), d.T, d.Dh, keep.data(), scale, buf);
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
    ForwardBuffers buf(pad8(longest), pad8(Dh));
    std::vector<float> keep(pad8(longest));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s = p / H, h = p % H, T = off[s + 1] - off[s];
      if (T == 0) continue;
      std::fill(keep.begin(), keep.end(), 0.f);
      std::fill(keep.begin(), keep.begin() + T, 1.f);
      const auto pair_at = [&](const at::Tensor& t) { return off[s] * t.stride(0) + h * t.stride(1); };
      forward_pair(qp + pair_at(q), q.stride(0), kp + pair_at(k), k.stride(0), vp + pair_at(v), v.stride(0),
                   op + pair_at(out), out.stride(0), T, Dh, keep.data(), scale, buf);
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
        R(tp * dp), keep;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / d.H, h = p % d.H;
      if (p == p0 || h == 0) keep = keep_row(key_mask, b, tp);
      load_pair(q, b, h, d, Q.data());
      load_pair(k, b, h, d, K.data());
      transpose_rows(K.data(), dp, d.T, dp, Kt.data(), tp);
      load_pair(v, b, h, d, R.data());  // R is free until dV
      transpose_rows(R.data(), dp, d.T, dp, Vt.data(), tp);
      load_pair(g, b, h, d, G.data());
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
