"""The model: a short, plain-PyTorch BERT encoder over quantized frozen weights, mean pooling, and a
classification head. Shapes: B = batch, T = tokens, D = hidden (384), H = heads (12)."""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .half_saved import attention, dense_linear, gelu, layer_norm
from .recompute import ANCHOR, Recompute

# How the int8 and int4 bases treat activations: "dynamic" quantizes them per token to 7 bits and
# multiplies in integers (ops.int8_linear_dynamic / lora_linear / int4_linear_dynamic, the fast path); "fp32"
# keeps them in fp32 against the dequantized weight (ops.int8_linear / int4_linear).
# EDGE_TUNE_INT8_ACTIVATIONS picks; README "Ops" gives the trade-off.
INT8_ACTIVATIONS = os.environ.get("EDGE_TUNE_INT8_ACTIVATIONS", "dynamic")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class QuantLinear(nn.Module):
    """A frozen linear layer stored quantized, with the slots the delta methods train or swap: `bias`
    (BitFit), a low-rank term `lora_A` (r, in) / `lora_B` (out, r) / `lora_scale` (LoRA, alpha / r), scales
    of the input `in_scale` (in,) and of the output `out_scale` (out,) (IA3), a bottleneck added to the
    output `adapter_down` (m, out) / `adapter_up` (out, m) with their biases (adapters), and an fp32 weight
    `weight_full` (out, in) that replaces the quantized one (partial and full fine-tuning).
    The frozen weight is a buffer, never a Parameter, so no method can make it trainable by mistake."""

    def __init__(self, buffers: dict[str, Tensor], bias: Tensor, precision: str):
        super().__init__()
        self.precision = precision
        for k, v in buffers.items():
            self.register_buffer(k, v)
        self.out_features = bias.shape[0]
        stored = buffers.get("weight", buffers.get("w_q"))
        self.in_features = stored.shape[1] * (2 if precision == "int4" else 1)
        self.bias = nn.Parameter(bias.float().contiguous(), requires_grad=False)
        # Registered as (empty) parameter slots so that attaching, detaching and swapping all go through
        # the same place: `_parameters`.
        self.register_parameter("lora_A", None)  # (r, in)
        self.register_parameter("lora_B", None)  # (out, r)
        self.lora_scale = 0.0
        self.register_parameter("in_scale", None)  # (in,): multiplies the input
        self.register_parameter("out_scale", None)  # (out,): multiplies the output, bias included
        for slot in ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias", "weight_full"):
            self.register_parameter(slot, None)
        # LoRA for a packed batch that mixes patches (ops.lora_rows): every patch's A stacked (R, in) and B^T
        # stacked (R, out), each packed token's patch (N,), each patch's ranks as offsets into the stack
        # (P + 1,) and its alpha / r (P,).
        self.lora_rows: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None
        self._one_patch: tuple | None = None  # _one_patch_rows' tensors and what they were made from
        # The int8 weight packed once for the kernels' panels (prepack_linears), used by passes without
        # autograd; not state: never saved, made again in each process (the layout is the CPU's).
        self.packed: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        # Slots read from the dicts, not as attributes: nn.Module.__getattr__ costs ~0.3 µs a lookup, ~12 a
        # call, 36 linears a pass (~5% of a one-sentence prediction).
        p, buf = self._parameters, self._buffers
        if p["in_scale"] is not None:
            x = x * p["in_scale"]
        lora_a, lora_done = p["lora_A"], False
        # inference-mode passes (every prediction) add LoRA's term by ops.lora_rows, as mixed passes do: the
        # same bits batched or alone. Training's, checkpointing's no-grad one too, keep lora_linear's.
        inference = x.is_cpu and torch.is_inference_mode_enabled()
        if p["weight_full"] is not None:
            y = dense_linear(x, p["weight_full"], p["bias"])
        elif self.precision == "int8" and INT8_ACTIVATIONS == "dynamic":
            w_q, scale, bias = buf["w_q"], buf["scale"], p["bias"]
            if self.packed is not None and x.is_cpu and not torch.is_grad_enabled():
                y = ops.int8_linear_dynamic_packed(x, w_q, *self.packed, scale, bias)
            elif lora_a is not None and not inference:
                y, lora_done = ops.lora_linear(x, w_q, scale, bias, lora_a, p["lora_B"],
                                               float(self.lora_scale)), True  # fmt: skip
            else:
                y = ops.int8_linear_dynamic(x, w_q, scale, bias)
        elif self.precision == "int8":
            y = ops.int8_linear(x, buf["w_q"], buf["scale"], p["bias"])
        elif self.precision == "int4" and INT8_ACTIVATIONS == "dynamic":
            y = ops.int4_linear_dynamic(x, buf["w_q"], buf["scale"], p["bias"])
        elif self.precision == "int4":
            y = ops.int4_linear(x, buf["w_q"], buf["scale"], p["bias"])
        else:
            y = nn.functional.linear(x, buf["weight"], p["bias"])
        if lora_a is not None and not lora_done:
            if inference:
                y = ops.lora_rows(y, x, lora_a, *self._one_patch_rows(x, lora_a, p["lora_B"]))
            else:
                y = ops.add_lora_term(y, x, lora_a, p["lora_B"], float(self.lora_scale))
        if self.lora_rows is not None:
            y = ops.lora_rows(y, x, *self.lora_rows)  # each row its own patch's term
        if p["out_scale"] is not None:
            y = y * p["out_scale"]
        if p["adapter_down"] is not None:
            z = F.relu(F.linear(y, p["adapter_down"], p["adapter_down_bias"]))
            y = y + F.linear(z, p["adapter_up"], p["adapter_up_bias"])
        return y

    def _one_patch_rows(self, x: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ops.lora_rows' B^T, row patches, rank offsets and scale for every row of x under this linear's
        LoRA (A = a, B = b, as forward read them). Kept until A, B (the same tensors, not changed in place
        since: their version counters) or the scale change, or more rows come: making them each call was
        ~7% of a one-sentence prediction. Inference tensors (made under torch.inference_mode) have no
        version counter: made afresh."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        scale = float(self.lora_scale)
        key = None if a.is_inference() or b.is_inference() else (a._version, b._version, scale)
        c = self._one_patch
        if (
            key is None
            or c is None
            or c[0]() is not a
            or c[1]() is not b
            or c[2] != key
            or c[4].shape[0] < rows
        ):
            made = (b.t().contiguous(), torch.zeros(max(rows, 64), dtype=torch.long),
                    torch.tensor([0, a.shape[0]]), torch.tensor([scale]))  # fmt: skip
            c = (weakref.ref(a), weakref.ref(b), key, *made)
            self._one_patch = c if key is not None else None
        return c[3], c[4][:rows], c[5], c[6]

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_A.shape[0]}" if self.lora_A is not None else ""
        return f"in={self.in_features}, out={self.out_features}, precision={self.precision}{lora}"


