"""Client state that outlives a SuperNode's processes and a ServerApp's restart: one file per client and round.

A cellm client in a stateful mode (upload error feedback, delta downloads) keeps tensors between the rounds it
takes part in. Flower's ``context.state`` lives in the SuperNode's memory and is new for every Flower run, so a
resumed ServerApp (a new Flower run) would find it empty. The node therefore keeps each client's state on its own
disk, under ``<root>/<run id>/client-<c>/round-<t>.safetensors``, written atomically.

Exactness across a server restart: a task for round ``t`` starts from the newest file of a round before ``t``,
so rounds replayed after a resume (the server's checkpoint is older than the node's files) see the state they
saw the first time; files of rounds at or after ``t`` are from rounds the server lost, and are removed. Each task
says which round the server's last checkpoint holds; older files than the newest one up to it are never needed
again and are removed, so a client keeps at most a few files.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cellm.federated.client import ClientState

_FILE = re.compile(r"^round-(\d+)\.safetensors$")
_RUN_ID = re.compile(r"^[0-9a-f]{8,64}$")


class NodeStateStore:
    """The state of the cellm clients of one run on one node."""

    def __init__(self, root: str | Path, run_id: str) -> None:
        if not _RUN_ID.match(run_id):  # it names a folder: never a path from a message
            raise ValueError(f"run id must be 8-64 lowercase hex digits, got {run_id!r}")
        self.dir = Path(root) / run_id

    def _client_dir(self, client: int) -> Path:
        return self.dir / f"client-{int(client)}"

    def _rounds(self, client: int) -> list[int]:
        d = self._client_dir(client)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for f in os.listdir(d) if (m := _FILE.match(f)))

    def _path(self, client: int, round_: int) -> Path:
        return self._client_dir(client) / f"round-{round_}.safetensors"

    def load(self, client: int, round_: int) -> ClientState:
        """The state ``client`` starts round ``round_`` from: its newest state saved before that round."""
        before = [r for r in self._rounds(client) if r < round_]
        if not before:
            return ClientState()
        tensors = load_file(self._path(client, before[-1]))
        return ClientState(**{k: tensors[k] for k in ("residual", "copy") if k in tensors})

    def save(self, client: int, round_: int, st: ClientState, checkpoint_round: int) -> None:
        """Keep ``client``'s state after ``round_``; drop files from lost rounds and files no resume can need."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in (("residual", st.residual), ("copy", st.copy))
                   if isinstance(v, torch.Tensor)}
        d = self._client_dir(client)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".round-{round_}.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self._path(client, round_))
        rounds = self._rounds(client)
        keep_from = max([r for r in rounds if r <= checkpoint_round], default=0)
        for r in rounds:
            if r > round_ or r < keep_from:
                self._path(client, r).unlink(missing_ok=True)

    def clients(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name.split("-", 1)[1]) for p in self.dir.iterdir() if p.name.startswith("client-"))

    def remove(self) -> None:
        """The run is over: its client state is not needed again."""
        shutil.rmtree(self.dir, ignore_errors=True)
