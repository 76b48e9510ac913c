"""The base as one ONNX graph, exported once, with every tensor a row-mixable patch can change as a named
optional input: switching tasks on ONNX Runtime is activating an adapter file (`runtime.py`), never a
re-export or a new session.

The graph is written node by node from the loaded base (not traced), so it holds exactly this project's
encoder: int8 weights (`com.microsoft.DynamicQuantizeMatMul`: activations quantized per tensor at run time,
weights per output channel) or fp32 ones, the same embeddings, mean pooling and head. Patch inputs, each
with the base's value as its default so the graph with no adapter is the base exactly:

- every linear's `bias` and every LayerNorm's `bias` (BitFit): default the base's;
- every linear's `lora_A` / `lora_B`, stored transposed, B scaled by alpha / r: `lora_A` (in, r), `lora_B`
  (r, out), default rank 0; their matmuls stay fp32 (never quantized);
- `k.out_scale`, `v.out_scale`, `ff2.in_scale` (IA3): default ones;
- `encoder.prompt` (P, D) (prompt tuning, P-tuning) and every layer's `prefix` (2, P, D): default P = 0;
- `head.weight` (L, D) / `head.bias` (L,): default a zero 2-class head (uniform probabilities);
- `edge_tune.manifest` (uint8): the active adapter's manifest, echoed as an output.

Outputs: `probabilities` (B, L), `logits` (B, L), `features` (B, D) mean-pooled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .base import Base
from .errors import EdgeTuneError
from .ops import ACT_LEVELS

FORMAT = "edge_tune.onnx"
FORMAT_VERSION = 1
OPSET = 17
LINEARS = ("q", "k", "v", "o", "ff1", "ff2")
OUT_SCALED, IN_SCALED = ("k", "v"), ("ff2",)  # methods/ia3.py's placement
ACTIVATIONS = "token"


def graph_id(base_fingerprint: str) -> int:
    """The adapters' model version: 31 bits of the base fingerprint (ONNX Runtime keeps it as an int)."""
    return int(base_fingerprint[:8], 16) & 0x7FFFFFFF


