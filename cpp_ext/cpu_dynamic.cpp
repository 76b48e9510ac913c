// CPU kernels of the dynamic int8 ops (int8_linear_dynamic, over a weight packed once too, its input
// gradient, lora_linear): activations quantized per token, int8 x int8 -> int32 products, one fused
// epilogue. Schemas: ops.py; references: op_references.py.

#include "int8_gemm.h"

namespace {

std::string int8_isa() { return isa_name(picked_isa()); }

// Above this many rows the panel GEMM beats the two-column tiles even for one sentence's tokens: measured on
// a 2-core AVX2 EPYC at 10 rows, 384->384 61 -> 37 us, 1536->384 121 -> 100 us (kDirectMaxRows, 16, is the
// weight-only int8 kernels' threshold).
constexpr int64_t kDynamicDirectMaxRows = 4;

// The packed weight of panel_gemm: blocks of `bcols` output columns, each [k4/4][bcols][4] bytes.
struct PackLayout {
  int64_t k4, bcols, blocks;
  int64_t bytes() const { return blocks * k4 * bcols; }
};
PackLayout pack_layout(int64_t n, int64_t k) {
  const int64_t k4 = (k + 3) / 4 * 4, bcols = block_cols(k4, picked().panel_cols);
  return {k4, bcols, (n + bcols - 1) / bcols};
}

// Packs W (w_q (n, k) row-major, or with `transposed` the transpose of a row-major (k, n) w_q) into pw;
// for a row-major W also colsum[c] = the sum of W's column c (the zero-point correction), on the way.
void pack_weight_into(const int8_t* w, int64_t k, int64_t n, bool transposed, const PackLayout& lay, int8_t* pw,
                      int32_t* colsum) {
  const PackWidth wide_pack = picked_isa() == Isa::vnni ? PackWidth::avx512
                              : picked_isa() == Isa::avx2 ? PackWidth::avx2 : PackWidth::sse2;
  const int64_t k4 = lay.k4, bcols = lay.bcols;
  at::parallel_for(0, lay.blocks, std::max<int64_t>(1, kMinPassBytes / (k4 * bcols)), [&](int64_t blo, int64_t bhi) {
    for (int64_t blk = blo; blk < bhi; ++blk) {
      if (transposed)
        pack_block_t(w, k, n, blk * bcols, k4, bcols, pw + blk * k4 * bcols);
      else
        pack_block(w, n, k, blk * bcols, k4, bcols, pw + blk * k4 * bcols, colsum + blk * bcols, wide_pack);
    }
  });
}

// y (m, n) = epilogue(xu (m, k) @ W^T), W as pack_weight_into takes it. colsum[c] = sum over the reduction of
// W's column c: the caller's for the transpose, filled here while packing for a row-major W. `prepacked`:
// W already packed (int8_pack_weight) with its colsum; nothing is packed then.
void panel_gemm(const RowQuant& q, int64_t m, int64_t k, int64_t n, const int8_t* w, bool transposed,
                int32_t* colsum, const float* colscale, const float* bias, float* yp,
                const int8_t* prepacked = nullptr) {
  const int64_t k4 = q.ld;  // x's rows are padded to k4 with zeros: their products with the weight's padding vanish
  const Int8Kernels& kern = picked();
  const PanelSplit sp = split_panels(m, n, k4, kern);
  const int64_t bcols = sp.bcols;
  // A tensor, not a vector: from the c10 allocator, so the tensor cache hands back the same pages every call.
  at::Tensor packed;
  const int8_t* pw = prepacked;
  if (pw == nullptr) {
    packed = at::empty({sp.blocks * k4 * bcols}, at::kChar);
    pack_weight_into(w, k, n, transposed, {k4, bcols, sp.blocks}, packed.data_ptr<int8_t>(), colsum);
    pw = packed.data_ptr<int8_t>();
  }
  struct NoScratch {};
  run_panels<NoScratch>(q, m, n, sp, bias, yp, [&](int64_t blk, NoScratch&) {
    const int64_t c0 = blk * bcols;
    return PanelBlock{pw + blk * k4 * bcols, colsum + c0, colscale ? colscale + c0 : nullptr};
  });
}

// The forward of int8_linear_dynamic and int8_linear_dynamic_packed: `packed` / `sums`, where given, are w_q
// packed for the panels and its row sums (int8_pack_weight), so neither is made again.
at::Tensor linear_dynamic(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias, const int8_t* packed, const int32_t* sums,
                          const char* op) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  check_x(x, k, op);
  auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto y = at::empty({m, n}, x2.options());
  if (m == 0 || n == 0) return finish(y, x);
  auto wq = w_q.contiguous();
  auto sc = scale.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int8_t* w = wq.data_ptr<int8_t>();
  const float* sw = sc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  RowQuant q = quantize_rows(x2.data_ptr<float>(), m, k);
  std::vector<int32_t> own_sums(sums ? 0 : n);
  int32_t* wsum = sums ? const_cast<int32_t*>(sums) : own_sums.data();  // read-only where given (prepacked)
  if (m > kDynamicDirectMaxRows) {
    panel_gemm(q, m, k, n, w, /*transposed=*/false, wsum, sw, bp, yp, packed);  // packing fills own sums
    return finish(y, x);
  }
  if (!sums)
    at::parallel_for(0, n, std::max<int64_t>(64, kMinPassBytes / k),
                     [&](int64_t lo, int64_t hi) { picked().row_sums(w + lo * k, hi - lo, k, wsum + lo); });
  // Few rows: 2 weight rows at a time straight from w_q, dot products along k.
  const int64_t pairs = (n + 1) / 2;
  at::parallel_for(0, pairs, 8, [&](int64_t plo, int64_t phi) {
    for (int64_t r0 = 0; r0 < m; r0 += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, m - r0));
      for (int64_t p = plo; p < phi; ++p) {
        const int64_t c0 = 2 * p;
        const int ncols = static_cast<int>(std::min<int64_t>(2, n - c0));
        int32_t acc[8];
        picked().tile[rows](q.row(r0), q.ld, w + c0 * k, k, k, ncols, acc);
        for (int r = 0; r < rows; ++r) {
          const int64_t row = r0 + r;
          float* yr = yp + row * n + c0;
          epilogue_run(acc + r * 2, ncols, q.zp[row], q.sx[row], wsum + c0, sw + c0, bp ? bp + c0 : nullptr, yr);
          if (q.bad[row]) std::fill(yr, yr + ncols, std::numeric_limits<float>::quiet_NaN());
        }
      }
    }
  });
  return finish(y, x);
}