class QuantEmbedding(nn.Module):
    """A frozen embedding table stored quantized row by row; lookups dequantize only the rows used.
    `weight_full` (vocab, D) fp32, when set, replaces it (full fine-tuning)."""

    def __init__(self, buffers: dict[str, Tensor], precision: str):
        super().__init__()
        self.precision = precision
        for k, v in buffers.items():
            self.register_buffer(k, v)
        self.register_parameter("weight_full", None)

    def forward(self, ids: Tensor) -> Tensor:
        if self.weight_full is not None:
            # sparse: the gradient holds the looked-up rows only, not a (vocab, D) table (optim.AdamW)
            return F.embedding(ids, self.weight_full, sparse=True)
        if self.precision == "int8":
            return ops.int8_embedding(ids, self.w_q, self.scale)
        if self.precision == "int4":
            return ops.int4_embedding(ids, self.w_q, self.scale)
        return nn.functional.embedding(ids, self.weight)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig, q, k, v, o, ln1, ff1, ff2, ln2):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.q, self.k, self.v, self.o = q, k, v, o
        self.ln1, self.ff1, self.ff2, self.ln2 = ln1, ff1, ff2, ln2
        self._linears = (q, k, v, o, ff1, ff2)  # a plain tuple (not registered twice): _fused_args' order
        self.register_parameter("prefix", None)  # (2, P, D): P extra keys and values (prefix tuning)

    def forward(
        self, x: Tensor, attn_mask: Tensor, prefix: Tensor | None = None, packing: Packing | None = None
    ) -> Tensor:
        """x: (B, T, D); attn_mask: (B, 1, 1, T) bool, True where a key is a real token; prefix: (2, P, D)
        extra keys and values that every query attends to (default: the `prefix` slot). With `packing`, x is
        (N, D), the batch's real tokens back to back (Encoder.forward's `packed`)."""
        B, T, D = attn_mask.shape[0], attn_mask.shape[-1], x.shape[-1]
        prefix = self.prefix if prefix is None else prefix
        if prefix is None and x.is_cpu and torch.is_inference_mode_enabled():
            fused = self._fused_args(x)
            if fused is not None:  # the same ops as below, chained in C++ (a one-sentence call ~15% faster)
                mask = attn_mask.flatten(1) if packing is None else packing.offsets
                return ops.encoder_layer(x, mask, packing is not None, self.heads, *fused)
        if packing is not None and prefix is None and not torch.is_grad_enabled():
            heads = lambda t: t.view(-1, self.heads, D // self.heads)  # noqa: E731
            a = ops.attention_packed(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), packing.offsets)
            x = layer_norm(self.ln1, x + self.o(a.view(-1, D)))
        else:  # padded attention; a packed batch (with a prefix, or under autograd) pads for it alone
            slots = None if packing is None else packing.slots
            if slots is None:
                padded, unpadded = (lambda t: t), (lambda t: t.reshape(B, T, D))  # noqa: E731
            else:
                padded = lambda t: t.new_zeros(B * T, D).index_copy_(0, slots, t).view(B, T, D)  # noqa: E731
                unpadded = lambda t: t.reshape(B * T, D).index_select(0, slots)  # noqa: E731
            if prefix is None:
                Dh = D // self.heads
                split = lambda t: padded(t).view(B, T, self.heads, Dh).transpose(1, 2)  # noqa: E731
                # q, k, v as arguments, not locals: freed when attention returns, not at the layer's end
                a = attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask)
            else:
                a = _attention_with_prefix(padded(self.q(x)), padded(self.k(x)), padded(self.v(x)), attn_mask,
                                           prefix, self.heads)  # fmt: skip
            x = layer_norm(self.ln1, x + self.o(unpadded(a.transpose(1, 2))))
        h = self.ff1(x)
        return layer_norm(self.ln2, x + self.ff2(gelu(h)))

    def _fused_args(self, x: Tensor) -> tuple | None:
        """ops.encoder_layer's linears, lora, ln and eps for this layer on input x, or None where it cannot
        run the layer: a linear that is not int8 / int4 or has a slot it does not apply (IA3's scales, an adapter,
        a full weight), or LoRA both from its slot and by row. Slots are read from the dicts, as in
        QuantLinear.forward: ~7 us a layer."""
        ln1, ln2 = self._modules["ln1"], self._modules["ln2"]
        if INT8_ACTIVATIONS != "dynamic" or ln1.eps != ln2.eps:
            return None
        linears: list[Tensor] = []
        lora: list[Tensor | None] = []
        for lin in self._linears:
            p, buf, rows = lin._parameters, lin._buffers, lin.lora_rows
            a = p["lora_A"]
            if (
                lin.precision not in ("int8", "int4")
                or p["in_scale"] is not None
                or p["out_scale"] is not None
                or p["adapter_down"] is not None
                or p["weight_full"] is not None
                or (a is not None and rows is not None)
            ):
                return None
            linears += (buf["w_q"], *(lin.packed or _NOT_PACKED), buf["scale"], p["bias"])
            if a is not None:
                lora += (a, *lin._one_patch_rows(x, a, p["lora_B"]))
            else:
                lora += rows or _NO_LORA
        p1, p2 = ln1._parameters, ln2._parameters
        return linears, lora, [p1["weight"], p1["bias"], p2["weight"], p2["bias"]], ln1.eps


