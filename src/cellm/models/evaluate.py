"""Held-out evaluation: accuracy for classification; token accuracy and perplexity for language modelling."""

from __future__ import annotations

import math

import torch

from cellm.data.types import Split
from cellm.models.device import autocast, model_device


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, task: str, batch_size: int = 64,
             precision: str = "fp32") -> dict[str, float]:
    """Metrics of ``model`` on ``split``; batches go to the model's device, sums are taken in fp32 on CPU."""
    model.eval()
    device = model_device(model)
    n = len(split)

    def forward(a: int) -> torch.Tensor:
        with autocast(device, precision):
            out = model(input_ids=split.input_ids[a:a + batch_size].to(device),
                        attention_mask=split.attention_mask[a:a + batch_size].to(device))
        return out.logits.float().cpu()

    if task == "classification":
        correct, loss_sum = 0, 0.0
        for a in range(0, n, batch_size):
            logits = forward(a)
            y = split.labels[a:a + batch_size]
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        return {"accuracy": correct / n, "loss": loss_sum / n}
    nll, hits, tokens = 0.0, 0, 0
    for a in range(0, n, batch_size):
        logits = forward(a)
        pred, target = logits[:, :-1], split.labels[a:a + batch_size, 1:]
        valid = target != -100
        nll += float(torch.nn.functional.cross_entropy(
            pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"))
        hits += int(((pred.argmax(-1) == target) & valid).sum())
        tokens += int(valid.sum())
    mean = nll / max(tokens, 1)
    return {"token_accuracy": hits / max(tokens, 1), "perplexity": math.exp(min(mean, 50.0)), "loss": mean}


def primary_metric(task: str) -> tuple[str, bool]:
    """(metric name, higher is better) used for plots, targets and summaries."""
    return ("accuracy", True) if task == "classification" else ("perplexity", False)
