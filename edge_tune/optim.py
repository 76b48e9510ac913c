"""AdamW for the delta parameters, in plain tensor ops.

Why not `torch.optim.AdamW`: constructing any torch.optim optimizer imports torch._dynamo (and sympy,
~800 modules), which costs ~57 MB of RSS, measured here: more than all of a BitFit step's activations,
and a seventh of a 400 MB Raspberry Pi Zero budget. The update below is torch's single-tensor AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class AdamW:
    """AdamW (decoupled weight decay) over parameter groups: dicts with `params`, and optionally `lr` and
    `weight_decay`. `state[p]` holds `step`, `exp_avg` and `exp_avg_sq`, as torch's does."""

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

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if st is None:
                    st = self.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }
                st["step"] += 1
                t = st["step"].item()
                if wd:
                    p.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
                p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1**t))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()