at::Tensor int8_linear_dynamic(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& bias) {
  return linear_dynamic(x, w_q, scale, bias, nullptr, nullptr, "int8_linear_dynamic");
}

// ---- a weight packed once, for inference passes (int8_pack_weight, int8_linear_dynamic_packed) ----
// `sums` starts with a header naming the layout, then w_q's row sums: a packing made for other int8 cores
// (EDGE_TUNE_INT8_ISA) or by the reference (which keeps no layout) is refused, never misread.
constexpr int32_t kPackMagic = 0x57505445;  // "ETPW"
constexpr int64_t kPackHeader = 5;          // magic, int8 cores, block columns, out, in

std::tuple<at::Tensor, at::Tensor> int8_pack_weight(const at::Tensor& w_q) {
  TORCH_CHECK(w_q.dim() == 2 && w_q.scalar_type() == at::kChar, "int8_pack_weight: w_q must be (out, in) int8");
  const auto wq = w_q.contiguous();
  const int64_t n = wq.size(0), k = wq.size(1);
  const PackLayout lay = pack_layout(n, k);
  at::Tensor packed = at::empty({lay.bytes()}, at::kChar);
  at::Tensor sums = at::zeros({kPackHeader + n}, at::kInt);
  int32_t* h = sums.data_ptr<int32_t>();
  h[0] = kPackMagic, h[1] = static_cast<int32_t>(picked_isa()), h[2] = static_cast<int32_t>(lay.bcols);
  h[3] = static_cast<int32_t>(n), h[4] = static_cast<int32_t>(k);
  if (n > 0 && k > 0)
    pack_weight_into(wq.data_ptr<int8_t>(), k, n, false, lay, packed.data_ptr<int8_t>(), h + kPackHeader);
  return {packed, sums};
}

