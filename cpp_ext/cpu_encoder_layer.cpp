// One encoder layer's inference pass in one call (encoder_layer; schema: ops.py, reference:
// op_references.encoder_layer_ref): the ops model.EncoderLayer runs for it from Python -- the int8 or int4
// GEMMs and their LoRA terms, attention, the residual adds, the LayerNorms and GELU -- called in the same
// order on the same tensors from C++, so the bits are the Python path's. A short sentence's pass was more
// interpreter and module machinery between ops than ops (a 10-token pass: 36 GEMMs of ~15 us under ~3 ms).

#include "cpu_common.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace {

using OptTensor = std::optional<at::Tensor>;
using OptList = c10::List<OptTensor>;

constexpr int kLinears = 6;      // q, k, v, o, ff1, ff2
constexpr int kPerLinear = 5;    // w_q, packed, sums, scale, bias
constexpr int kPerLora = 5;      // A, Bt, row_patch, rank_offsets, scales (ops.lora_rows), or five Nones

// The edge_tune:: ops by name through the dispatcher, as Python calls them: whichever kernel each has now.
const auto& packed_gemm() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("edge_tune::int8_linear_dynamic_packed", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const OptTensor&)>();
  return op;
}
const auto& dynamic_gemm() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("edge_tune::int8_linear_dynamic", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  return op;
}
const auto& int4_gemm() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("edge_tune::int4_linear_dynamic", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  return op;
}
const auto& lora_rows_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("edge_tune::lora_rows", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op;
}
const auto& attention_op(bool packed) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
  static auto padded_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("edge_tune::attention", "").typed<Sig>();
  static auto packed_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("edge_tune::attention_packed", "").typed<Sig>();
  return packed ? packed_op : padded_op;
}

// QuantLinear.forward on the inference path: the GEMM (int4 where w_q is uint8, the int4 packing; int8 over
// the packed weight, or over w_q where the packing is empty), then the LoRA term where one is given.
at::Tensor linear(const at::Tensor& x, at::TensorList lins, const OptList& lora, int i) {
  const at::Tensor* w = lins.data() + i * kPerLinear;
  at::Tensor y = w[0].scalar_type() == at::kByte ? int4_gemm().call(x, w[0], w[3], OptTensor(w[4]))
                 : w[1].numel()                  ? packed_gemm().call(x, w[0], w[1], w[2], w[3], OptTensor(w[4]))
                                                 : dynamic_gemm().call(x, w[0], w[3], OptTensor(w[4]));
  const OptTensor a = lora.get(i * kPerLora);
  if (!a.has_value()) return y;
  auto t = [&](int j) { return lora.get(i * kPerLora + j).value(); };
  return lora_rows_op().call(y, x, *a, t(1), t(2), t(3), t(4));
}

at::Tensor encoder_layer(const at::Tensor& x, const at::Tensor& mask, bool packed, int64_t heads,
                         at::TensorList lins, const OptList& lora, at::TensorList ln, double eps) {
  TORCH_CHECK(lins.size() == kLinears * kPerLinear, "encoder_layer: linears must hold ", kLinears * kPerLinear,
              " tensors (w_q, packed, sums, scale, bias for q, k, v, o, ff1, ff2)");
  TORCH_CHECK(lora.size() == kLinears * kPerLora, "encoder_layer: lora must hold ", kLinears * kPerLora,
              " entries (A, Bt, row_patch, rank_offsets, scales or Nones, per linear)");
  TORCH_CHECK(ln.size() == 4, "encoder_layer: ln must hold ln1's weight and bias, then ln2's");
  TORCH_CHECK(x.dim() == (packed ? 2 : 3), "encoder_layer: x must be ", packed ? "(N, D)" : "(B, T, D)");
  const int64_t D = x.size(-1), Dh = D / heads;
  TORCH_CHECK(heads > 0 && Dh * heads == D, "encoder_layer: ", heads, " heads do not divide D = ", D);
  at::Tensor a;
  if (packed) {
    auto split = [&](const at::Tensor& t) { return t.view({-1, heads, Dh}); };
    a = attention_op(true).call(split(linear(x, lins, lora, 0)), split(linear(x, lins, lora, 1)),
                                split(linear(x, lins, lora, 2)), mask);
    a = a.view({-1, D});
  } else {
    const int64_t B = x.size(0), T = x.size(1);
    auto split = [&](const at::Tensor& t) { return t.view({B, T, heads, Dh}).transpose(1, 2); };
    a = attention_op(false).call(split(linear(x, lins, lora, 0)), split(linear(x, lins, lora, 1)),
                                 split(linear(x, lins, lora, 2)), mask);
    a = a.transpose(1, 2).reshape({B, T, D});
  }
  at::Tensor o = linear(a, lins, lora, 3);
  a.reset();  // each intermediate freed as soon as the Python path frees it: the same peak
  const at::Tensor h = at::layer_norm(at::add(x, o), {D}, ln[0], ln[1], eps);
  o.reset();
  at::Tensor f = at::gelu(linear(h, lins, lora, 4));
  at::Tensor y = linear(f, lins, lora, 5);
  f.reset();
  return at::layer_norm(at::add(h, y), {D}, ln[2], ln[3], eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(edge_tune, CPU, m) { m.impl("encoder_layer", &encoder_layer); }
