"""The model side of a staged (SLoRA) run: stage 1 trains a seeded sparse subset of each LoRA target matrix
itself; stage 2 is ordinary LoRA. One base model throughout: stage 1 adds its sparse change through a
parametrization of each target layer's weight, which the switch removes, leaving the base weights as they were.

Stage 1's trainable tensors are each target layer's subset values (``theta``) and the classifier head; stage 2's
are the LoRA factors and the head, so each stage has its own :class:`FlatView`.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from cellm.core.slora import scatter_delta, subset_indices, svd_lora_init
from cellm.errors import ConfigError
from cellm.models.flat import FlatView


class SparseDelta(torch.nn.Module):
    """W -> W + ΔW, with ΔW zero outside the fixed subset ``idx`` (flattened positions) and ``theta`` inside."""

    def __init__(self, idx: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("idx", idx, persistent=False)
        self.theta = torch.nn.Parameter(torch.zeros(idx.numel()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(-1).index_add(0, self.idx.to(w.device), self.theta.to(w.dtype)).view_as(w)


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's LoRA-wrapped target layers (peft's, holding ``base_layer``, ``lora_A``, ``lora_B``), in order."""
    out = []
    for name, mod in model.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            if not isinstance(mod.base_layer, torch.nn.Linear):
                raise ConfigError(f"SLoRA (slora.stage1_rounds > 0) needs linear LoRA targets; {name} wraps a "
                                  f"{type(mod.base_layer).__name__}")
            out.append((name, mod))
    return out


def _lora_params(mod: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [mod.lora_A["default"].weight, mod.lora_B["default"].weight]


def enter_stage1(model: torch.nn.Module, density: float, seed: int) -> FlatView:
    """Freeze the LoRA factors (B = 0, so they add nothing) and give every target layer a trainable sparse change
    on a subset of ``density`` of its entries, drawn from (seed, layer index). Returns stage 1's flat view."""
    for i, (_, mod) in enumerate(lora_layers(model)):
        for p in _lora_params(mod):
            p.requires_grad_(False)
        w = mod.base_layer.weight
        parametrize.register_parametrization(mod.base_layer, "weight",
                                             SparseDelta(subset_indices(w.numel(), density, seed, i)))
    return FlatView(model)


def enter_stage2(model: torch.nn.Module, *, from_svd: bool, freeze_a: bool = False) -> tuple[FlatView, float]:
    """Leave stage 1: drop each layer's sparse change (the base weights are as they were), make LoRA trainable.

    ``from_svd`` (the server, at the switch): first set each layer's A, B from the truncated SVD of its stage-1
    change, so that scaling * B @ A is its best rank-r approximation. Clients skip it: their adapter comes from
    the download. Returns stage 2's flat view and the share of stage 1's change (squared Frobenius norm, over all
    layers) that the rank-r factors keep (nan without ``from_svd``).
    """
    kept, total = 0.0, 0.0
    for _, mod in lora_layers(model):
        base = mod.base_layer
        if not parametrize.is_parametrized(base, "weight"):
            continue
        delta_mod = base.parametrizations.weight[0]
        if from_svd:
            with torch.no_grad():
                delta = scatter_delta(delta_mod.theta.detach().cpu(), delta_mod.idx.cpu(), tuple(base.weight.shape))
                a_w, b_w = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                a, b = svd_lora_init(delta, a_w.shape[0], float(mod.scaling["default"]))
                a_w.copy_(a.to(a_w.device, a_w.dtype))
                b_w.copy_(b.to(b_w.device, b_w.dtype))
                total += float(delta.double().square().sum())
                kept += float((float(mod.scaling["default"]) * b.double() @ a.double()).square().sum())
        parametrize.remove_parametrizations(base, "weight", leave_parametrized=False)
        for p in _lora_params(mod):
            p.requires_grad_(not (freeze_a and p is mod.lora_A["default"].weight))
    return FlatView(model), (kept / total if total > 0 else float("nan"))