_NO_LORA = (None,) * 5
_NOT_PACKED = (torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.int32))  # encoder_layer: use w_q


class Packing(NamedTuple):
    """Where a packed batch's N real tokens sit: token i at flat position slots[i] (N,) of (B, T); sentence
    b on rows offsets[b] to offsets[b + 1] (B + 1,)."""

    slots: Tensor
    offsets: Tensor


def _attention_with_prefix(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, prefix: Tensor, heads: int):
    """Attention where every query also sees P prefix keys and values. The attention ops take q, k and v of
    one shape, so q gets P zero rows in front and their outputs are dropped: the kernels serve prefixes,
    masking included, at (T + P)^2 instead of T (T + P) scores. Returns (B, H, T, Dh)."""
    B, T, D = q.shape
    P = prefix.shape[1]
    k = torch.cat([prefix[0].expand(B, P, D), k], 1)
    v = torch.cat([prefix[1].expand(B, P, D), v], 1)
    q = torch.cat([q.new_zeros(B, P, D), q], 1)
    mask = torch.cat([attn_mask.new_ones(B, 1, 1, P), attn_mask], -1)
    split = lambda t: t.view(B, T + P, heads, D // heads).transpose(1, 2)  # noqa: E731
    return attention(split(q), split(k), split(v), mask)[:, :, P:]


class Encoder(nn.Module):
    """BERT embeddings + layers. Frozen tensors are buffers; LayerNorm affine terms are Parameters with
    requires_grad=False until a method's rule turns some on."""

    def __init__(
        self, cfg: BertConfig, word: QuantEmbedding, pos: Tensor, typ: Tensor, emb_ln: nn.LayerNorm, layers
    ):
        super().__init__()
        self.cfg = cfg
        self.word = word
        self.register_buffer("pos", pos)  # (max_positions, D) fp32
        self.register_buffer("typ", typ[0].clone())  # (D,) fp32: single-segment input uses type 0 only
        self.emb_ln = emb_ln
        self.layers = nn.ModuleList(layers)
        self.checkpointing = False  # activation checkpointing per layer, for small memory budgets
        self.register_parameter("prompt", None)  # (P, D): soft prompt tokens in front of every sentence
        # While training, modules that produce the prompt (P, D) or every layer's prefix (L, 2, P, D) from
        # their own parameters (P-tuning's prompt encoder, prefix tuning's reparametrization); folded into
        # `prompt` / the layers' `prefix` for the patch.
        self.prompt_encoder: nn.Module | None = None
        self.prefix_encoder: nn.Module | None = None

    def forward(self, ids: Tensor, mask: Tensor, packed: bool = False) -> Tensor:
        """ids, mask: (B, T) int64 -> hidden states (B, T, D) fp32 of the sentence's own tokens (zeros on
        padding where `packed`). `packed`: the layers run on the real tokens only (N, D) and attention per
        sentence unpadded (ops.attention_packed), so a batch of mixed lengths costs its real tokens, not
        B x T, with the padded pass's bits (tests/test_bank.py). Inference: mixed-patch passes of 8-16
        SST-2 sentences measured 22-42% faster (BENCHMARKS.md, Serving). Under autograd, or with a prefix,
        attention pads."""
        emb = self.word(ids)
        prompt = self.prompt_encoder() if self.prompt_encoder is not None else self.prompt
        P = 0 if prompt is None else prompt.shape[0]
        if P:  # prompt tuning: the prompt's embeddings go first, and every token attends to them
            emb = torch.cat([prompt.expand(ids.shape[0], P, -1), emb], 1)
            mask = torch.cat([mask.new_ones(ids.shape[0], P), mask], 1)
        B, T = mask.shape
        x = emb + self.pos[:T] + self.typ
        attn_mask = mask.bool()[:, None, None, :]
        packing = None
        if packed:  # from here on the real tokens only, the embeddings' LayerNorm included
            offsets = torch.zeros(B + 1, dtype=torch.long, device=mask.device)
            torch.cumsum(mask.sum(1), 0, out=offsets[1:])
            packing = Packing(mask.flatten().nonzero().squeeze(1), offsets)
            x = x.reshape(B * T, -1).index_select(0, packing.slots)
        x = layer_norm(self.emb_ln, x)
        prefixes = self.prefix_encoder() if self.prefix_encoder is not None else None
        for i, layer in enumerate(self.layers):
            prefix = None if prefixes is None else prefixes[i]
            if self.checkpointing and torch.is_grad_enabled():
                x = Recompute.apply(layer, x, attn_mask, ANCHOR, prefix, packing)
            else:
                x = layer(x, attn_mask, prefix, packing)
        if packing is not None:
            x = x.new_zeros(B * T, x.shape[-1]).index_copy_(0, packing.slots, x).view(B, T, -1)
        return x[:, P:] if P else x


def head_logits(feats: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """feats (B, D) -> logits (B, labels) of a linear head. In inference mode each row's dot products are a
    multiply and a sum over D, whose order D alone sets, not a BLAS call, whose rounding changes with the
    row count: with the pooling's (per sentence) and lora_rows' sums, a sentence's answer has the same bits
    alone or in any batch. Otherwise (training) F.linear."""
    if not (feats.is_cpu and torch.is_inference_mode_enabled()):
        return F.linear(feats, weight, bias)
    logits = (feats[:, None, :] * weight).sum(-1)
    return logits + bias if bias is not None else logits


class LinearHead(nn.Linear):
    """The classifier's head: nn.Linear, whose inference passes run head_logits."""

    def forward(self, x: Tensor) -> Tensor:
        return head_logits(x, self.weight, self.bias)


class Classifier(nn.Module):
    """Encoder -> mean over real tokens -> dropout -> linear head (D -> num_labels)."""

    def __init__(self, encoder: Encoder, num_labels: int = 2, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = LinearHead(encoder.cfg.hidden_size, num_labels)
        self.reset_head(num_labels, seed)

    def reset_head(self, num_labels: int, seed: int = 0) -> None:
        """A fresh head, initialised from `seed` alone (independent of the global RNG)."""
        g = torch.Generator().manual_seed(seed)
        D = self.encoder.cfg.hidden_size
        self.head.weight = nn.Parameter(torch.randn(num_labels, D, generator=g) * 0.02)
        self.head.bias = nn.Parameter(torch.zeros(num_labels))
        self.head.out_features = num_labels

    def pool(self, ids: Tensor, mask: Tensor, packed: bool = False) -> Tensor:
        """(B, T) -> (B, D): mean of the last hidden states over real tokens (`packed`: Encoder.forward)."""
        h = self.encoder(ids, mask, packed)
        m = mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, ids: Tensor, mask: Tensor, packed: bool = False) -> Tensor:
        """ids, mask: (B, T) -> logits (B, num_labels)."""
        return self.head(self.dropout(self.pool(ids, mask, packed)))

    @torch.inference_mode()
    def predict_proba(self, rows: list, batch_size: int = 64) -> Tensor:
        """rows: token-id arrays -> class probabilities (N, num_labels), in eval mode, in the order given."""
        return self.by_length(rows, batch_size, lambda ids, mask: self(ids, mask, packed=True).softmax(-1))

    @torch.inference_mode()
    def by_length(self, rows: list, batch_size: int, fn) -> Tensor:
        """fn(ids, mask) over token-id arrays `rows`, in eval mode, run in length order in passes of at most
        `batch_size`, for an `fn` that runs the encoder packed (Encoder.forward), where padding costs nothing:
        one pass of 16 mixed SST-2/CR/SUBJ/MPQA sentences measured faster than the same cut into length bands.
        Rows returned in the order given."""
        from .data import collate

        was_training, order, parts = self.training, sorted(range(len(rows)), key=lambda i: len(rows[i])), []
        if was_training:  # a no-op eval() still walks every module, ~0.1 ms of a one-sentence call
            self.eval()
        try:
            for s in range(0, len(order), batch_size):
                parts.append(fn(*collate([rows[i] for i in order[s : s + batch_size]])))
        finally:
            if was_training:
                self.train()
        out = torch.cat(parts) if parts else torch.empty(0, self.head.weight.shape[0])
        return out[torch.argsort(torch.tensor(order, dtype=torch.long))] if parts else out


def prepack_linears(model: nn.Module) -> int:
    """Pack every int8 linear's weight once for the kernels' panels, so that inference passes (no autograd)
    stop packing it per call: a short sentence's int8 GEMM spent about as long packing as multiplying.
    Returns the bytes added (about the int8 weights' own size). For processes that serve: training keeps
    packing per call, within its memory plan. CPU weights only (the CUDA kernels read w_q as it is)."""
    added = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.precision == "int8" and m.w_q.is_cpu and m.packed is None:
            m.packed = ops.int8_pack_weight(m.w_q)
            added += sum(t.numel() * t.element_size() for t in m.packed)
    return added


def layer_of(name: str) -> int | None:
    """The encoder layer a parameter name belongs to ('encoder.layers.3.q.bias' -> 3), or None (embeddings,
    prompts, head)."""
    if not name.startswith("encoder.layers."):
        return None
    return int(name.split(".", 3)[2])


def skeleton(cfg, precision: str | None = None):
    """A Classifier with `cfg`'s structure. Without `precision`, frozen weights are zero-stride views of
    one scalar (no memory; meta tensors would pull in sympy): the planner reads parameter shapes from it
    through the methods' own rules. With a precision, random quantized weights (a runnable model)."""
    from . import quant

    D, F = cfg.hidden_size, cfg.intermediate_size

    def rnd(*shape):
        return torch.randn(*shape) * 0.02 if precision else torch.zeros(()).expand(*shape)

    def frozen(w):
        return quant.quantize(w, precision) if precision else {"weight": w}

    def linear(o, i):
        return QuantLinear(frozen(rnd(o, i)), rnd(o), precision or "fp32")

    def ln():
        return nn.LayerNorm(D).requires_grad_(False)

    word = QuantEmbedding(frozen(rnd(cfg.vocab_size, D)), precision or "fp32")
    layers = [EncoderLayer(cfg, linear(D, D), linear(D, D), linear(D, D), linear(D, D), ln(), linear(F, D),
                           linear(D, F), ln()) for _ in range(cfg.num_hidden_layers)]  # fmt: skip
    enc = Encoder(cfg, word, rnd(cfg.max_position_embeddings, D), rnd(cfg.type_vocab_size, D), ln(), layers)
    return Classifier(enc)
