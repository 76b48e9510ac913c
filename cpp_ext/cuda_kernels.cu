// CUDA kernels for the edge_tune:: ops (schemas in edge_tune/ops.py, references in op_references.py; CPU twins in
// cpu_kernels.cpp). Many rows: dequantize the frozen weight once on the GPU and use cuBLAS (at::addmm).
// Few rows (inference): one warp per output feature reads the quantized row directly. Dynamic int8: a
// per-row quantization kernel, then cuBLASLt's int8 GEMM (at::_int_mm, int32 out) and a fused dequantize +
// bias epilogue where its shape rules allow (> 16 rows, K and N multiples of 8), else a plain
// int32-accumulating kernel.
//
// Status: compiled (nvcc, compile-only) by tests/test_kernels.py wherever nvcc exists; loaded by
// edge_tune/kernels.py only when torch has CUDA. tests/test_cuda_kernels.py (every op against its
// reference, gradients, opcheck) passed on an H100 with torch 2.11+cu130 (2026-11-24);
// tools/bench_cuda_kernels.py times them there.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace {

constexpr int64_t kDirectMaxRows = 16;
constexpr int kGroup = 32;

__global__ void dequant_int8_kernel(const int8_t* w, const float* scale, float* out, int64_t n, int64_t k) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n * k) out[i] = scale[i / k] * static_cast<float>(w[i]);
}

__global__ void dequant_int4_kernel(const uint8_t* w, const __half* scale, float* out, int64_t n, int64_t k) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;  // one packed byte each
  if (i >= n * k / 2) return;
  const int64_t r = (2 * i) / k, c = (2 * i) % k;
  const float s = __half2float(scale[r * (k / kGroup) + c / kGroup]);
  out[r * k + c] = s * static_cast<float>(static_cast<int>(w[i] & 0xF) - 8);
  out[r * k + c + 1] = s * static_cast<float>(static_cast<int>(w[i] >> 4) - 8);
}

// One warp per (row of x, output feature): y[r, o] = scale[o] * dot(w[o], x[r]) + bias[o].
__global__ void gemv_int8_kernel(const float* x, const int8_t* w, const float* scale, const float* bias, float* y,
                                 int64_t m, int64_t n, int64_t k) {
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= m * n) return;
  const int64_t r = warp / n, o = warp % n;
  float acc = 0.f;
  for (int64_t i = lane; i < k; i += 32) acc += static_cast<float>(w[o * k + i]) * x[r * k + i];
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffff, acc, off);
  if (lane == 0) y[r * n + o] = scale[o] * acc + (bias ? bias[o] : 0.f);
}

__global__ void embedding_int8_kernel(const int64_t* ids, const int8_t* w, const float* scale, float* out,
                                      int64_t t, int64_t d) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= t * d) return;
  const int64_t row = ids[i / d];
  out[i] = scale[row] * static_cast<float>(w[row * d + i % d]);
}

__global__ void embedding_int4_kernel(const int64_t* ids, const uint8_t* w, const __half* scale, float* out,
                                      int64_t t, int64_t d) {
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= t * d) return;
  const int64_t row = ids[i / d], c = i % d;
  const uint8_t byte = w[row * d / 2 + c / 2];
  const int q = (c % 2 ? byte >> 4 : byte & 0xF) - 8;
  out[i] = __half2float(scale[row * (d / kGroup) + c / kGroup]) * static_cast<float>(q);
}

