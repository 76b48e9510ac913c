"""Our encoder against transformers' BertModel (fp32), and the quantized bases against fp32."""

import pytest
import torch

from edge_tune.base import load_base


@pytest.fixture(scope="module")
def base_fp32():
    return load_base(precision="fp32")


def test_fp32_encoder_matches_transformers(base_fp32, ids_mask):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(base_fp32.model_dir), local_files_only=True).eval()
    ids, mask = ids_mask
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = base_fp32.model.encoder(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)  # measured 4.3e-6, values up to 6


@pytest.mark.parametrize(("precision", "min_cos"), [("int8", 0.99), ("int4", 0.9)])
def test_quantized_pooled_features_close_to_fp32(base_fp32, ids_mask, precision, min_cos):
    q = load_base(precision=precision)
    with torch.no_grad():
        ref, got = base_fp32.model.pool(*ids_mask), q.model.pool(*ids_mask)
    assert torch.nn.functional.cosine_similarity(ref, got).min() >= min_cos


def test_fingerprint_is_stable_and_precision_independent(base_fp32, base_int8):
    assert base_fp32.fingerprint == base_int8.fingerprint == load_base(precision="int4").fingerprint
    assert len(base_int8.fingerprint) == 64


def test_load_base_errors(tmp_path):
    from edge_tune.errors import EdgeTuneError

    with pytest.raises(EdgeTuneError, match="config"):
        load_base(tmp_path)
    with pytest.raises(EdgeTuneError, match="unknown precision"):
        load_base(precision="int3")


@pytest.mark.parametrize("layout", ["contiguous", "heads-transposed"])  # the encoder passes the second
def test_half_saved_attention_gradients_match_sdpa(layout):
    """The training attention (ops.attention, saving fp16 q/k/v; ops.attention_backward recomputing the
    probabilities) gives SDPA's output (to 1e-5: its own exp with the kernels) and its gradients to fp16
    rounding (relative error well under 1%), with padded keys masked; without autograd, the same bits."""
    from edge_tune import model

    g = torch.Generator().manual_seed(0)
    B, H, T, d = 3, 4, 7, 16
    shape = (B, H, T, d) if layout == "contiguous" else (B, T, H, d)
    q, k, v = (torch.randn(*shape, generator=g) * 2 for _ in range(3))
    if layout != "contiguous":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., 5:] = False
    mask[2, ..., 2:] = False
    up = torch.randn(B, H, T, d, generator=g)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask)
        (out * up).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    ref_out, ref = grads(
        lambda a, b, c, m: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=m)
    )
    out, got = grads(model.attention)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model.attention(q, k, v, mask), out)
    for r, x in zip(ref, got, strict=True):
        assert ((x - r).norm() / r.norm()).item() < 3e-3


def test_half_saved_gelu_gradient_matches_gelu():
    from edge_tune.half_saved import _GeluHalfSaved

    h = (torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    ref = torch.autograd.grad(torch.nn.functional.gelu(h).sum(), h)[0]
    got = torch.autograd.grad(_GeluHalfSaved.apply(h).sum(), h)[0]
    assert ((got - ref).norm() / ref.norm()).item() < 1e-3


def test_half_saved_dense_linear_matches_linear_and_saves_a_shared_input_once():
    """A trained fp32 weight's linear: forward bit for bit F.linear's, input gradient exact, weight gradient
    at the fp16-rounded input; q, k and v (one input, three weights) keep one fp16 copy of it."""
    from edge_tune.half_saved import dense_linear

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 9, 32, generator=g) * 2).requires_grad_()
    ws = [torch.randn(24, 32, generator=g).requires_grad_() for _ in range(3)]
    b = torch.randn(24, generator=g).requires_grad_()
    up = torch.randn(4, 9, 24, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [dense_linear(x, w, b) for w in ws]
    for o, w in zip(outs, ws, strict=True):
        assert torch.equal(o, torch.nn.functional.linear(x, w, b))
    halves = {t.data_ptr() for t in saved if t.dtype == torch.float16}
    assert len(halves) == 1 and not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    got = torch.autograd.grad(sum((o * up).sum() for o in outs), [x, *ws, b])
    ref = torch.autograd.grad(sum((torch.nn.functional.linear(x, w, b) * up).sum() for w in ws), [x, *ws, b])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-5)  # input gradient: the same math
    torch.testing.assert_close(got[-1], ref[-1], rtol=1e-6, atol=1e-5)
    for a, r in zip(got[1:4], ref[1:4], strict=True):
        assert 0 < ((a - r).norm() / r.norm()).item() < 1e-3  # at the fp16-rounded input


def test_half_saved_layer_norm_gradients_match_layer_norm():
    from edge_tune.half_saved import layer_norm

    g = torch.Generator().manual_seed(2)
    ln = torch.nn.LayerNorm(48, eps=1e-12)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(48, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(48, generator=g))
    x = (torch.randn(5, 7, 48, generator=g) * 3 + 10).requires_grad_()  # an offset, as residual streams have
    up = torch.randn(5, 7, 48, generator=g)
    ref = torch.autograd.grad((ln(x) * up).sum(), [x, ln.weight, ln.bias])
    out = layer_norm(ln, x)
    assert torch.equal(out, ln(x))
    got = torch.autograd.grad((out * up).sum(), [x, ln.weight, ln.bias])
    for r, v in zip(ref, got, strict=True):
        assert ((v - r).norm() / r.norm()).item() < 3e-3


