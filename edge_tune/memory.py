"""The memory plan: a prediction of a training run's peak RSS, itemised in MB, made before the first step.
It starts from the measured runtime floor (floor.py); measuring and trimming the process itself: rss.py."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .floor import runtime_floor_mb, startup_peak_mb
from .rss import tensor_cache_slack_mb, tensor_cache_slack_set_by_env

# Everything below is in bytes until MemoryPlan reports MB. Activations are fp32 (4 bytes), counted per
# token (micro-batch x sequence length) from what each op of model.EncoderLayer saves for backward.
FP32 = 4
MB = 1024 * 1024


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak RSS of a training process, itemised in MB."""

    method: str
    precision: str
    micro_batch: int  # sentences per forward/backward
    grad_accum: int  # micro-batches per optimizer step
    seq_len: int  # tokens per sentence at most
    rank: int
    checkpointing: bool
    eval_batch: int
    runtime_floor_mb: float  # interpreter + torch + tokenizer + the code pages training runs, measured here
    base_weights_mb: float  # frozen encoder tensors as stored
    data_mb: float  # texts and token ids of the train and dev sets
    trainable_mb: float
    gradients_mb: float  # beyond the saved activations they replace in backward
    optimizer_mb: float  # AdamW moments (2 per parameter, a word table's touched rows only) + the best copy
    activations_mb: float  # saved for backward, all layers
    activations_per_layer_mb: float
    workspace_mb: float  # transient buffers of the largest op of a training step
    eval_extra_mb: float  # how far an evaluation batch's transients exceed a training step's (else 0)
    tensor_cache_mb: float = 0.0  # the tensor cache's slack beyond the working set (rss.py)
    startup_peak_mb: float = 0.0  # imports' peak, before trim_resident_memory: a floor for the whole process

    @property
    def parts_mb(self) -> float:
        """The training phase: the parts added up."""
        return sum(getattr(self, f) for f in PLAN_PARTS)

    @property
    def total_mb(self) -> float:
        """Predicted peak RSS: the training phase, or the imports' peak if a small run stays below it."""
        return max(self.parts_mb, self.startup_peak_mb)

    def fits(self, budget_mb: float) -> bool:
        return self.total_mb <= budget_mb

    def table(self, budget_mb: float | None = None) -> str:
        """The plan as an aligned text table (MB), with the verdict against `budget_mb` if given."""
        rows = [(f.removesuffix("_mb").replace("_", " "), getattr(self, f)) for f in PLAN_PARTS]
        lines = [f"{name:18} {mb:9.1f} MB" for name, mb in rows]
        lines.append(f"{'(per layer)':18} {self.activations_per_layer_mb:9.2f} MB")
        lines.append(
            f"{'startup peak':18} {self.startup_peak_mb:9.1f} MB  (imports, before trimming code pages)"
        )
        lines.append(f"{'predicted peak':18} {self.total_mb:9.1f} MB")
        if budget_mb is not None:
            verdict = "fits" if self.fits(budget_mb) else "does NOT fit"
            lines.append(f"{'budget':18} {budget_mb:9.1f} MB  -> {verdict}")
        return "\n".join(lines)


PLAN_PARTS = ("runtime_floor_mb", "base_weights_mb", "data_mb", "trainable_mb", "gradients_mb", "optimizer_mb",
              "activations_mb", "workspace_mb", "eval_extra_mb", "tensor_cache_mb")  # fmt: skip


WORD_TABLE = "encoder.word.weight_full"  # the trainable word embeddings (model.QuantEmbedding), where a method has them


def base_weight_bytes(cfg, precision: str) -> int:
    """Bytes of the frozen encoder as load_base stores it (quantized linears and word embeddings,
    fp32 biases, LayerNorms, position and type-0 embeddings)."""
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers

    def quantized(rows: int, cols: int) -> int:
        if precision == "int8":
            return rows * cols + rows * 4
        if precision == "int4":
            return rows * cols // 2 + rows * (cols // 32) * 2
        return rows * cols * 4

    linears = 4 * quantized(D, D) + quantized(F, D) + quantized(D, F) + (4 * D + F + D) * FP32
    layer_norms = (1 + 2 * L) * 2 * D * FP32
    return L * linears + quantized(V, D) + layer_norms + (cfg.max_position_embeddings + 1) * D * FP32


def saved_floats_per_token(cfg, spec) -> int:
    """fp32 values per token one trained encoder layer saves for backward under `spec`. The frozen quantized
    linears save nothing (ops.py: input gradient from the frozen weight alone); what is saved is the
    attention's q, k and v (fp16: half a float each, half_saved._AttentionHalfSaved), both LayerNorms' inputs
    (fp16) and statistics (half_saved._LayerNormHalfSaved), GELU's input (fp16, half_saved._GeluHalfSaved), and
    the method's own term (Method.saved_floats_per_token: LoRA's adapted inputs and rank-r projections)."""
    if not spec.method.trains_encoder:
        return 0  # the encoder runs without autograd
    D, F = cfg.hidden_size, cfg.intermediate_size
    n = 3 * D // 2 + (D // 2 + 2) + F // 2 + (D // 2 + 2)
    return n + spec.method.saved_floats_per_token(cfg, spec)


