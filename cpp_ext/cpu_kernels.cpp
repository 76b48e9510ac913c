// CPU kernels for the edge_tune:: ops (schemas in edge_tune/ops.py, references in edge_tune/op_references.py).
//
// Where a well-kept GEMM is the fastest thing available (many tokens: training, batched inference) the
// kernels dequantize the frozen weight once and call it (MKL/oneDNN through at::addmm). Where it is not
// (few tokens: batch-1 inference, the int4 formats) they work on the quantized bytes directly: one pass
// over the int8 or packed int4 weight, converted in registers, never to a full fp32 copy.
// The dynamic int8 ops (int8 activations too) are in cpu_dynamic.cpp.

#include "cpu_common.h"

namespace {
using namespace edge_tune_cpu;

constexpr int64_t kGroup = 32;  // int4 group size along the input dimension (quant.GROUP_SIZE)

ET_CLONES float dot_i8(const int8_t* w, const float* x, int64_t k) {
  float acc = 0.f;
  // omp simd: lets the compiler reorder the float sum into vector lanes (plain -O3 keeps it serial)
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < k; ++i) acc += static_cast<float>(w[i]) * x[i];
  return acc;
}

ET_CLONES float dot_i4(const uint8_t* w, const at::Half* scale, const float* x, int64_t k) {
  float acc = 0.f;
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const uint8_t* wg = w + g * kGroup / 2;
    const float* xg = x + g * kGroup;
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = 0; j < kGroup / 2; ++j) {
      part += static_cast<float>(static_cast<int>(wg[j] & 0xF) - 8) * xg[2 * j];
      part += static_cast<float>(static_cast<int>(wg[j] >> 4) - 8) * xg[2 * j + 1];
    }
    acc += part * static_cast<float>(scale[g]);
  }
  return acc;
}

ET_CLONES float dot_f32(const float* a, const float* x, int64_t k) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < k; ++i) acc += a[i] * x[i];
  return acc;
}

ET_CLONES void row_i8(const int8_t* w, float* out, int64_t k) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(w[i]);
}

ET_CLONES void row_i4(const uint8_t* w, const at::Half* scale, float* out, int64_t k) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float s = static_cast<float>(scale[g]);
#pragma omp simd
    for (int64_t j = 0; j < kGroup / 2; ++j) {
      out[g * kGroup + 2 * j] = s * static_cast<float>(static_cast<int>(w[g * kGroup / 2 + j] & 0xF) - 8);
      out[g * kGroup + 2 * j + 1] = s * static_cast<float>(static_cast<int>(w[g * kGroup / 2 + j] >> 4) - 8);
    }
  }
}

ET_CLONES void axpy_i8(float a, const int8_t* w, float* y, int64_t k) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) y[i] += a * static_cast<float>(w[i]);
}

ET_CLONES void axpy_i4(float a, const uint8_t* w, const at::Half* scale, float* y, int64_t k) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float s = a * static_cast<float>(scale[g]);
    const uint8_t* wg = w + g * kGroup / 2;
    float* yg = y + g * kGroup;
#pragma omp simd
    for (int64_t j = 0; j < kGroup / 2; ++j) {
      yg[2 * j] += s * static_cast<float>(static_cast<int>(wg[j] & 0xF) - 8);
      yg[2 * j + 1] += s * static_cast<float>(static_cast<int>(wg[j] >> 4) - 8);
    }
  }
}

at::Tensor dequant_int8(const at::Tensor& w_q, const at::Tensor& scale) {
  return w_q.to(at::kFloat).mul_(scale.unsqueeze(1));
}

at::Tensor dequant_int4(const at::Tensor& w_packed, const at::Tensor& scale) {
  const int64_t n = w_packed.size(0), k = w_packed.size(1) * 2;
  auto out = at::empty({n, k}, w_packed.options().dtype(at::kFloat));
  auto wp = w_packed.contiguous();
  auto sc = scale.contiguous();
  const uint8_t* w = wp.data_ptr<uint8_t>();
  const at::Half* s = sc.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  const int64_t groups = k / kGroup;
  // row_i4: one scale conversion per group and a vector loop inside it (per element, the half -> float
  // conversion and the scalar nibble loop cost about as much as a tenth of the GEMM that follows)
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) row_i4(w + r * k / 2, s + r * groups, o + r * k, k);
  });
  return out;
}


