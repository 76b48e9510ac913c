"""Patches made without backprop, from the base's own sentence embeddings (mean-pooled, as MiniLM was
trained to be used): `zeroshot` builds the head from embeddings of label descriptions (no labelled
examples), `fewshot` from class prototypes (the mean embedding of each class's labelled examples: a
nearest-centroid classifier). Both patches are a head only, so they load, swap and mix like `head`
patches. `prototype_head` also gives any trained method a head to start from (`--head-init prototypes`)."""

from __future__ import annotations

import torch

from ..data import encode
from .core import Method, MethodSpec
from .head import head_trainable

ZEROSHOT_TEMPERATURE = 0.05  # cosine similarity / temperature -> logits (sentence-embedding practice)


def embed(base, texts: list[str], seq_len: int = 64, batch_size: int = 64) -> torch.Tensor:
    """(N, D) mean-pooled sentence embeddings of `texts` from the base (eval mode, current deltas)."""
    tokens = encode(base.tokenizer, list(texts), seq_len)
    return base.model.by_length([tokens[i] for i in range(len(tokens))], batch_size, base.model.pool)


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
    base, texts: list[str], labels: list[int], num_labels: int, seq_len: int = 64, chunk: int = 4096
):
    """Few-shot: nearest class mean. Weight mu_c, bias -|mu_c|^2 / 2: argmax_c of w_c x + b_c is the class
    whose mean embedding is nearest to x (Euclidean). A class with no examples gets a -1e4 bias. Embeds
    `chunk` texts at a time and keeps only per-class sums, so all of SST-2 costs no (N, D) matrix."""
    D = base.model.encoder.cfg.hidden_size
    sums, counts = torch.zeros(num_labels, D), torch.zeros(num_labels)
    for s in range(0, len(texts), chunk):
        y = torch.tensor(labels[s : s + chunk])
        sums.index_add_(0, y, embed(base, texts[s : s + chunk], seq_len))
        counts += torch.bincount(y, minlength=num_labels).float()
    weight, bias = torch.zeros(num_labels, D), torch.full((num_labels,), -1e4)
    for c in range(num_labels):
        if counts[c]:
            mu = sums[c] / counts[c]
            weight[c], bias[c] = mu, -0.5 * mu.dot(mu)
    return weight, bias


def fit_zeroshot(base, train_ds, spec: MethodSpec, seq_len: int, descriptions: list[str]) -> None:
    set_head(base.model, *description_head(base, descriptions, seq_len))


def fit_fewshot(base, train_ds, spec: MethodSpec, seq_len: int, descriptions: list[str]) -> None:
    n = len(train_ds.label_names)
    set_head(base.model, *prototype_head(base, train_ds.texts, train_ds.labels, n, seq_len))


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
