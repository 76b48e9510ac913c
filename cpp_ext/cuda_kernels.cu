// CUDA kernels for the edge_tune:: ops (schemas and references in edge_tune/ops.py; CPU twins in
// cpu_kernels.cpp). Many rows: dequantize the frozen weight once on the GPU and use cuBLAS (at::addmm).
// Few rows (inference): one warp per output feature reads the quantized row directly.
//
// Status: compiled (nvcc, compile-only) by tests/test_kernels.py wherever nvcc exists; loaded by
// edge_tune/kernels.py only when torch has CUDA. Not yet run on a GPU: no GPU was available to this
// project so far, so treat the CUDA path as untested until tests/test_kernels.py passes on one.

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

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CUDA, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear_grad_input", &int8_linear_grad_input);
  m.impl("int4_linear_grad_input", &int4_linear_grad_input);
  m.impl("int8_embedding", &int8_embedding);
  m.impl("int4_embedding", &int4_embedding);
}
