"""Optimizers: AdamW (fused on CUDA), Lion, SGD, with no weight decay on norms and biases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.config.fields import spec


@dataclass
class OptimConfig:
    name: Literal["adamw", "lion", "sgd"] = spec("adamw", help="optimizer")
    lr: float = spec(3e-4, gt=0, help="peak learning rate (after warmup)")
    weight_decay: float = spec(0.01, ge=0, help="decoupled weight decay (not on norms/biases)")
    betas: list[float] = spec(
        [0.9, 0.999], ge=0, lt=1, help="AdamW/Lion betas; Lion's usual values are [0.9, 0.99]"
    )
    eps: float = spec(1e-8, gt=0, help="AdamW epsilon")
    momentum: float = spec(0.9, ge=0, lt=1, help="SGD momentum")

    def validate(self) -> list[str]:
        if len(self.betas) != 2:
            return [f"optim.betas: expected two numbers, got {self.betas}"]
        return []


class Lion(torch.optim.Optimizer):
    """Lion (EvoLved Sign Momentum).

    Chen, X. et al. (2023). Symbolic Discovery of Optimization Algorithms. arXiv:2302.06675.
    torch ships no Lion; the update is four lines, so it is written here rather than pulling
    in a dependency: ``c = b1*m + (1-b1)*g; p -= lr*(sign(c) + wd*p); m = b2*m + (1-b2)*g``.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, but got lr={lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and vectors/scalars (norm weights, biases: not decayed)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    on_cuda = next(model.parameters()).is_cuda
    if cfg.name == "adamw":
        # fused=True runs one kernel for all parameters; it needs CUDA tensors.
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda or None
        )
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