// ---- linear: y = x @ dequant(W).T + bias ----
// One row of x: dot products straight off the quantized bytes. A few rows: each weight row is widened
// once into a per-thread buffer and reused for every row of x.
template <typename RowDot, typename RowWiden>
at::Tensor direct_linear(const at::Tensor& x2, int64_t n, const c10::optional<at::Tensor>& bias, RowDot row_dot,
                         RowWiden row_widen, const float* post_scale) {
  const int64_t m = x2.size(0), k = x2.size(1);
  auto y = at::empty({m, n}, x2.options());
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (m == 0) return y;
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(m > 1 ? k : 0);
    for (int64_t o = lo; o < hi; ++o) {
      const float bo = bp ? bp[o] : 0.f;
      if (m == 1) {
        yp[o] = row_dot(o, xp) + bo;
        continue;
      }
      row_widen(o, buf.data());
      const float so = post_scale ? post_scale[o] : 1.f;
      for (int64_t r = 0; r < m; ++r) yp[r * n + o] = so * dot_f32(buf.data(), xp + r * k, k) + bo;
    }
  });
  return y;
}


at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  check_x(x, k, "int8_linear");
  auto x2 = x.reshape({-1, k}).contiguous();
  if (x2.size(0) > kDirectMaxRows) {
    auto w = dequant_int8(w_q, scale);
    return finish(bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t()), x);
  }
  auto wq = w_q.contiguous();
  auto sc = scale.contiguous();
  const int8_t* w = wq.data_ptr<int8_t>();
  const float* s = sc.data_ptr<float>();
  return finish(direct_linear(
                    x2, n, bias, [&](int64_t o, const float* xr) { return s[o] * dot_i8(w + o * k, xr, k); },
                    [&](int64_t o, float* buf) { row_i8(w + o * k, buf, k); }, s),
                x);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_packed.size(0), k = w_packed.size(1) * 2;
  check_x(x, k, "int4_linear");
  TORCH_CHECK(k % kGroup == 0 && scale.size(1) == k / kGroup, "int4_linear: expects groups of ", kGroup);
  auto x2 = x.reshape({-1, k}).contiguous();
  if (x2.size(0) > kDirectMaxRows) {
    auto w = dequant_int4(w_packed, scale);
    return finish(bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t()), x);
  }
  auto wp = w_packed.contiguous();
  auto sc = scale.contiguous();
  const uint8_t* w = wp.data_ptr<uint8_t>();
  const at::Half* s = sc.data_ptr<at::Half>();
  const int64_t groups = k / kGroup;
  return finish(direct_linear(
                    x2, n, bias, [&](int64_t o, const float* xr) { return dot_i4(w + o * k / 2, s + o * groups, xr, k); },
                    [&](int64_t o, float* buf) { row_i4(w + o * k / 2, s + o * groups, buf, k); }, nullptr),
                x);
}


// ---- input gradient: grad_x = grad_out @ dequant(W) ----
template <typename RowAxpy>
at::Tensor direct_grad_input(const at::Tensor& g2, int64_t k, RowAxpy row_axpy) {
  const int64_t m = g2.size(0), n = g2.size(1);
  auto gx = at::zeros({m, k}, g2.options());
  const float* gp = g2.data_ptr<float>();
  float* out = gx.data_ptr<float>();
  at::parallel_for(0, m, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t o = 0; o < n; ++o) row_axpy(gp[r * n + o], o, out + r * k);
  });
  return gx;
}

