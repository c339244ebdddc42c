"""The client update: decode the download, train the whole adapter densely, send a sparse delta."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from cellm.core.codec import CodecError, decode
from cellm.core.feedback import compress, compress_on
from cellm.core.optim import make_optimizer
from cellm.core.secagg import QuantSpec
from cellm.core.secagg.quantize import pack_ring
from cellm.core.sparse import SparseVector
from cellm.core.support import head_mask
from cellm.data.types import Split
from cellm.errors import CellmError
from cellm.federated.messages import ClientReply, ClientTask, TrainSpec, task_support, vector_digest
from cellm.federated.secure import ring_values
from cellm.federated.seeds import BATCHES, DROPOUT, derive
from cellm.models.device import autocast, model_device
from cellm.models.flat import FlatView, rank_support


@dataclass
class ClientState:
    """What a client keeps between the rounds it takes part in (nothing, in FLASC's default).

    A client cannot know whether the server accepted its upload (it may be late, refused, or lost), so the
    state after a round is kept *pending* beside the state before it. The next task says which round the server
    last accepted from this client (``ClientTask.acked_round``); :meth:`settle` keeps the pending state only if
    that is its round. A refused or late upload therefore leaves client and server where the server thinks they
    are: its round never happened, as for a client that dropped out.
    """

    residual: torch.Tensor | None = None  # upload error feedback
    copy: torch.Tensor | None = None  # last global adapter received (delta download mode)
    pending_round: int = 0  # the round whose outcome is not known yet (0: none)
    pending_residual: torch.Tensor | None = None
    pending_copy: torch.Tensor | None = None

    TENSORS = ("residual", "copy", "pending_residual", "pending_copy")

    def settle(self, acked_round: int) -> ClientState:
        """The state to start a round from, given the server's last accepted round for this client."""
        if not self.pending_round:
            return ClientState(self.residual, self.copy)
        if acked_round == self.pending_round:
            return ClientState(self.pending_residual, self.pending_copy)
        return ClientState(self.residual, self.copy)

    def keeps_anything(self) -> bool:
        return any(getattr(self, k) is not None for k in self.TENSORS)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to keep on disk or in a checkpoint (``pending_round`` travels beside them)."""
        return {k: getattr(self, k).detach().cpu().contiguous() for k in self.TENSORS
                if isinstance(getattr(self, k), torch.Tensor)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], pending_round: int = 0) -> ClientState:
        unknown = set(tensors) - set(cls.TENSORS)
        if unknown:
            raise ValueError(f"client state has unknown tensors {sorted(unknown)}")
        if not isinstance(pending_round, int) or isinstance(pending_round, bool) or pending_round < 0:
            raise ValueError(f"client state pending_round must be an int >= 0, got {pending_round!r}")
        return cls(pending_round=pending_round, **{k: tensors[k].to(torch.float32) for k in tensors})


class InitMismatchError(CellmError):
    """The client's regenerated initial adapter w0 is not the server's: training from it would be garbage."""


def _batches(n: int, spec: TrainSpec, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches: local_epochs passes over a fresh shuffle, or local_steps batches cycling through shuffles."""
    steps = spec.local_epochs * math.ceil(n / spec.batch_size) if spec.local_epochs > 0 else spec.local_steps
    out: list[torch.Tensor] = []
    perm, pos = torch.randperm(n, generator=gen), 0
    while len(out) < steps:
        if pos >= n:
            perm, pos = torch.randperm(n, generator=gen), 0
        out.append(perm[pos:pos + spec.batch_size])
        pos += spec.batch_size
    return out


def local_train(
    model: torch.nn.Module, flat: FlatView, start: torch.Tensor, data: Split, spec: TrainSpec, *,
    seed: int, round_: int, client: int, grad_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Train the adapter densely from ``start`` on ``data``; returns (trained flat vector, mean train loss).

    A fresh optimizer each round (FLASC). ``grad_mask`` multiplies the gradients (client_freeze). Batches go
    to the model's device; ``start`` and the returned vector are CPU vectors.
    """
    device = model_device(model)
    flat.set(start)
    gen = torch.Generator().manual_seed(derive(seed, round_, client, BATCHES))
    opt = make_optimizer(spec.optimizer, flat.params, lr=spec.lr, momentum=spec.momentum,
                         weight_decay=spec.weight_decay)
    masks = None
    if grad_mask is not None:
        masks = [grad_mask[a:b].view(p.shape).to(device=p.device, dtype=p.dtype)
                 for p, a, b in zip(flat.params, flat.offsets[:-1], flat.offsets[1:], strict=True)]
    losses = []
    model.train()
    # fp16 on a GPU needs loss scaling, or small gradients flush to zero; elsewhere the scaler passes through
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16" and device.type == "cuda")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive(seed, round_, client, DROPOUT))
        for idx in _batches(len(data), spec, gen):
            with autocast(device, spec.precision):
                out = model(input_ids=data.input_ids[idx].to(device), attention_mask=data.attention_mask[idx].to(device),
                            labels=data.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            if masks is not None:
                for p, m in zip(flat.params, masks, strict=True):
                    if p.grad is not None:
                        p.grad.mul_(m)
            if spec.max_grad_norm > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(flat.params, spec.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            losses.append(float(out.loss.detach()))
    model.eval()
    return flat.get(), sum(losses) / len(losses)


def client_update(
    model: torch.nn.Module, flat: FlatView, data: Split, task: ClientTask, spec: TrainSpec,
    state: ClientState, *, seed: int, w0: torch.Tensor | None = None,
) -> tuple[ClientReply, ClientState]:
    """One client's round. The download is decoded strictly; a malformed one raises CodecError (nothing trained).

    ``w0`` is the seeded initial adapter this client regenerated; an init-relative task (``init_digest`` set)
    adds the download to it, after checking that it is the server's w0 (InitMismatchError otherwise).
    """
    state = state.settle(task.acked_round)
    t0 = time.perf_counter()
    msg = decode(task.download, max_n=flat.numel, expected_n=flat.numel)
    received = msg.to_dense()
    codec_s = time.perf_counter() - t0
    support = rank_support(flat, task.support_rank) if task.support_rank else None
    ref = torch.zeros(flat.numel)
    if task.init_digest:
        if w0 is None or w0.numel() != flat.numel:
            raise InitMismatchError("this task is relative to the seeded initial adapter w0, but the client was "
                                    "given none of the adapter's size")
        mine = vector_digest(w0)
        if mine != task.init_digest:
            raise InitMismatchError(
                f"the initial adapter regenerated here (digest {mine}) differs from the server's "
                f"({task.init_digest}): another torch build, model or LoRA init; refusing to train on it")
        ref = w0.to(torch.float32)
    if task.download_mode == "delta":
        base = state.copy if state.copy is not None else ref.clone()
        start = base + received
    else:
        start = (ref if support is None else torch.where(support, ref, torch.zeros_like(ref))) + received
    grad_mask = None
    if task.client_freeze and task.download_masked:  # train and upload on the download's support M
        grad_mask = torch.zeros(flat.numel, dtype=torch.bool)
        grad_mask[msg.indices] = True
    if support is not None:
        grad_mask = support if grad_mask is None else grad_mask & support
    trained, loss = local_train(model, flat, start, data, spec, seed=seed, round_=task.round,
                                client=task.client, grad_mask=grad_mask)
    delta = start - trained  # a negative update: the server steps along -delta
    residual = state.residual
    if task.error_feedback and residual is None:
        residual = torch.zeros(flat.numel)
    t0 = time.perf_counter()
    shared = None
    if task.up_support != "topk":  # a support fixed before training: values only, in the support's order
        download = None
        if task.download_masked:
            download = torch.zeros(flat.numel, dtype=torch.bool)
            download[msg.indices] = True
        head = head_mask(flat.segments(), flat.numel) if task.up_support_head else None
        shared = task_support(task, flat.numel, seed, download=download, head=head, allowed=grad_mask)
    if shared is None:
        payload, sent, new_residual = compress(delta, task.up_density, task.codec_up, residual,
                                               support=grad_mask)
    elif task.ring_bits:  # secure aggregation: ring values, masked by the runtime before anything is sent
        payload, sent, new_residual = ring_upload(delta, shared, task, residual, seed)
    else:
        payload, sent, new_residual = compress_on(delta, shared, task.codec_up, residual)
    codec_s += time.perf_counter() - t0
    new_state = ClientState(
        residual=state.residual, copy=state.copy, pending_round=task.round,
        pending_residual=new_residual if task.error_feedback else None,
        pending_copy=start if task.download_mode == "delta" else None,
    )
    return ClientReply(payload, len(data), loss, sent.k, {"codec_s": codec_s}), new_state


def ring_upload(delta: torch.Tensor, shared: torch.Tensor, task: ClientTask, residual: torch.Tensor | None,
                seed: int) -> tuple[bytes, SparseVector, torch.Tensor | None]:
    """A secure-aggregation upload before masking: the values on the shared support, clipped to the public bound
    and rounded into the ring (:func:`cellm.federated.secure.ring_values`), packed R bits a value. These bytes
    never leave the client as they are: the runtime masks them (``cellm.runtime.clients.run_tasks``). Error
    feedback keeps what the clip and the rounding cut."""
    target = delta if residual is None else delta + residual
    quant = QuantSpec(clip=task.ring_clip, value_bits=task.ring_bits, max_clients=task.ring_clients)
    q, values = ring_values(target[shared], quant, seed, task.round, task.client)
    sent = SparseVector(target.numel(), shared, values)
    new_residual = None if residual is None else target - sent.to_dense()
    return pack_ring(q, quant.ring_bits), sent, new_residual


__all__ = ["ClientState", "CodecError", "InitMismatchError", "client_update", "local_train"]
