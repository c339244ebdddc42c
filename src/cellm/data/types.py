"""The two containers every loader returns, so training code never depends on which dataset it got."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Task = Literal["classification", "causal_lm"]


@dataclass
class Split:
    """Tokenized examples held as whole tensors: small enough to keep in memory, cheap to index per batch.

    ``labels`` is ``[n]`` class ids for classification, or ``[n, L]`` token ids for causal LM with -100
    wherever ``attention_mask`` is 0 (so padding never counts in the loss).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        if self.attention_mask.shape != self.input_ids.shape or self.labels.shape[0] != n:
            raise ValueError(
                f"Split tensors disagree: input_ids {tuple(self.input_ids.shape)}, "
                f"attention_mask {tuple(self.attention_mask.shape)}, labels {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx: torch.Tensor | np.ndarray | list[int] | range) -> Split:
        """The examples at ``idx`` (in that order), as a new Split."""
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return Split(self.input_ids[index], self.attention_mask[index], self.labels[index])

    @staticmethod
    def concat(splits: list[Split]) -> Split:
        """All examples of ``splits`` in order (e.g. every client's data, for a centralized baseline)."""
        if not splits:
            raise ValueError("Split.concat needs at least one split")
        return Split(
            torch.cat([s.input_ids for s in splits]),
            torch.cat([s.attention_mask for s in splits]),
            torch.cat([s.labels for s in splits]),
        )


@dataclass
class FederatedData:
    """A federated dataset: one Split per client plus a held-out test Split that no client trains on.

    ``test_names`` lists the held-out authors (speakers, senders) whose text forms ``test`` for the
    language-modelling datasets; it is empty where the test split is drawn per example (bbc).
    """

    task: Task
    num_labels: int | None
    label_names: list[str] | None
    clients: list[Split]
    client_names: list[str]
    test: Split
    test_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.clients) != len(self.client_names):
            raise ValueError(f"{len(self.clients)} clients but {len(self.client_names)} client names")
        empty = [name for name, c in zip(self.client_names, self.clients, strict=True) if len(c) == 0]
        if empty:
            raise ValueError(f"clients without examples: {empty[:5]}")

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client_sizes(self) -> list[int]:
        return [len(c) for c in self.clients]
