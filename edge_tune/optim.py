"""AdamW for the delta parameters, in plain tensor ops.

Why not `torch.optim.AdamW`: constructing any torch.optim optimizer imports torch._dynamo (and sympy,
~800 modules), which costs ~57 MB of RSS, measured here: more than all of a BitFit step's activations,
and a seventh of a 400 MB Raspberry Pi Zero budget. The update below is torch's single-tensor AdamW,
applied in slices of at most CHUNK values so a large tensor (a 47 MB embedding table) never needs a
temporary of its own size, and with row-sparse state for tables that get sparse gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK = 1 << 18  # values updated at a time: elementwise ops, so slicing changes no bit of the result


class AdamW:
    """AdamW (decoupled weight decay) over parameter groups: dicts with `params`, and optionally `lr` and
    `weight_decay`. `state[p]` holds `step`, `exp_avg` and `exp_avg_sq`, as torch's does.

    A parameter whose gradient is sparse (an embedding looked up with sparse=True) keeps its moments only
    for the rows it has had gradients on (`state[p]["rows"]`, sorted), and `rows_hint[p]` can name them
    up front (the token ids of the training data). A row never touched has moments of exactly zero in
    dense AdamW, so its update is exactly zero: the result is dense AdamW's, bit for bit."""

    def __init__(
        self, groups, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
    ):
        groups = list(groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = [
            {"lr": lr, "weight_decay": weight_decay, **g, "params": list(g["params"])} for g in groups
        ]
        self.betas, self.eps = betas, eps
        self.state: dict[Tensor, dict] = {}
        self.rows_hint: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                sparse = p.grad.is_sparse
                st = self.state.get(p)
                if st is None:
                    st = self.state[p] = self._new_state(p, sparse)
                st["step"] += 1
                t = st["step"].item()
                if wd:
                    p.mul_(1 - lr * wd)
                if sparse:
                    self._sparse_update(p, st, lr, t)
                    continue
                flat = [x.view(-1) for x in (p, p.grad, st["exp_avg"], st["exp_avg_sq"])]
                for s in range(0, p.numel(), CHUNK):
                    self._update(*(x[s : s + CHUNK] for x in flat), lr, t)

    def _new_state(self, p: Tensor, sparse: bool) -> dict:
        if not sparse:
            return {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        rows = self.rows_hint.get(p, torch.zeros(0, dtype=torch.int64)).unique()
        shape = (len(rows), *p.shape[1:])
        return {
            "step": torch.tensor(0.0),
            "rows": rows,
            "exp_avg": p.new_zeros(shape),
            "exp_avg_sq": p.new_zeros(shape),
        }

    def _update(self, p: Tensor, grad: Tensor, m: Tensor, v: Tensor, lr: float, t: float) -> None:
        b1, b2 = self.betas
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1**t))

    def _sparse_update(self, p: Tensor, st: dict, lr: float, t: float) -> None:
        grad = p.grad.coalesce()
        g_rows, g_vals = grad.indices()[0], grad.values()
        new = g_rows[~torch.isin(g_rows, st["rows"])]
        if len(new):  # rows the hint did not name: grow the state (zero moments, as dense AdamW has there)
            rows = torch.cat([st["rows"], new]).unique()
            for k in ("exp_avg", "exp_avg_sq"):
                grown = st[k].new_zeros((len(rows), *st[k].shape[1:]))
                grown[torch.searchsorted(rows, st["rows"])] = st[k]
                st[k] = grown
            st["rows"] = rows
        rows, at = st["rows"], torch.searchsorted(st["rows"], g_rows)
        block = max(1, CHUNK // max(1, math.prod(p.shape[1:])))
        for s in range(0, len(rows), block):
            e = min(s + block, len(rows))
            lo, hi = torch.searchsorted(at, torch.tensor([s, e])).tolist()
            g = g_vals.new_zeros((e - s, *p.shape[1:]))
            g[at[lo:hi] - s] = g_vals[lo:hi]
            sub = p.index_select(0, rows[s:e])
            self._update(sub, g, st["exp_avg"][s:e], st["exp_avg_sq"][s:e], lr, t)
            p.index_copy_(0, rows[s:e], sub)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


def clip_grad_norm(params, max_norm: float) -> Tensor:
    """Scale the gradients of `params` so their global L2 norm is at most `max_norm`; returns the norm
    before clipping. torch's clip_grad_norm_ where every gradient is dense; sparse gradients (embedding
    tables) are coalesced first, so a row looked up twice counts once, with its summed gradient."""
    params = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    norms = [torch.linalg.vector_norm(p.grad.values() if p.grad.is_sparse else p.grad) for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        (p.grad.values() if p.grad.is_sparse else p.grad).mul_(coef)
    return total
