"""The one optimizer factory: the clients' local optimizer and the server's step both build theirs here."""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(name: str, params: list[torch.nn.Parameter], *, lr: float, momentum: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A torch optimizer by name; ``momentum`` applies to sgd, ``betas`` and ``eps`` to adam and adamw."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (one of {', '.join(OPTIMIZERS)})")