int blocks(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

at::Tensor dequant_int8(const at::Tensor& w_q, const at::Tensor& scale) {
  auto wq = w_q.contiguous();
  auto sc = scale.contiguous();
  auto out = at::empty(wq.sizes(), wq.options().dtype(at::kFloat));
  const int64_t n = wq.size(0), k = wq.size(1);
  if (n * k == 0) return out;
  dequant_int8_kernel<<<blocks(n * k, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      wq.data_ptr<int8_t>(), sc.data_ptr<float>(), out.data_ptr<float>(), n, k);
  return out;
}

at::Tensor dequant_int4(const at::Tensor& w_packed, const at::Tensor& scale) {
  auto wp = w_packed.contiguous();
  auto sc = scale.contiguous();
  const int64_t n = wp.size(0), k = wp.size(1) * 2;
  auto out = at::empty({n, k}, wp.options().dtype(at::kFloat));
  if (n * k == 0) return out;
  dequant_int4_kernel<<<blocks(n * k / 2, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      wp.data_ptr<uint8_t>(), reinterpret_cast<const __half*>(sc.data_ptr<at::Half>()), out.data_ptr<float>(), n, k);
  return out;
}

at::Tensor linear_via_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  auto x2 = x.reshape({-1, w.size(1)});
  auto y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return y.view(sizes);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  auto x2 = x.reshape({-1, k}).contiguous();
  if (x2.size(0) > kDirectMaxRows || x2.size(0) == 0) return linear_via_gemm(x, dequant_int8(w_q, scale), bias);
  auto wq = w_q.contiguous();
  auto sc = scale.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty({x2.size(0), n}, x2.options());
  gemv_int8_kernel<<<blocks(x2.size(0) * n * 32, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x2.data_ptr<float>(), wq.data_ptr<int8_t>(), sc.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
      y.data_ptr<float>(), x2.size(0), n, k);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return y.view(sizes);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  return linear_via_gemm(x, dequant_int4(w_packed, scale), bias);
}

at::Tensor int8_linear_grad_input(const at::Tensor& g, const at::Tensor& w_q, const at::Tensor& scale) {
  auto gx = at::mm(g.reshape({-1, w_q.size(0)}), dequant_int8(w_q, scale));
  auto sizes = g.sizes().vec();
  sizes.back() = w_q.size(1);
  return gx.view(sizes);
}

at::Tensor int4_linear_grad_input(const at::Tensor& g, const at::Tensor& w_packed, const at::Tensor& scale) {
  auto gx = at::mm(g.reshape({-1, w_packed.size(0)}), dequant_int4(w_packed, scale));
  auto sizes = g.sizes().vec();
  sizes.back() = w_packed.size(1) * 2;
  return gx.view(sizes);
}

at::Tensor int8_embedding(const at::Tensor& ids, const at::Tensor& w_q, const at::Tensor& scale) {
  auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t d = w_q.size(1);
  auto out = at::empty({flat.size(0), d}, scale.options().dtype(at::kFloat));
  auto wq = w_q.contiguous();
  auto sc = scale.contiguous();
  if (flat.numel() > 0)
    embedding_int8_kernel<<<blocks(flat.size(0) * d, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        flat.data_ptr<int64_t>(), wq.data_ptr<int8_t>(), sc.data_ptr<float>(), out.data_ptr<float>(), flat.size(0), d);
  auto sizes = ids.sizes().vec();
  sizes.push_back(d);
  return out.view(sizes);
}

at::Tensor int4_embedding(const at::Tensor& ids, const at::Tensor& w_packed, const at::Tensor& scale) {
  auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t d = w_packed.size(1) * 2;
  auto out = at::empty({flat.size(0), d}, w_packed.options().dtype(at::kFloat));
  auto wp = w_packed.contiguous();
  auto sc = scale.contiguous();
  if (flat.numel() > 0)
    embedding_int4_kernel<<<blocks(flat.size(0) * d, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        flat.data_ptr<int64_t>(), wp.data_ptr<uint8_t>(), reinterpret_cast<const __half*>(sc.data_ptr<at::Half>()),
        out.data_ptr<float>(), flat.size(0), d);
  auto sizes = ids.sizes().vec();
  sizes.push_back(d);
  return out.view(sizes);
}


// ---- dynamic int8: per-row 7-bit quantization (one block a row), int32 dot products, fused epilogue ----
constexpr float kActLevels = 127.f;