class _Graph:
    """Nodes, initializers and inputs of one ONNX graph, each output named after its role."""

    def __init__(self):
        from onnx import helper

        self.h, self.nodes, self.inits, self.inputs, self.n = helper, [], [], [], 0

    def init(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def patch_input(self, name: str, default: np.ndarray, dims: list) -> str:
        """A graph input `name` whose default (an initializer of the same name) is `default`."""
        from onnx import TensorProto

        dtype = TensorProto.UINT8 if default.dtype == np.uint8 else TensorProto.FLOAT
        self.inputs.append(self.h.make_tensor_value_info(name, dtype, dims))
        return self.init(name, default)

    def op(self, op: str, *inputs: str, domain: str | None = None, **attrs) -> str:
        self.n += 1
        out = f"{op.lower()}_{self.n}"
        self.nodes.append(self.h.make_node(op, list(inputs), [out], domain=domain, **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        self.n += 1
        return self.init(f"const_{self.n}", np.asarray(value, dtype=dtype))


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _linear(g: _Graph, lin, prefix: str, x: str, name: str) -> str:
    """One QuantLinear: (x * in_scale) W^T + bias + (x A^T) B^T s, then * out_scale."""
    D_in, D_out = lin.in_features, lin.out_features
    if name in IN_SCALED:
        x = g.op("Mul", x, g.patch_input(f"{prefix}.in_scale", np.ones(D_in, np.float32), [D_in]))
    if lin.precision == "int8" and ACTIVATIONS == "token":
        y = _int8_per_token(g, lin, prefix, x)
    elif lin.precision == "int8":
        w_t = g.init(f"{prefix}.w_q_t", lin.w_q.t().contiguous().numpy())
        y = g.op("DynamicQuantizeMatMul", x, w_t, g.init(f"{prefix}.scale", _f32(lin.scale)),
                 g.init(f"{prefix}.zero_point", np.zeros(D_out, np.int8)), domain="com.microsoft")  # fmt: skip
    else:
        y = g.op("MatMul", x, g.init(f"{prefix}.weight_t", _f32(lin.weight.t())))
    y = g.op("Add", y, g.patch_input(f"{prefix}.bias", _f32(lin.bias), [D_out]))
    a = g.patch_input(f"{prefix}.lora_A", np.zeros((D_in, 0), np.float32), [D_in, "rank"])
    b = g.patch_input(f"{prefix}.lora_B", np.zeros((0, D_out), np.float32), ["rank", D_out])
    y = g.op("Add", y, g.op("MatMul", g.op("MatMul", x, a), b))
    if name in OUT_SCALED:
        y = g.op("Mul", y, g.patch_input(f"{prefix}.out_scale", np.ones(D_out, np.float32), [D_out]))
    return y


def _int8_per_token(g: _Graph, lin, prefix: str, x: str) -> str:
    """ops.int8_linear_dynamic in ONNX ops: each token quantized to 7 bits over its own range (holding 0),
    an exact integer product (MatMulInteger), the zero point taken off with the weight's column sums."""
    f = lambda v: g.const(v, np.float32)  # noqa: E731
    lo = g.op("Min", g.op("ReduceMin", x, axes=[-1], keepdims=1), f(0.0))
    hi = g.op("Max", g.op("ReduceMax", x, axes=[-1], keepdims=1), f(0.0))
    sx = g.op("Div", g.op("Sub", hi, lo), f(ACT_LEVELS))
    sx = g.op("Where", g.op("Greater", sx, f(0.0)), sx, f(1.0))
    zp = g.op("Round", g.op("Div", g.op("Neg", lo), sx))
    xu = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", x, sx)), zp), f(0.0), f(ACT_LEVELS))
    acc = g.op(
        "MatMulInteger", g.op("Cast", xu, to=2), g.init(f"{prefix}.w_q_t", lin.w_q.t().contiguous().numpy())
    )
    col_sum = g.init(f"{prefix}.w_q_colsum", lin.w_q.sum(1, dtype=torch.int64).float().numpy())
    y = g.op("Sub", g.op("Cast", acc, to=1), g.op("Mul", zp, col_sum))
    return g.op("Mul", g.op("Mul", y, sx), g.init(f"{prefix}.scale", _f32(lin.scale)))


def _layer_norm(g: _Graph, ln, prefix: str, x: str) -> str:
    w = g.init(f"{prefix}.weight", _f32(ln.weight))
    b = g.patch_input(f"{prefix}.bias", _f32(ln.bias), [ln.weight.shape[0]])
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=float(ln.eps))


def _ones_rows(g: _Graph, batch: str, rows: str) -> str:
    """(B, rows) int64 ones: the mask of prompt or prefix positions."""
    return g.op("ConstantOfShape", g.op("Concat", batch, rows, axis=0),
                value=g.h.make_tensor("one", 7, [1], [1]))  # fmt: skip


def build_graph(base: Base):
    """The ONNX model of `base` (fp32 or int8), patch tensors as optional inputs (see the module doc)."""
    from onnx import TensorProto

    if base.precision not in ("fp32", "int8"):
        raise EdgeTuneError(
            f"an {base.precision} base does not export to ONNX", None, "use --precision int8 or fp32"
        )
    cfg, enc = base.config, base.model.encoder
    D, H = cfg.hidden_size, cfg.num_attention_heads
    g = _Graph()
    g.inputs += [g.h.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
                 g.h.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"])]  # fmt: skip
    zero, one = g.const([0]), g.const([1])
    batch = g.op("Slice", g.op("Shape", "input_ids"), zero, one)  # (1,) int64: B
    # embeddings: the int8 table is gathered as int8 rows and scaled (the table stays 11.7 MB, not 47)
    if enc.word.precision == "int8":
        rows = g.op("Cast", g.op("Gather", g.init("word.w_q", enc.word.w_q.numpy()), "input_ids"), to=1)
        scale = g.op("Unsqueeze", g.op("Gather", g.init("word.scale", _f32(enc.word.scale)), "input_ids"), g.const([-1]))  # fmt: skip
        emb = g.op("Mul", rows, scale)
    else:
        emb = g.op("Gather", g.init("word.weight", _f32(enc.word.weight)), "input_ids")
    prompt = g.patch_input("encoder.prompt", np.zeros((0, D), np.float32), ["prompt_tokens", D])
    P = g.op("Slice", g.op("Shape", prompt), zero, one)
    emb = g.op("Concat", g.op("Expand", prompt, g.op("Concat", batch, P, g.const([D]), axis=0)), emb, axis=1)
    mask = g.op("Concat", _ones_rows(g, batch, P), "attention_mask", axis=1)
    T = g.op("Slice", g.op("Shape", emb), one, g.const([2]))
    pos = g.op("Slice", g.init("pos", _f32(enc.pos)), zero, T, zero)
    x = _layer_norm(
        g, enc.emb_ln, "encoder.emb_ln", g.op("Add", g.op("Add", emb, pos), g.init("typ", _f32(enc.typ)))
    )
    heads = g.const([0, 0, H, D // H])
    for i, layer in enumerate(enc.layers):
        p = f"encoder.layers.{i}"
        q, k, v = (_linear(g, getattr(layer, t), f"{p}.{t}", x, t) for t in ("q", "k", "v"))
        prefix = g.patch_input(f"{p}.prefix", np.zeros((2, 0, D), np.float32), [2, f"prefix_tokens_{i}", D])
        Pp = g.op("Slice", g.op("Shape", prefix), one, g.const([2]))
        shape = g.op("Concat", batch, Pp, g.const([D]), axis=0)
        pk, pv = (g.op("Expand", g.op("Gather", prefix, g.const(j), axis=0), shape) for j in (0, 1))
        k, v = g.op("Concat", pk, k, axis=1), g.op("Concat", pv, v, axis=1)
        key_mask = g.op("Cast", g.op("Concat", _ones_rows(g, batch, Pp), mask, axis=1), to=1)
        # -1e9 where a key is padding: its exp underflows to exactly 0 (the kernel's masking)
        bias = g.op("Mul", g.op("Sub", g.const(1.0, np.float32), key_mask), g.const(-1e9, np.float32))
        bias = g.op("Unsqueeze", bias, g.const([1, 2]))
        split = lambda t: g.op("Transpose", g.op("Reshape", t, heads), perm=[0, 2, 1, 3])  # noqa: E731
        scores = g.op("MatMul", split(q), g.op("Transpose", g.op("Reshape", k, heads), perm=[0, 2, 3, 1]))
        scores = g.op("Add", g.op("Mul", scores, g.const(1 / math.sqrt(D // H), np.float32)), bias)
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), split(v))
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, D]))
        x = _layer_norm(g, layer.ln1, f"{p}.ln1", g.op("Add", x, _linear(g, layer.o, f"{p}.o", ctx, "o")))
        h = _linear(g, layer.ff1, f"{p}.ff1", x, "ff1")
        # exact GELU, 0.5 h (1 + erf(h / sqrt 2)), as the base's
        h = g.op("Mul", g.op("Mul", h, g.const(0.5, np.float32)),
                 g.op("Add", g.op("Erf", g.op("Div", h, g.const(math.sqrt(2), np.float32))), g.const(1.0, np.float32)))  # fmt: skip
        x = _layer_norm(g, layer.ln2, f"{p}.ln2", g.op("Add", x, _linear(g, layer.ff2, f"{p}.ff2", h, "ff2")))
    x = g.op("Slice", x, P, g.const([2**62]), one)  # the sentence's own tokens
    m = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=1), g.const([-1]))
    count = g.op("Max", g.op("ReduceSum", m, one, keepdims=0), g.const(1.0, np.float32))
    g.nodes.append(
        g.h.make_node("Div", [g.op("ReduceSum", g.op("Mul", x, m), one, keepdims=0), count], ["features"])
    )
    hw = g.patch_input("head.weight", np.zeros((2, D), np.float32), ["labels", D])
    hb = g.patch_input("head.bias", np.zeros(2, np.float32), ["labels"])
    g.nodes.append(g.h.make_node("Gemm", ["features", hw, hb], ["logits"], transB=1))
    g.nodes.append(g.h.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    g.patch_input("edge_tune.manifest", np.zeros(0, np.uint8), ["manifest_bytes"])
    g.nodes.append(g.h.make_node("Identity", ["edge_tune.manifest"], ["manifest"]))
    outputs = [g.h.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "labels"]),
               g.h.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "labels"]),
               g.h.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", D]),
               g.h.make_tensor_value_info("manifest", TensorProto.UINT8, ["manifest_bytes"])]  # fmt: skip
    graph = g.h.make_graph(g.nodes, "edge_tune_base", g.inputs, outputs, g.inits)
    model = g.h.make_model(graph, opset_imports=[g.h.make_opsetid("", OPSET), g.h.make_opsetid("com.microsoft", 1)],
                           producer_name="edge_tune")  # fmt: skip
    model.ir_version = 9
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_fingerprint": base.fingerprint,
            "precision": base.precision, "graph_id": graph_id(base.fingerprint),
            "max_tokens": cfg.max_position_embeddings}  # fmt: skip
    g.h.set_model_props(model, {"edge_tune": json.dumps(meta, sort_keys=True)})
    return model