at::Tensor int8_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& w_q, const at::Tensor& scale) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  check_x(grad_out, n, "int8_linear_grad_input");
  auto g2 = grad_out.reshape({-1, n}).contiguous();
  at::Tensor gx;
  if (g2.size(0) > kDirectMaxRows) {
    gx = at::mm(g2, dequant_int8(w_q, scale));
  } else {
    auto wq = w_q.contiguous();
    auto sc = scale.contiguous();
    const int8_t* w = wq.data_ptr<int8_t>();
    const float* s = sc.data_ptr<float>();
    gx = direct_grad_input(g2, k, [&](float g, int64_t o, float* y) { axpy_i8(g * s[o], w + o * k, y, k); });
  }
  auto sizes = grad_out.sizes().vec();
  sizes.back() = k;
  return gx.view(sizes);
}

at::Tensor int4_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& w_packed, const at::Tensor& scale) {
  const int64_t n = w_packed.size(0), k = w_packed.size(1) * 2;
  check_x(grad_out, n, "int4_linear_grad_input");
  auto g2 = grad_out.reshape({-1, n}).contiguous();
  at::Tensor gx;
  if (g2.size(0) > kDirectMaxRows) {
    gx = at::mm(g2, dequant_int4(w_packed, scale));
  } else {
    auto wp = w_packed.contiguous();
    auto sc = scale.contiguous();
    const uint8_t* w = wp.data_ptr<uint8_t>();
    const at::Half* s = sc.data_ptr<at::Half>();
    const int64_t groups = k / kGroup;
    gx = direct_grad_input(g2, k, [&](float g, int64_t o, float* y) { axpy_i4(g, w + o * k / 2, s + o * groups, y, k); });
  }
  auto sizes = grad_out.sizes().vec();
  sizes.back() = k;
  return gx.view(sizes);
}

// ---- embeddings: gather rows, dequantize only those ----
at::Tensor int8_embedding(const at::Tensor& ids, const at::Tensor& w_q, const at::Tensor& scale) {
  const int64_t v = w_q.size(0), d = w_q.size(1);
  auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  auto out = at::empty({flat.size(0), d}, scale.options().dtype(at::kFloat));
  auto wq = w_q.contiguous();
  auto sc = scale.contiguous();
  const int64_t* ip = flat.data_ptr<int64_t>();
  const int8_t* w = wq.data_ptr<int8_t>();
  const float* s = sc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < flat.size(0); ++t) TORCH_CHECK(ip[t] >= 0 && ip[t] < v, "int8_embedding: id out of range");
  at::parallel_for(0, flat.size(0), 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int8_t* row = w + ip[t] * d;
      for (int64_t j = 0; j < d; ++j) o[t * d + j] = s[ip[t]] * static_cast<float>(row[j]);
    }
  });
  auto sizes = ids.sizes().vec();
  sizes.push_back(d);
  return out.view(sizes);
}

at::Tensor int4_embedding(const at::Tensor& ids, const at::Tensor& w_packed, const at::Tensor& scale) {
  const int64_t v = w_packed.size(0), d = w_packed.size(1) * 2, groups = d / kGroup;
  auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  auto out = at::empty({flat.size(0), d}, w_packed.options().dtype(at::kFloat));
  auto wp = w_packed.contiguous();
  auto sc = scale.contiguous();
  const int64_t* ip = flat.data_ptr<int64_t>();
  const uint8_t* w = wp.data_ptr<uint8_t>();
  const at::Half* s = sc.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < flat.size(0); ++t) TORCH_CHECK(ip[t] >= 0 && ip[t] < v, "int4_embedding: id out of range");
  at::parallel_for(0, flat.size(0), 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const uint8_t* row = w + ip[t] * d / 2;
      const at::Half* rs = s + ip[t] * groups;
      for (int64_t j = 0; j < d; j += 2) {
        const float sf = static_cast<float>(rs[j / kGroup]);
        o[t * d + j] = sf * static_cast<float>(static_cast<int>(row[j / 2] & 0xF) - 8);
        o[t * d + j + 1] = sf * static_cast<float>(static_cast<int>(row[j / 2] >> 4) - 8);
      }
    }
  });
  auto sizes = ids.sizes().vec();
  sizes.push_back(d);
  return out.view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear_grad_input", &int8_linear_grad_input);
  m.impl("int4_linear_grad_input", &int4_linear_grad_input);
  m.impl("int8_embedding", &int8_embedding);
  m.impl("int4_embedding", &int4_embedding);
}
