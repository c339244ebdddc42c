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

A file holds the whole :class:`~cellm.federated.client.ClientState`: the state before its round and the round's
outcome, kept *pending* (``pending_round`` in the file's metadata) until a later task says whether the server
accepted that upload. A node can therefore save right after training, before its reply is even sent: a late or
refused reply loses nothing, and a replayed round starts from exactly what it started from the first time.

Two ClientApps may work on the same client at once (a task relaunched, a leftover of a dead ServerApp): every
write goes to a temporary file of its own and is renamed into place under an exclusive per-client lock
(``fcntl.flock`` on ``client-<c>/.lock``), reads take the lock shared, so no reader sees a torn file and no
writer removes another's. A file that is not a cellm client state (torn, foreign, of another vector size) is an
error that names it; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cellm.federated.client import ClientState

_FILE = re.compile(r"^round-(\d+)\.safetensors$")
_TMP = re.compile(r"^\.round-\d+\..*\.tmp$")
_RUN_ID = re.compile(r"^[0-9a-f]{8,64}$")
FORMAT = "cellm-client-state/1"  # the metadata "format" of every file written here
_LOCK = ".lock"


class NodeStateError(ValueError):
    """A client-state file on this node that cannot be used (torn, foreign, or of another vector size)."""


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

    @contextlib.contextmanager
    def _locked(self, client: int, exclusive: bool) -> Iterator[None]:
        """Hold ``client``'s lock (exclusive to write, shared to read) for the block."""
        d = self._client_dir(client)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def load(self, client: int, round_: int, numel: int | None = None) -> ClientState:
        """The state ``client`` starts round ``round_`` from: its newest state saved before that round (to be
        settled with the task's ``acked_round``). ``numel``: the vector size every tensor must have."""
        if not self._client_dir(client).is_dir():
            return ClientState()
        with self._locked(client, exclusive=False):
            before = [r for r in self._rounds(client) if r < round_]
            if not before:
                return ClientState()
            return read_state(self._path(client, before[-1]), before[-1], numel)

    def save(self, client: int, round_: int, st: ClientState, checkpoint_round: int) -> None:
        """Keep ``client``'s state after ``round_`` (pending part included); drop files from lost rounds and files
        no resume can need."""
        d = self._client_dir(client)
        with self._locked(client, exclusive=True):
            for name in os.listdir(d):  # temporary files of writers that died (none is writing: we hold the lock)
                if _TMP.match(name):
                    (d / name).unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".round-{round_}.", suffix=".tmp", dir=d)
            try:
                os.close(fd)
                save_file(st.tensors(), tmp, metadata={"format": FORMAT, "pending_round": str(st.pending_round)})
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self._path(client, round_))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
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


@dataclass(frozen=True)
class RoundStore:
    """A node's :class:`NodeStateStore` as the :class:`~cellm.runtime.clients.ClientStore` of one train message:
    with the vector size every file must have and the round the server's last checkpoint holds."""

    store: NodeStateStore
    numel: int
    checkpoint_round: int

    def load(self, client: int, round_: int) -> ClientState:
        return self.store.load(client, round_, self.numel)

    def save(self, client: int, round_: int, state: ClientState) -> None:
        self.store.save(client, round_, state, self.checkpoint_round)


def read_state(path: str | Path, round_: int | None = None, numel: int | None = None) -> ClientState:
    """A client state written by :meth:`NodeStateStore.save`, checked: its format, known 1-D float32 tensors (of
    ``numel`` entries when given) and a pending round no later than the file's ``round_``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, the answer is the same clear error
        raise NodeStateError(f"{path} is not a readable client-state file ({type(exc).__name__}: {exc}); "
                             "remove it to restart this client's state from zero") from None
    if meta.get("format") != FORMAT:
        raise NodeStateError(f"{path} is not a cellm client-state file (format {meta.get('format')!r}, expected "
                             f"{FORMAT!r})")
    pending = meta.get("pending_round", "")
    if not re.fullmatch(r"\d{1,10}", pending) or (round_ is not None and int(pending) > round_):
        raise NodeStateError(f"{path}: pending_round {pending[:20]!r} is not a round up to {round_}")
    for k, v in tensors.items():
        if v.dtype != torch.float32 or v.dim() != 1 or (numel is not None and v.numel() != numel):
            raise NodeStateError(f"{path}: tensor {k!r} is {v.dtype} of shape {tuple(v.shape)}, expected float32 "
                                 f"of shape ({'n' if numel is None else numel},)")
    try:
        return ClientState.from_tensors(tensors, int(pending))
    except ValueError as exc:
        raise NodeStateError(f"{path}: {exc}") from None
