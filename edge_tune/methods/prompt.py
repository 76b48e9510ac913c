"""Soft prompts in front of every sentence, at the embeddings: prompt tuning (Lester et al. 2021) trains
the P prompt vectors themselves; P-tuning (Liu et al. 2021, "GPT Understands, Too") trains a small prompt
encoder (an MLP over P input vectors, PEFT's `MLP` reparametrization) whose output is the prompt. Both
store the prompt vectors (P, D) and the head: a P-tuning patch is a prompt-tuning patch once trained."""

from __future__ import annotations

import torch
from torch import nn

from ..model import Classifier
from .core import Method, MethodSpec, at_least_one, run_reparam
from .head import head_trainable

MAX_TOKENS = 128  # prompt tokens at most: positions are shared with the sentence (512 in all)


def prompt_trainable(name: str, spec: MethodSpec | None = None) -> bool:
    """The prompt vectors, plus the head."""
    return name == "encoder.prompt" or head_trainable(name)


def ptuning_trainable(name: str, spec: MethodSpec | None = None) -> bool:
    """The prompt encoder's parameters, plus the head (the patch stores its output: prompt_trainable)."""
    return name.startswith("encoder.prompt_encoder.") or head_trainable(name)


def prompt_check(spec: MethodSpec) -> list[str]:
    problems = at_least_one(spec, "tokens")
    if spec.tokens > MAX_TOKENS:
        problems.append(f"{spec.name} tokens must be at most {MAX_TOKENS}, got {spec.tokens}")
    if spec.name == "ptuning":
        problems += at_least_one(spec, "reparam")
    return problems


def vocabulary_init(model: Classifier, n: int, seed: int) -> torch.Tensor:
    """(n, D): the embeddings of n vocabulary tokens drawn at random (ids 1000+, past [PAD] / [unused] /
    special tokens): prompts start in the region real words live in, as Lester et al. found best."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.encoder.cfg.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (n,), generator=g)
    with torch.no_grad():
        return model.encoder.word(ids).float().clone()


def attach_prompt(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    model.encoder.prompt = nn.Parameter(vocabulary_init(model, spec.tokens, seed))


class PromptEncoder(nn.Module):
    """P-tuning's reparametrization: P input vectors through Linear -> ReLU -> Linear -> ReLU -> Linear
    (PEFT's PromptEncoder, MLP type), giving the prompt (P, D). The last layer starts at zero and its bias
    at the vocabulary init, so training starts from the same prompt as prompt tuning."""

    def __init__(self, init: torch.Tensor, hidden: int, seed: int):
        super().__init__()
        P, D = init.shape
        g = torch.Generator().manual_seed(seed + 1)
        self.embedding = nn.Parameter(torch.randn(P, D, generator=g) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, D))  # fmt: skip
        with torch.no_grad():
            for lin in (self.mlp[0], self.mlp[2]):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * lin.in_features**-0.5)
                lin.bias.zero_()
            self.mlp[4].weight.zero_()
            self.mlp[4].bias.zero_()
        self.base = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        return self.base + self.mlp(self.embedding)


def attach_ptuning(model: Classifier, spec: MethodSpec, seed: int = 0) -> None:
    init = vocabulary_init(model, spec.tokens, seed)
    model.encoder.prompt_encoder = PromptEncoder(init, spec.reparam, seed)


def detach_prompt(model: Classifier) -> None:
    model.encoder.prompt = None
    model.encoder.prompt_encoder = None


def prompt_shapes(model: Classifier, spec: MethodSpec) -> dict[str, tuple[int, ...]]:
    return {"encoder.prompt": (spec.tokens, model.encoder.cfg.hidden_size)}


def fold_ptuning(model: Classifier, spec: MethodSpec, tensors: dict) -> dict:
    """The trained prompt encoder -> the prompt it produces; the model is left holding that prompt."""
    enc = model.encoder
    if enc.prompt_encoder is None:
        return tensors
    prompt, folded = run_reparam(enc.prompt_encoder, tensors, "encoder.prompt_encoder.")
    enc.prompt_encoder = None
    enc.prompt = nn.Parameter(prompt, requires_grad=False)
    return folded | {"encoder.prompt": prompt.clone()}


def ptuning_reparam_values(cfg, spec: MethodSpec) -> int:
    """Trained values beyond the stored prompt's: the encoder's input vectors and its MLP (its base vectors
    are the size of the prompt)."""
    D, P, h = cfg.hidden_size, spec.tokens, spec.reparam
    return P * D + (D * h + h) + (h * h + h) + (h * D + D)


PROMPT = Method(
    name="prompt",
    summary="soft prompt tokens in front of every sentence (--tokens) and the head",
    trainable=prompt_trainable,
    # SST-2 dev, int8 base, batch 32, 300 steps, 16 tokens: lr 3e-2 0.8142 (one run)
    default_lr=3e-2,
    default_steps=1200,
    hyper=("tokens",),
    search=(("tokens", 4, 32),),
    check=prompt_check,
    starts_as_base=False,
    slots=(".prompt",),
    attach=attach_prompt,
    detach=detach_prompt,
    slot_shapes=prompt_shapes,
    extra_tokens=lambda spec: spec.tokens,
)

PTUNING = Method(
    name="ptuning",
    summary="soft prompt made by a trained MLP prompt encoder (--tokens, --reparam hidden width), and the head",
    trainable=ptuning_trainable,
    # SST-2 dev, int8 base, batch 32, 300 steps, 16 tokens, MLP 128: lr 1e-2 0.8119 (one run)
    default_lr=1e-2,
    default_steps=1200,
    hyper=("tokens", "reparam"),
    search=(("tokens", 4, 32),),
    check=prompt_check,
    starts_as_base=False,
    slots=(".prompt",),
    attach=attach_ptuning,
    detach=detach_prompt,
    slot_shapes=prompt_shapes,
    extra_tokens=lambda spec: spec.tokens,
    stored=prompt_trainable,
    fold=fold_ptuning,
    reparam_values=ptuning_reparam_values,
)

REGISTER = (PROMPT, PTUNING)