at::Tensor int8_linear_dynamic_packed(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& packed,
                                      const at::Tensor& sums, const at::Tensor& scale,
                                      const c10::optional<at::Tensor>& bias) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  const PackLayout lay = pack_layout(n, k);
  const bool ok = sums.scalar_type() == at::kInt && sums.dim() == 1 && sums.numel() == kPackHeader + n &&
                  sums.is_contiguous() && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.numel() == lay.bytes();
  const int32_t* h = ok ? sums.data_ptr<int32_t>() : nullptr;
  TORCH_CHECK(ok && h[0] == kPackMagic && h[1] == static_cast<int32_t>(picked_isa()) && h[2] == lay.bcols &&
                  h[3] == n && h[4] == k,
              "int8_linear_dynamic_packed: the packed weight is not this w_q's for this process's int8 cores "
              "(pack it again with int8_pack_weight)");
  return linear_dynamic(x, w_q, scale, bias, packed.data_ptr<int8_t>(), h + kPackHeader,
                        "int8_linear_dynamic_packed");
}

// Input gradient on the int8 path: grad_x = grad_out @ (scale * W). The per-output-channel scale lies along
// this product's reduction, so it multiplies grad_out's columns as its rows are quantized (like x's).
at::Tensor int8_linear_dynamic_grad_input(const at::Tensor& grad_out, const at::Tensor& w_q, const at::Tensor& scale) {
  const int64_t n = w_q.size(0), k = w_q.size(1);
  check_x(grad_out, n, "int8_linear_dynamic_grad_input");
  auto g2 = grad_out.reshape({-1, n}).contiguous();
  auto sc = scale.contiguous();
  const int64_t m = g2.size(0);
  auto gx = at::empty({m, k}, g2.options());
  auto sizes = grad_out.sizes().vec();
  sizes.back() = k;
  if (m == 0 || k == 0) return gx.view(sizes);
  auto wq = w_q.contiguous();
  const int8_t* w = wq.data_ptr<int8_t>();
  RowQuant q = quantize_rows(g2.data_ptr<float>(), m, n, sc.data_ptr<float>());
  std::vector<int32_t> colsum(k, 0);
  at::parallel_for(0, k, std::max<int64_t>(64, kMinPassBytes / n), [&](int64_t lo, int64_t hi) {
    for (int64_t o = 0; o < n; ++o)
      for (int64_t c = lo; c < hi; ++c) colsum[c] += w[o * k + c];
  });
  panel_gemm(q, m, n, k, w, /*transposed=*/true, colsum.data(), nullptr, nullptr, gx.data_ptr<float>());
  return gx.view(sizes);
}


// ---- LoRA on the dynamic int8 base: the rank-r term goes into the output in place (one addmm) ----
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B, double lora_scale) {
  const int64_t k = w_q.size(1);
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(1) == k && B.size(0) == w_q.size(0) && B.size(1) == A.size(0),
              "lora_linear: A must be (r, in) and B (out, r)");
  auto y = int8_linear_dynamic(x, w_q, scale, bias);
  auto x2 = x.reshape({-1, k});
  auto y2 = y.view({-1, w_q.size(0)});
  // BLAS, not cpu_lora.cpp's row pass: the bank's mixed-patch batches add the same term with per-row bmm, and
  // must give the same bits as a one-patch pass (the int8 activations turn a last-bit difference into a
  // flipped rounding downstream); the forward term is ~2 ms of a LoRA step either way.
  if (x2.size(0) > 0) y2.addmm_(at::mm(x2, A.t()), B.t(), 1.0, lora_scale);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) {
  m.impl("int8_linear_dynamic", &int8_linear_dynamic);
  m.impl("int8_pack_weight", &int8_pack_weight);
  m.impl("int8_linear_dynamic_packed", &int8_linear_dynamic_packed);
  m.impl("lora_linear", &lora_linear);
  m.impl("int8_linear_dynamic_grad_input", &int8_linear_dynamic_grad_input);
}

// Which integer cores run here (for `edge-tune doctor`).
TORCH_LIBRARY_FRAGMENT(edge_tune, m) { m.def("int8_isa() -> str", &int8_isa); }