def test_an_inference_pass_follows_lora_changed_in_place_or_swapped():
    """Inference passes keep LoRA's B^T and row tensors between calls (QuantLinear._one_patch_rows); an
    in-place update (an optimizer step), a swapped tensor, a new scale or more rows must each show in the
    next pass's output, which must equal the term computed afresh."""
    from edge_tune import ops, quant
    from edge_tune.model import QuantLinear

    g = torch.Generator().manual_seed(5)
    lin = QuantLinear(
        quant.quantize(torch.randn(48, 64, generator=g) * 0.05, "int8"), torch.zeros(48), "int8"
    )
    lin.lora_A = torch.nn.Parameter(torch.randn(4, 64, generator=g))
    lin.lora_B = torch.nn.Parameter(torch.randn(48, 4, generator=g))
    lin.lora_scale = 2.0
    x = torch.randn(7, 64, generator=g)

    def fresh(rows):
        base = ops.int8_linear_dynamic(x[:rows], lin.w_q, lin.scale, lin.bias)
        return base + lin.lora_scale * (x[:rows] @ lin.lora_A.detach().t()) @ lin.lora_B.detach().t()

    def check(rows=3):
        with torch.inference_mode():
            got = lin(x[:rows])
        torch.testing.assert_close(got, fresh(rows), rtol=1e-4, atol=1e-4)
        return got

    first = check()
    with torch.no_grad():
        lin.lora_B.mul_(3.0)  # in place, as an optimizer step
    assert not torch.allclose(check(), first)
    lin.lora_A = torch.nn.Parameter(torch.randn(4, 64, generator=g))  # swapped, as a patch activation
    check()
    lin.lora_scale = 0.5
    check()
    check(rows=7)  # more rows than the kept row tensor had
    check(rows=1)


def test_an_inference_pass_takes_lora_made_under_inference_mode():
    """LoRA tensors that are inference tensors (a patch loaded inside torch.inference_mode) carry no version
    counter: the pass must still run, and equal the term computed afresh."""
    from edge_tune import ops, quant
    from edge_tune.model import QuantLinear

    g = torch.Generator().manual_seed(6)
    lin = QuantLinear(
        quant.quantize(torch.randn(48, 64, generator=g) * 0.05, "int8"), torch.zeros(48), "int8"
    )
    a, b, x = (
        torch.randn(4, 64, generator=g),
        torch.randn(48, 4, generator=g),
        torch.randn(5, 64, generator=g),
    )
    with torch.inference_mode():
        lin.lora_A, lin.lora_B = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
        lin.lora_scale = 2.0
        assert lin.lora_A.is_inference()
        for _ in range(2):
            got = lin(x)
            want = ops.int8_linear_dynamic(x, lin.w_q, lin.scale, lin.bias) + 2.0 * (x @ a.t()) @ b.t()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights", ["int8 prepacked", "int8", "int4"])
def test_inference_layers_run_as_one_op_with_the_op_by_op_bits(monkeypatch, weights):
    """In inference mode an int8 or int4 layer runs as one ops.encoder_layer call (the same ops, chained in
    C++), padded and packed, with LoRA from the slot (a fine-tuned patch) or by row (a mixed pass), int8
    weights packed (serving) or not (a training process's evaluation): logits bit for bit those of the
    op-by-op path. A slot the op does not apply (IA3's scale) sends that layer op by op."""
    from edge_tune import model as M
    from edge_tune import ops

    torch.manual_seed(0)
    model = M.skeleton(M.BertConfig(num_hidden_layers=3), weights.split()[0]).eval()
    q, v = model.encoder.layers[0].q, model.encoder.layers[0].v
    for lin in (q, v):
        lin.lora_A = torch.nn.Parameter(torch.randn(4, 384) * 0.1)
        lin.lora_B = torch.nn.Parameter(torch.randn(384, 4) * 0.1)
        lin.lora_scale = 2.0
    model.encoder.layers[1].o.bias.data += 0.5  # a BitFit-like change: the op reads the slot
    model.encoder.layers[2].o.in_scale = torch.nn.Parameter(torch.rand(384) + 0.5)  # IA3: op by op
    if weights == "int8 prepacked":
        M.prepack_linears(model)
    ids = torch.randint(0, 1000, (3, 9))
    mask = (torch.arange(9)[None, :] < torch.tensor([[9], [4], [1]])).long()
    ff1 = model.encoder.layers[1].ff1
    rows = {False: 27, True: 14}  # ops.lora_rows' arguments by row: A (R, in), B^T (R, out), each row's patch
    terms = lambda n: (torch.randn(12, 384) * 0.1, torch.randn(12, 1536) * 0.1, torch.arange(n) % 2,  # noqa: E731
                       torch.tensor([0, 4, 12]), torch.tensor([1.0, 0.5]))  # fmt: skip
    calls = []
    real_op = ops.encoder_layer
    monkeypatch.setattr(ops, "encoder_layer", lambda *a: calls.append(1) or real_op(*a))

    def passes():
        out = []
        for packed in (False, True):
            torch.manual_seed(1)
            ff1.lora_rows = terms(rows[packed])
            with torch.inference_mode():
                out.append(model(ids, mask, packed=packed))
            ff1.lora_rows = None
        return out

    fused = passes()
    assert len(calls) == 4  # layers 0 and 1, padded and packed; layer 2 (IA3) op by op
    monkeypatch.setattr(M.EncoderLayer, "_fused_args", lambda self, x: None)
    for got, want in zip(fused, passes(), strict=True):
        assert torch.equal(got, want)
    assert len(calls) == 4
