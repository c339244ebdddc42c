"""What travels between server and client in a round, and nothing else: the task a client gets, the reply it
sends, and the training settings both sides derive from the config.

Server (:mod:`cellm.federated.server`), client (:mod:`cellm.federated.client`) and every runtime's transport
(:mod:`cellm.runtime.flower.protocol`) import these types from here, so neither side imports the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from cellm.config import CellmConfig
from cellm.core.codec import CodecSpec
from cellm.core.support import is_shared, shared_support, support_indices
from cellm.federated.seeds import support_seed


@dataclass(frozen=True)
class TrainSpec:
    """How a client trains locally; the same for every client of a run (from ``client.*``, ``fl.*``, ``run.*``)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    local_steps: int = 5
    local_epochs: int = 0
    batch_size: int = 16
    precision: str = "fp32"  # autocast of the forward pass: fp32 (none), bf16 or fp16


def train_spec(cfg: CellmConfig) -> TrainSpec:
    """The run's local training settings."""
    c = cfg.client
    return TrainSpec(optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                     max_grad_norm=c.max_grad_norm, local_steps=cfg.fl.local_steps,
                     local_epochs=cfg.fl.local_epochs, batch_size=cfg.fl.batch_size, precision=cfg.run.precision)


@dataclass(frozen=True)
class ClientTask:
    """What the server sends a client in one round: the encoded download and the round's settings."""

    round: int
    client: int
    download: bytes
    up_density: float
    codec_up: CodecSpec
    download_mode: str = "weights"  # "weights": start from the download; "delta": add it to the kept copy
    client_freeze: bool = False
    error_feedback: bool = False
    support_rank: int = 0  # rank tier: train and send only the first r ranks (0 = all)
    download_masked: bool = False  # the download is a top-k part (its positions are the mask M), not everything
    init_digest: str = ""  # init-relative download: digest of the seeded init w0 the client must regenerate
    stage: int = 0  # SLoRA: 1 = train the seeded subset of the target weights, 2 = LoRA; 0 = a one-stage run
    acked_round: int = 0  # the last round whose upload from this client the server accepted (0: none)
    up_support: str = "topk"  # comm.up_support: "topk" (own top-k, positions sent) or a shared rule (values only)
    up_support_head: bool = False  # the classifier head's entries are part of the shared support
    ring_bits: int = 0  # secure aggregation: bits of a quantized value (0 = off), the public clip and round size
    ring_clip: float = 0.0
    ring_clients: int = 0
    secagg_routed: bytes = b""  # secure aggregation: the shares other clients sent this one (encrypted to it)


@dataclass
class ClientReply:
    """What a client sends back: its encoded upload and what it says about its round (all checked by the
    server before use; weighted aggregation uses the sizes the server knows, not ``num_examples``)."""

    payload: bytes
    num_examples: int
    train_loss: float
    nonzeros: int
    extra: dict = field(default_factory=dict)


def task_support(task: ClientTask, n: int, seed: int, *, download: torch.Tensor | None = None,
                 head: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor | None:
    """The sorted positions of ``task``'s shared upload support, or None when the client picks its own (top-k).

    Server and client call this with the same task and inputs, so they agree on S without a byte sent: ``seed``
    is the run seed, ``download`` the positions of the task's download (boolean; used when the download is masked,
    the whole vector otherwise), ``head`` the head's entries (used with ``up_support_head``), ``allowed`` where
    the client may change anything at all (rank tier, client_freeze's mask), which S is cut to.
    """
    if not is_shared(task.up_support):
        return None
    if task.up_support_head and head is None:
        raise ValueError("this task's upload support includes the classifier head (up_support_head), but no head "
                         "positions were given: pass the adapter's layout")
    mask = shared_support(task.up_support, n, task.up_density, seed=support_seed(seed, task.round),
                          download=download if task.download_masked else None,
                          head=head if task.up_support_head else None)
    if allowed is not None:
        mask = mask & allowed
    return support_indices(mask)


def vector_digest(x: torch.Tensor) -> str:
    """A short, exact fingerprint of a float32 vector (its little-endian bytes), to compare w0 across machines."""
    data = x.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


__all__ = ["ClientReply", "ClientTask", "TrainSpec", "task_support", "train_spec", "vector_digest"]
