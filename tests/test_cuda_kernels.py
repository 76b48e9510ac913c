"""cpp_ext/cuda_kernels.cu against the references of op_references.py (run on CPU), across MiniLM's shapes, odd sizes,
the few-row and many-row paths and an empty batch; opcheck and gradients on CUDA tensors. Skipped where
torch has no CUDA device (the CI machine): run it on a GPU machine with
`python -m pytest tests/test_cuda_kernels.py`."""

import pytest
import torch
from test_ops import encoder_layer_args

from edge_tune import ops, quant
from edge_tune.kernels import fallback_reason, load_kernels

HAS_CUDA = torch.cuda.is_available()
LOADED = HAS_CUDA and load_kernels()
pytestmark = pytest.mark.skipif(
    not LOADED, reason="no CUDA device" if not HAS_CUDA else f"kernels off: {fallback_reason()}"
)
SHAPES = [(384, 1536), (1536, 384), (64, 96), (32, 33), (30, 17)]  # (in K, out N)
ROWS = [0, 1, 8, 17, 300]  # the one-warp-per-output path (<= 16 rows), the GEMM path, an empty batch


def _case(k, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    gy = torch.randn(m, n, generator=g)
    A, B = torch.randn(8, k, generator=g) * 0.1, torch.randn(n, 8, generator=g) * 0.1
    return w, bias, x, gy, A, B


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_cuda_linears_match_references(k, n, m):
    w, bias, x, gy, A, B = _case(k, n, m)
    q8, s8 = quant.quantize_int8(w)
    for b in (bias, None):
        want = ops.int8_linear_ref(x, q8, s8, b)
        got = ops.int8_linear(*_cuda(x, q8, s8, b))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
        # integer dot products are exact; only the float epilogue may round differently
        want = ops.int8_linear_dynamic_ref(x, q8, s8, b)
        torch.testing.assert_close(
            ops.int8_linear_dynamic(*_cuda(x, q8, s8, b)).cpu(), want, rtol=1e-5, atol=1e-4
        )
        want = ops.lora_linear_ref(x, q8, s8, b, A, B, 2.0)
        got = ops.lora_linear(*_cuda(x, q8, s8, b, A, B), 2.0)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.int8_linear_grad_input(*_cuda(gy, q8, s8)).cpu(), gy @ quant.dequantize_int8(q8, s8),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    want = ops.int8_linear_dynamic_grad_input_ref(gy, q8, s8)
    got = ops.int8_linear_dynamic_grad_input(*_cuda(gy, q8, s8))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    if k % 32 == 0:  # int4 packs groups of 32 along K
        q4, s4 = quant.quantize_int4(w)
        for b in (bias, None):
            want = ops.int4_linear_ref(x, q4, s4, b)
            torch.testing.assert_close(
                ops.int4_linear(*_cuda(x, q4, s4, b)).cpu(), want, rtol=1e-4, atol=1e-4
            )
        want = gy @ quant.dequantize_int4(q4, s4)
        got = ops.int4_linear_grad_input(*_cuda(gy, q4, s4))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 7), (2, 1, 5)])
def test_cuda_embeddings_match_references(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 384, generator=g)
    (q8, s8), (q4, s4) = quant.quantize_int8(w), quant.quantize_int4(w)
    ids = torch.randint(0, 1000, shape, generator=g)
    assert torch.equal(ops.int8_embedding(*_cuda(ids, q8, s8)).cpu(), ops.int8_embedding_ref(ids, q8, s8))
    assert torch.equal(ops.int4_embedding(*_cuda(ids, q4, s4)).cpu(), ops.int4_embedding_ref(ids, q4, s4))


def test_cuda_dynamic_int8_marks_non_finite_rows():
    w, bias, x, _, _, _ = _case(384, 96, 4)
    q8, s8 = quant.quantize_int8(w)
    x[2, 7] = float("nan")
    y = ops.int8_linear_dynamic(*_cuda(x, q8, s8, bias)).cpu()
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("m", [1, 40])
def test_cuda_gradients_match_cpu(m):
    """Autograd through each linear op on CUDA equals the same op on CPU: input, bias and LoRA factors."""
    w, bias, x, gy, A, B = _case(384, 1536, m, seed=2)
    q8, s8 = quant.quantize_int8(w)
    q4, s4 = quant.quantize_int4(w)
    cases = [
        (ops.int8_linear, (q8, s8), ()),
        (ops.int8_linear_dynamic, (q8, s8), ()),
        (ops.int4_linear, (q4, s4), ()),
        (ops.lora_linear, (q8, s8), (A, B)),
    ]
    for op, frozen, factors in cases:
        grads = []
        for dev in ("cpu", "cuda"):
            leaves = [t.to(dev).requires_grad_() for t in (x, bias, *factors)]
            extra = (*leaves[2:], 2.0) if factors else ()
            y = op(leaves[0], *(t.to(dev) for t in frozen), leaves[1], *extra)
            grads.append([t.cpu() for t in torch.autograd.grad(y, leaves, gy.to(dev))])
        for c, g in zip(*grads, strict=True):
            torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-4 * c.abs().max().item())