// One block per row: min/max over the row (holding 0), then scale, zero point, and the quantized row.
// `colscale` (nullable) multiplies column j first (the input gradient folds the weight scale in here).
// `to_signed`: store q - 128 as int8 (the bits of q ^ 0x80) for cuBLASLt's int8 x int8 GEMM.
__global__ void quantize_rows_kernel(const float* x, const float* colscale, int64_t k, uint8_t* xu, float* sx,
                                     int32_t* zp, int32_t* bad, bool to_signed) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * k;
  __shared__ float smin[256], smax[256];
  __shared__ int sbad[256];
  float mn = 0.f, mx = 0.f;
  int b = 0;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float v = xr[i] * (colscale ? colscale[i] : 1.f);
    b |= !isfinite(v);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  smin[threadIdx.x] = mn;
  smax[threadIdx.x] = mx;
  sbad[threadIdx.x] = b;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      smin[threadIdx.x] = fminf(smin[threadIdx.x], smin[threadIdx.x + s]);
      smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
      sbad[threadIdx.x] |= sbad[threadIdx.x + s];
    }
    __syncthreads();
  }
  const bool is_bad = sbad[0] != 0;
  float scl = is_bad ? 1.f : (smax[0] - smin[0]) / kActLevels;
  if (!(scl > 0.f)) scl = 1.f;
  const float z = is_bad ? 0.f : nearbyintf(-smin[0] / scl);
  if (threadIdx.x == 0) {
    sx[r] = scl;
    zp[r] = static_cast<int32_t>(z);
    bad[r] = is_bad;
  }
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float v = xr[i] * (colscale ? colscale[i] : 1.f);
    const uint8_t q = is_bad ? 0 : static_cast<uint8_t>(fminf(kActLevels, fmaxf(0.f, nearbyintf(v / scl) + z)));
    xu[r * k + i] = to_signed ? q ^ 0x80 : q;
  }
}

// y[r, c] = (sum_i xu[r, i] * W(c, i) - zp[r] * colsum[c]) * sx[r] * colscale[c] + bias[c], where W(c, i) is
// w[c * k + i] (forward) or w[i * n + c] (transposed: the input gradient). `acc` holds sum_i (xu - offset) * W.
__device__ __forceinline__ float dequant_epilogue(int32_t acc, int32_t offset, int64_t r, int64_t c,
                                                  const int32_t* colsum, const float* sx, const int32_t* zp,
                                                  const int32_t* bad, const float* colscale, const float* bias) {
  float v = static_cast<float>(acc + (offset - zp[r]) * colsum[c]) * sx[r] * (colscale ? colscale[c] : 1.f);
  if (bias) v += bias[c];
  return bad[r] ? nanf("") : v;
}

// Few rows, forward: one warp per (row, output feature), lanes striding along K (coalesced reads of W's row).
__global__ void int8_gemv_dynamic_kernel(const uint8_t* xu, const int8_t* w, const int32_t* colsum, const float* sx,
                                         const int32_t* zp, const int32_t* bad, const float* colscale,
                                         const float* bias, float* y, int64_t m, int64_t n, int64_t k) {
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= m * n) return;  // uniform across the warp
  const int64_t r = warp / n, c = warp % n;
  int32_t acc = 0;
  for (int64_t i = lane; i < k; i += 32) acc += static_cast<int32_t>(xu[r * k + i]) * w[c * k + i];
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffff, acc, off);
  if (lane == 0) y[warp] = dequant_epilogue(acc, 0, r, c, colsum, sx, zp, bad, colscale, bias);
}

// Few rows, input gradient: one thread per output; neighbouring threads read neighbouring W(c, i) = w[i * n + c].
__global__ void int8_gemm_t_kernel(const uint8_t* xu, const int8_t* w, const int32_t* colsum, const float* sx,
                                   const int32_t* zp, const int32_t* bad, const float* colscale, const float* bias,
                                   float* y, int64_t m, int64_t n, int64_t k) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= m * n) return;
  const int64_t r = idx / n, c = idx % n;
  int32_t acc = 0;
  for (int64_t i = 0; i < k; ++i) acc += static_cast<int32_t>(xu[r * k + i]) * w[i * n + c];
  y[idx] = dequant_epilogue(acc, 0, r, c, colsum, sx, zp, bad, colscale, bias);
}

// After cuBLASLt's int8 GEMM on signed activations (xu - 128): one thread per output.
__global__ void int8_epilogue_kernel(const int32_t* acc, const int32_t* colsum, const float* sx, const int32_t* zp,
                                     const int32_t* bad, const float* colscale, const float* bias, float* y,
                                     int64_t m, int64_t n) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= m * n) return;
  y[idx] = dequant_epilogue(acc[idx], 128, idx / n, idx % n, colsum, sx, zp, bad, colscale, bias);
}

