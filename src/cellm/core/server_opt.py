"""The server step: the aggregated delta is the gradient of the global adapter for a torch optimizer.

Functional wrapper around torch.optim so the state is plain data (saved in checkpoints, restored exactly).
SGD with lr 1 and no momentum gives w - mean(delta) = mean of the clients' weights: plain FedAvg.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from cellm.core.optim import make_optimizer


@dataclass(frozen=True)
class ServerOptSpec:
    name: str = "adamw"  # "adamw" | "adam" | "sgd"
    lr: float = 1e-2
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def server_step(
    w: torch.Tensor, grad: torch.Tensor, state: dict[str, Any] | None, spec: ServerOptSpec
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step on w with the given gradient; returns (new w, new optimizer state). Inputs untouched."""
    if grad.shape != w.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} != weights shape {tuple(w.shape)}")
    p = torch.nn.Parameter(w.detach().clone().to(torch.float32))
    opt = make_optimizer(spec.name, [p], lr=spec.lr, momentum=spec.momentum, betas=(spec.beta1, spec.beta2),
                         eps=spec.eps, weight_decay=spec.weight_decay)
    if state:
        opt.load_state_dict(copy.deepcopy(state))
    p.grad = grad.detach().clone().to(torch.float32)
    opt.step()
    return p.detach().clone(), copy.deepcopy(opt.state_dict())
