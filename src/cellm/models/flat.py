"""One 1-D view of all trainable tensors (adapter + head), in a fixed order, without touching the base model.

Clients are adapter states: the simulator writes a client's vector into the single model, trains, reads it back.
"""

from __future__ import annotations

import torch


class FlatView:
    """Reads and writes the trainable parameters of a model as one float32 vector of N entries."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        if not self.params:
            raise ValueError("model has no trainable parameters")
        self.shapes = [tuple(p.shape) for p in self.params]
        sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.numel = self.offsets[-1]

    def segments(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of each tensor inside the flat vector."""
        return [(n, self.offsets[i], self.offsets[i + 1]) for i, n in enumerate(self.names)]

    def get(self) -> torch.Tensor:
        """A fresh CPU copy of the trainable values (N floats; the base model is not copied), wherever the model
        lives: the codec, the server and the checkpoints only ever see CPU vectors."""
        return torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for p in self.params])

    @torch.no_grad()
    def set(self, vec: torch.Tensor) -> None:
        if vec.numel() != self.numel:
            raise ValueError(f"flat vector has {vec.numel()} entries, the model's adapter has {self.numel}")
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:], strict=True):
            p.copy_(vec[a:b].view(p.shape).to(device=p.device, dtype=p.dtype))


def rank_support(flat: FlatView, keep: int) -> torch.Tensor:
    """Entries of the first ``keep`` LoRA ranks (rows of A, columns of B) plus every non-LoRA tensor (the head)."""
    mask = torch.ones(flat.numel, dtype=torch.bool)
    for (name, a, b), shape in zip(flat.segments(), flat.shapes, strict=True):
        if "lora_A" in name:
            m = torch.zeros(shape, dtype=torch.bool)
            m[:keep, :] = True
            mask[a:b] = m.reshape(-1)
        elif "lora_B" in name:
            m = torch.zeros(shape, dtype=torch.bool)
            m[:, :keep] = True
            mask[a:b] = m.reshape(-1)
    return mask