def saved_activation_bytes(
    cfg, spec, micro_batch: int, seq_len: int, checkpointing: bool = False
) -> tuple[int, int]:
    """(all, one layer's) bytes a training forward of `micro_batch` sentences of `seq_len` tokens keeps for
    backward: the trained layers' (Method.trained_layers, the top ones) over the tokens the method runs
    (soft prompts add theirs) and per sentence (prefixes), plus the pooling's input and, where it trains,
    the embeddings' LayerNorm. With checkpointing, each trained layer keeps its input and one is rebuilt
    at a time."""
    if not spec.method.trains_encoder:
        return 0, 0
    D = cfg.hidden_size
    tokens = micro_batch * (seq_len + spec.method.extra_tokens(spec))
    per_layer = (saved_floats_per_token(cfg, spec) * tokens
                 + spec.method.saved_floats_per_sentence(cfg, spec) * micro_batch) * FP32  # fmt: skip
    layers = spec.method.trained_layers(cfg, spec)
    if checkpointing:
        return layers * D * tokens * FP32 + per_layer, per_layer
    emb_ln = spec.method.trainable("encoder.emb_ln.bias", spec) or spec.method.trainable(
        "encoder.emb_ln.weight", spec
    )
    return layers * per_layer + (D + (D // 2 + 2) * emb_ln) * tokens * FP32, per_layer


def workspace_floats_per_token(cfg) -> int:
    """fp32 values per token alive at once inside the largest op beyond what is saved: the FFN's hidden
    activation and its GELU (forward) or their gradients (backward), plus the residual stream's gradients."""
    return 2 * cfg.intermediate_size + 3 * cfg.hidden_size


def plan_memory(
    cfg,
    spec,
    precision: str,
    micro_batch: int,
    seq_len: int,
    *,
    checkpointing: bool = False,
    eval_batch: int = 64,
    grad_accum: int = 1,
    num_labels: int = 2,
    data_bytes: int = 0,
    table_rows: int | None = None,
) -> MemoryPlan:
    """Predict the peak RSS of training `spec` on a `precision` base with `micro_batch` sentences of up
    to `seq_len` tokens. `cfg` is the model's BertConfig; `data_bytes` what the loaded datasets hold
    (see dataset_bytes); `table_rows` the distinct token ids of the training data (data.token_rows),
    where the method trains the word table (default: every row of it)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    params = _trainable_count(cfg, spec, num_labels)
    tokens = micro_batch * (seq_len + spec.method.extra_tokens(spec))
    # A trained word table gets a sparse gradient (a row per token looked up, kept twice while coalesced)
    # and AdamW moments only for the rows the data can touch (optim.AdamW); its best copy stays whole.
    table = cfg.vocab_size * D if spec.method.trainable(WORD_TABLE, spec) else 0
    rows = cfg.vocab_size if table_rows is None else min(table_rows, cfg.vocab_size)
    grads = params - table + (2 * tokens * grad_accum * D if table else 0)
    moments = 2 * (params - table + (rows * D if table else 0))
    saved, per_layer = saved_activation_bytes(cfg, spec, micro_batch, seq_len, checkpointing)
    dequant = F * D * FP32 if precision != "fp32" else 0  # the reference ops dequantize one weight at a time
    train_ws = workspace_floats_per_token(cfg) * tokens * FP32 + 2 * dequant
    eval_tokens = eval_batch * (seq_len + spec.method.extra_tokens(spec))
    eval_ws = workspace_floats_per_token(cfg) * eval_tokens * FP32 + dequant
    return MemoryPlan(
        spec.name, precision, micro_batch, grad_accum, seq_len, spec.rank if "rank" in spec.method.hyper else 0,
        checkpointing, eval_batch,
        runtime_floor_mb=runtime_floor_mb(),
        base_weights_mb=base_weight_bytes(cfg, precision) / MB,
        data_mb=data_bytes / MB,
        trainable_mb=params * FP32 / MB,
        # Gradients appear in backward as the activations it has used are freed, and are dropped after the
        # optimizer step (zero_grad(set_to_none)): the peak holds the larger of the two, not both.
        gradients_mb=max(0, grads * FP32 - saved) / MB,
        optimizer_mb=(moments + params) * FP32 / MB,
        activations_mb=saved / MB,
        activations_per_layer_mb=per_layer / MB,
        workspace_mb=train_ws / MB,
        eval_extra_mb=max(0, eval_ws - saved - train_ws) / MB,
        tensor_cache_mb=tensor_cache_slack_mb() or 0.0,
        startup_peak_mb=startup_peak_mb(),
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _trainable_count(cfg, spec, num_labels: int) -> int:
    """Trainable values of `spec`: what its patch holds (methods.delta_shapes, by the method's own rule on a
    zero-memory skeleton) and any reparametrization it trains instead (Method.reparam_values)."""
    import math

    from .methods import delta_shapes
    from .model import skeleton

    stored = sum(math.prod(s) for s in delta_shapes(skeleton(cfg), spec, num_labels).values())
    return stored + spec.method.reparam_values(cfg, spec)


def dataset_bytes(texts: int, chars: int, tokens: int) -> int:
    """What a loaded dataset holds: Python str objects (~49 bytes each + 1 a character) and the list slots
    of texts and labels, token ids (int32) and offsets (int64), and what reading leaves in pymalloc's
    partly used arenas. The per-text constant (150 bytes) is measured: SST-2 (68,221 texts, 3.63 M
    characters, 0.90 M tokens) holds 17.2 MB once loaded, tokenized and trimmed (trim_resident_memory)."""
    return texts * 150 + chars + tokens * 4 + (texts + 1) * 8


EVAL_BATCHES = (64, 32, 16, 8, 4, 2, 1)


def plan_batch_size(
    cfg,
    spec,
    precision: str,
    budget_mb: float,
    batch_size: int,
    seq_len: int,
    *,
    micro_batch: int | None = None,
    data_bytes: int = 0,
    num_labels: int = 2,
    allow_shorter_seq: bool = False,
    table_rows: int | None = None,
) -> tuple[MemoryPlan, list[str]]:
    """The plan for the largest micro-batch that fits `budget_mb`, keeping the effective `batch_size`
    through gradient accumulation, and the one-line announcements of what it changed. Order of
    concessions: a smaller micro-batch; then activation checkpointing; then (only if allowed) a shorter
    sequence. `micro_batch` is the largest micro-batch to try (default `batch_size`). Raises BudgetError,
    naming the smallest budget that would fit, when nothing does."""
    from .errors import BudgetError

    notes: list[str] = []
    seqs = [seq_len]
    while allow_shorter_seq and seqs[-1] > 16:
        seqs.append(max(16, seqs[-1] // 2))
    for seq in seqs:
        for ck in (False, True):
            for micro in range(min(micro_batch or batch_size, batch_size), 0, -1):
                accum = -(-batch_size // micro)
                if -(-batch_size // accum) != micro:
                    continue  # the trainer splits a batch into `accum` near-equal parts; skip duplicates
                for ev in (e for e in EVAL_BATCHES if e <= max(micro, 16)):
                    plan = plan_memory(cfg, spec, precision, micro, seq, checkpointing=ck, eval_batch=ev,
                                       grad_accum=accum, num_labels=num_labels, data_bytes=data_bytes,
                                       table_rows=table_rows)  # fmt: skip
                    if plan.fits(budget_mb):
                        if micro < (micro_batch or batch_size):
                            notes.append(f"memory plan: micro-batch {micro} x {accum} accumulation steps keeps the "
                                         f"batch of {batch_size} within {budget_mb:.0f} MB")  # fmt: skip
                        if ck:
                            notes.append(
                                "memory plan: activation checkpointing on (recomputes each layer in backward)"
                            )
                        if seq < seq_len:
                            notes.append(
                                f"memory plan: sequence length lowered from {seq_len} to {seq} tokens"
                            )
                        return with_tensor_cache(plan, budget_mb), notes
    need = plan_memory(cfg, spec, precision, 1, seqs[-1], checkpointing=True, eval_batch=1, num_labels=num_labels,
                       data_bytes=data_bytes, table_rows=table_rows).total_mb  # fmt: skip
    raise BudgetError(
        f"{spec.name} on a {precision} base cannot fit {budget_mb:.0f} MB even at micro-batch 1 with checkpointing "
        f"(needs {need:.0f} MB)",
        None,
        "use a profile with a larger budget, a smaller rank or sequence length, or --allow-shorter-seq",
        need_mb=need,
    )


TENSOR_CACHE_AUTO_MB = 64.0  # more slack stopped making a step faster (rss.start_tensor_cache)


def with_tensor_cache(plan: MemoryPlan, budget_mb: float) -> MemoryPlan:
    """`plan` with the tensor cache's slack it can afford, unless $EDGE_TUNE_TENSOR_CACHE_MB says: a quarter
    of the headroom under `budget_mb`, at most 64 MB. Speed from spare budget: a LoRA step at 16 x 64
    measured 395-471 ms at 0 MB, 347-361 ms at 64 MB (+24 MB peak)."""
    import dataclasses

    if tensor_cache_slack_set_by_env():
        return plan
    base = dataclasses.replace(plan, tensor_cache_mb=0.0)
    return dataclasses.replace(base, tensor_cache_mb=affordable_tensor_cache_mb(budget_mb - base.total_mb))


def affordable_tensor_cache_mb(headroom_mb: float) -> float:
    """The tensor cache's slack a process with `headroom_mb` MB under its budget spends: a quarter of it, at
    most TENSOR_CACHE_AUTO_MB, none where there is none."""
    return max(0.0, min(TENSOR_CACHE_AUTO_MB, headroom_mb // 4))