def export_base(base: Base, out: Path, model=None) -> Path:
    """Write `out`/model.onnx (`model`, default the base's graph) and `out`/tokenizer.json (the base's);
    returns the model's path."""
    import shutil

    import onnx

    from .patch import atomic_write

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeTuneError(f"cannot create the folder ({e.strerror})", out) from None
    model = model or build_graph(base)
    onnx.checker.check_model(model)
    atomic_write(out / "model.onnx", model.SerializeToString())
    shutil.copyfile(base.model_dir / "tokenizer.json", out / "tokenizer.json")
    return out / "model.onnx"


def export_onnx(out: str | Path, patches: list[str], precision: str = "int8") -> list[Path]:
    """`edge-tune export --format onnx`: the base graph once, and each patch as an ONNX Runtime adapter
    file `out`/<task>.onnx_adapter (checked before anything is written). Returns the files written."""
    from .base import load_base
    from .runtime import patch_to_params, write_adapter

    if precision not in ("int8", "fp32"):
        raise EdgeTuneError(f"--precision {precision} does not export to ONNX", None, "use int8 or fp32")
    base = load_base(precision=precision)
    model = build_graph(base)
    inputs = {i.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim)
              for i in model.graph.input}  # fmt: skip
    converted = [patch_to_params(p, inputs, base.fingerprint) for p in patches]
    names = [m["task"] or Path(p).stem for (m, _), p in zip(converted, patches, strict=True)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgeTuneError(
            f"two patches would both write {dup[0]}.onnx_adapter", None, "export them to separate folders"
        )
    out = Path(out)
    written = [export_base(base, out, model), out / "tokenizer.json"]
    for (manifest, params), name in zip(converted, names, strict=True):
        write_adapter(out / f"{name}.onnx_adapter", manifest, params, graph_id(base.fingerprint))
        written.append(out / f"{name}.onnx_adapter")
    return written