// (m, k) fp32 rows against the int8 weight -> (m, n) fp32; transposed: W is the (k, n) view of w_q's (n_w, k_w).
at::Tensor dynamic_int8_gemm(const at::Tensor& x2, const at::Tensor& wq, bool transposed, const float* rowscale_cols,
                             const at::Tensor& colscale, const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t m = x2.size(0), k = x2.size(1);
  auto y = at::empty({m, n}, x2.options());
  if (m == 0 || n == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto opts = x2.options();
  auto xu = at::empty({m, k}, opts.dtype(at::kByte));
  auto sx = at::empty({m}, opts);
  auto zp = at::empty({m}, opts.dtype(at::kInt));
  auto bad = at::empty({m}, opts.dtype(at::kInt));
  // W's column sums (the zero point's correction), by ATen's reduction: a thread per column looping over K
  // measured 80-450 µs here, more than the GEMM
  auto colsum = wq.sum(transposed ? 0 : 1, false, at::kInt);
  // cuBLASLt's int8 GEMM (torch._int_mm) where its shape rules allow: more than 16 rows, K and N multiples of 8
  const bool lt = m > 16 && k % 8 == 0 && n % 8 == 0;
  quantize_rows_kernel<<<static_cast<unsigned>(m), 256, 0, stream>>>(x2.data_ptr<float>(), rowscale_cols, k,
                                                                      xu.data_ptr<uint8_t>(), sx.data_ptr<float>(),
                                                                      zp.data_ptr<int32_t>(), bad.data_ptr<int32_t>(), lt);
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* cs = colscale.defined() ? colscale.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (lt) {
    // cuBLASLt takes the second operand column-major only ("TN"): the input gradient's W needs a copy
    auto acc = at::_int_mm(xu.view(at::kChar), transposed ? wq.t().contiguous().t() : wq.t());
    int8_epilogue_kernel<<<blocks(m * n, 256), 256, 0, stream>>>(acc.data_ptr<int32_t>(), colsum.data_ptr<int32_t>(),
                                                                 sx.data_ptr<float>(), zp.data_ptr<int32_t>(),
                                                                 bad.data_ptr<int32_t>(), cs, bp, y.data_ptr<float>(), m, n);
  } else if (transposed) {
    int8_gemm_t_kernel<<<blocks(m * n, 256), 256, 0, stream>>>(xu.data_ptr<uint8_t>(), wq.data_ptr<int8_t>(),
                                                               colsum.data_ptr<int32_t>(), sx.data_ptr<float>(),
                                                               zp.data_ptr<int32_t>(), bad.data_ptr<int32_t>(), cs, bp,
                                                               y.data_ptr<float>(), m, n, k);
  } else {
    int8_gemv_dynamic_kernel<<<blocks(m * n * 32, 256), 256, 0, stream>>>(
        xu.data_ptr<uint8_t>(), wq.data_ptr<int8_t>(), colsum.data_ptr<int32_t>(), sx.data_ptr<float>(),
        zp.data_ptr<int32_t>(), bad.data_ptr<int32_t>(), cs, bp, y.data_ptr<float>(), m, n, k);
  }
  return y;
}

at::Tensor int8_linear_dynamic(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  auto x2 = x.reshape({-1, k}).contiguous();
  auto y = dynamic_int8_gemm(x2, w_q.contiguous(), false, nullptr, scale.contiguous(), bias, n);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return y.view(sizes);
}

at::Tensor int8_linear_dynamic_grad_input(const at::Tensor& g, const at::Tensor& w_q, const at::Tensor& scale) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  auto g2 = g.reshape({-1, n}).contiguous();
  auto sc = scale.contiguous();
  auto gx = dynamic_int8_gemm(g2, w_q.contiguous(), true, sc.data_ptr<float>(), at::Tensor(), c10::nullopt, k);
  auto sizes = g.sizes().vec();
  sizes.back() = k;
  return gx.view(sizes);
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B, double lora_scale) {
  auto y = int8_linear_dynamic(x, w_q, scale, bias);
  auto x2 = x.reshape({-1, w_q.size(1)});
  auto y2 = y.view({-1, w_q.size(0)});
  if (x2.size(0) > 0) y2.addmm_(at::mm(x2, A.t()), B.t(), 1.0, lora_scale);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CUDA, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear_grad_input", &int8_linear_grad_input);
  m.impl("int4_linear_grad_input", &int4_linear_grad_input);
  m.impl("int8_embedding", &int8_embedding);
  m.impl("int4_embedding", &int4_embedding);
  m.impl("int8_linear_dynamic", &int8_linear_dynamic);
  m.impl("int8_linear_dynamic_grad_input", &int8_linear_dynamic_grad_input);
  m.impl("lora_linear", &lora_linear);
}