def test_cuda_opcheck():
    w, bias, x, gy, A, B = _case(64, 48, 5, seed=3)
    q8, s8 = quant.quantize_int8(w)
    q4, s4 = quant.quantize_int4(w)
    ids = torch.tensor([[0, 3, 5], [47, 1, 0]])
    e8, e4 = quant.quantize_int8(w), quant.quantize_int4(w)
    qkv = [torch.randn(2, 3, 5, 8) for _ in range(3)]
    keys = torch.tensor([[True] * 5, [True, True, True, False, False]])
    samples = {
        "int8_linear": (x, q8, s8, bias),
        "int8_linear_dynamic": (x, q8, s8, bias),
        "int8_pack_weight": (q8,),  # no CUDA kernels for these two: references on CUDA tensors
        "int8_linear_dynamic_packed": (x, q8, *ops.int8_pack_weight(q8), s8, bias),
        "lora_linear": (x, q8, s8, bias, A, B, 2.0),
        "int4_linear": (x, q4, s4, bias),
        "int4_linear_dynamic": (x, q4, s4, bias),  # no CUDA kernel: the reference runs on CUDA tensors
        "int8_linear_grad_input": (gy, q8, s8),
        "int8_linear_dynamic_grad_input": (gy, q8, s8),
        "int4_linear_grad_input": (gy, q4, s4),
        "int8_embedding": (ids, *e8),
        "int4_embedding": (ids, *e4),
        "lora_linear_backward": (gy, x, A, B, 2.0, torch.randn(5, 64)),
        "lora_rows": (
            gy,
            x,
            A,
            B.t().contiguous(),
            torch.tensor([1, 0, 1, 1, 0]),
            torch.tensor([0, 2, 4]),
            torch.tensor([2.0, 0.5]),
        ),  # fmt: skip
        "attention": (*qkv, keys),  # no CUDA kernels for these: the references run on CUDA tensors
        "attention_packed": (*(torch.randn(7, 3, 8) for _ in range(3)), torch.tensor([0, 3, 7])),
        "attention_backward": (torch.randn(2, 3, 5, 8), *qkv, keys),
        "half_saturated": (gy,),
        "gelu_backward_half": (gy, ops.half_saturated(gy * 3)),
        "encoder_layer": encoder_layer_args(),  # no CUDA kernel (CPU inference only): the reference
    }
    assert set(samples) == set(ops.ALL_OPS)
    for name, args in samples.items():
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        args = [
            [t.cuda() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a
            for a in args
        ]
        args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and i in (0, 3, 4, 5)
                and "grad_input" not in name and "embedding" not in name and "gelu" not in name
                and "attention" not in name and "packed" not in name and name not in ("lora_rows", "lora_linear_backward", "encoder_layer") else a for i, a in enumerate(args)]  # fmt: skip
        torch.library.opcheck(ops.ALL_OPS[name], args)


@pytest.mark.parametrize("method", ["bitfit", "lora"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_model_step_matches_cpu(method, precision):
    """A whole (small, random) model on CUDA: the logits and every trainable gradient of one step equal
    the CPU model's. Random weights (model.skeleton): this machine may not have the packaged MiniLM."""
    import copy

    from edge_tune.methods import MethodSpec, apply_method
    from edge_tune.model import BertConfig, skeleton

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=300, num_hidden_layers=2, max_position_embeddings=40)
    cpu = skeleton(cfg, precision)
    apply_method(cpu, MethodSpec(method, rank=4, targets=("q", "v", "ff2")))
    with torch.no_grad():  # non-zero LoRA B, so that every factor gets a gradient
        for name, p in cpu.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(0, 300, (5, 33))
    mask = torch.ones(5, 33, dtype=torch.long)
    mask[1, 20:] = 0
    results = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        model.eval()  # no dropout: the two devices draw different masks
        logits = model(ids.to(dev), mask.to(dev))
        logits.square().sum().backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach().cpu(), grads))
    (lc, gc), (lg, gg) = results
    torch.testing.assert_close(lg, lc, rtol=1e-3, atol=1e-3)
    assert gc.keys() == gg.keys() and gc
    for name in gc:
        torch.testing.assert_close(
            gg[name], gc[name], rtol=1e-2, atol=1e-2 * gc[name].abs().max().item() + 1e-6
        )
