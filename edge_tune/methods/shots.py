"""Patches made without backprop, from the base's own sentence embeddings (mean-pooled, as MiniLM was
trained to be used): `zeroshot` builds the head from embeddings of label descriptions (no labelled
examples), `fewshot` from class prototypes (the mean direction of each class's labelled examples, with the
label description as a prior: a nearest-centroid classifier by cosine). Both patches are a head only, so
they load, swap and mix like `head` patches. `prototype_head` also gives any trained method a head to start from (`--head-init prototypes`)."""

from __future__ import annotations

import torch

from ..tokens import encode
from .core import Method, MethodSpec
from .head import head_trainable

ZEROSHOT_TEMPERATURE = 0.05  # cosine similarity / temperature -> logits (sentence-embedding practice)
# A label description weighs as this many labelled examples in a few-shot prototype: on SST-2 dev, mean of
# 30 draws, 16 a class: 0.666 without it, 0.684 at 4, 0.689 at 8, 0.684 at 16; at 256 a class it moves
# accuracy by under 0.5 points.
PRIOR_EXAMPLES = 8


def embed(base, texts: list[str], seq_len: int = 64, batch_size: int = 64) -> torch.Tensor:
    """(N, D) mean-pooled sentence embeddings of `texts` from the base (eval mode, current deltas)."""
    tokens = encode(base.tokenizer, list(texts), seq_len)
    return base.model.by_length(
        [tokens[i] for i in range(len(tokens))],
        batch_size,
        lambda ids, mask: base.model.pool(ids, mask, packed=True),
    )


def set_head(model, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        model.head.weight.data = weight.float().contiguous()
        model.head.bias.data = bias.float().contiguous()
        model.head.out_features = weight.shape[0]


def description_head(base, descriptions: list[str], seq_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot: each class's weight is its description's embedding, unit length, over a temperature;
    the logits are cosine similarities scaled (the input's length is the same for every class, so the
    argmax is the nearest description by cosine)."""
    e = embed(base, descriptions, seq_len)
    norm = e.norm(dim=1, keepdim=True).clamp_min(1e-6)
    scale = 1.0 / (ZEROSHOT_TEMPERATURE * norm.mean())
    return e / norm * scale, torch.zeros(len(descriptions))


def prototype_head(
    base,
    texts: list[str],
    labels: list[int],
    num_labels: int,
    seq_len: int = 64,
    descriptions: list[str] | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-shot: nearest class prototype by cosine. A class's prototype is the direction of the sum of its
    examples' unit embeddings plus, where `descriptions` are given, its description's unit embedding
    counted as PRIOR_EXAMPLES examples (a prior that matters at 8-16 labels a class and fades as labels
    grow). A class with neither gets a -1e4 bias. Embeds `chunk` texts at a time and keeps only per-class
    sums, so all of SST-2 costs no (N, D) matrix."""
    D = base.model.encoder.cfg.hidden_size
    sums, norm_sum = torch.zeros(num_labels, D), 0.0
    for s in range(0, len(texts), chunk):
        e = embed(base, texts[s : s + chunk], seq_len)
        norms = e.norm(dim=1, keepdim=True).clamp_min(1e-6)
        sums.index_add_(0, torch.tensor(labels[s : s + chunk]), e / norms)
        norm_sum += float(norms.sum())
    if descriptions is not None:
        d = embed(base, descriptions, seq_len)
        sums += PRIOR_EXAMPLES * d / d.norm(dim=1, keepdim=True).clamp_min(1e-6)
    length = sums.norm(dim=1, keepdim=True)
    # Logits are cosine / temperature: the pooled input is not unit length, so scale by its mean length.
    scale = 1.0 / (ZEROSHOT_TEMPERATURE * max(norm_sum / max(len(texts), 1), 1e-6))
    weight = torch.where(length > 0, sums / length.clamp_min(1e-12) * scale, torch.zeros_like(sums))
    bias = torch.where(length.squeeze(1) > 0, 0.0, -1e4)
    return weight, bias


def informative(descriptions: list[str]) -> bool:
    """Whether label descriptions say anything: bare numbers ('0', '1': a TSV's labels with no labels.tsv)
    would pull every prototype toward the embedding of a digit."""
    return not all(d.strip().lstrip("-").isdigit() for d in descriptions)


def fit_zeroshot(base, train_ds, spec: MethodSpec, seq_len: int, descriptions: list[str]) -> None:
    set_head(base.model, *description_head(base, descriptions, seq_len))


def fit_fewshot(base, train_ds, spec: MethodSpec, seq_len: int, descriptions: list[str]) -> None:
    n, prior = len(train_ds.label_names), descriptions if informative(descriptions) else None
    set_head(base.model, *prototype_head(base, train_ds.texts, train_ds.labels, n, seq_len, prior))


ZEROSHOT = Method(
    name="zeroshot",
    summary="no training: the head from embeddings of label descriptions (--label-text)",
    trainable=head_trainable,
    default_lr=0.0,
    default_steps=0,
    trains_encoder=False,
    row_mixable=True,
    fit=fit_zeroshot,
)

FEWSHOT = Method(
    name="fewshot",
    summary="no training: the head from class prototypes of the labelled examples (--per-class n)",
    trainable=head_trainable,
    default_lr=0.0,
    default_steps=0,
    trains_encoder=False,
    row_mixable=True,
    fit=fit_fewshot,
)

REGISTER = (ZEROSHOT, FEWSHOT)
