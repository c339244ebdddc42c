"""How cellm's round objects travel in Flower messages, and which cellm clients a Flower node serves.

Pure translation, no algorithm: a :class:`~cellm.federated.client.ClientTask` becomes a ``RecordDict`` holding its
encoded download as one uint8 ``Array`` whose ``data`` *is* the cellm payload (no NumPy header, so
``ArrayRecord.count_bytes()`` is the payload length plus the key) and a ``ConfigRecord`` with the round's scalar
fields; a :class:`~cellm.federated.client.ClientReply` comes back the same way. Fields are mapped generically
from the dataclasses, so a field added to the core travels without edits here (scalars only; anything else
raises ``TypeError`` loudly).

Messages
--------
``query`` (setup, once per node and Flower run): ``cellm.setup`` = ConfigRecord{config: the resolved cellm config
TOML, digest: its sha256, run-id: the cellm run's id, kept across a resume}. The reply's ``cellm.node``
ConfigRecord lists the cellm client ids the node serves.

``query.finish`` (once per node, when the run has completed): ``cellm.finish`` = ConfigRecord{run-id}; the node
removes the run's client state. Empty reply.

``train`` (one per node and round, holding the round's tasks of every sampled cellm client the node serves, so a
node starts one process a round, not one per client): ``cellm.tasks`` = ConfigRecord{clients: [ids], the ClientTask
scalars (codec_up.<field> for the codec; a value shared by all clients once, one that differs as a list aligned
with clients), config-digest, checkpoint-round: the round the server's last checkpoint holds} and
``cellm.downloads`` = ArrayRecord{"<client id>": payload}. Reply: ``cellm.replies`` = ConfigRecord{clients,
round, num_examples, train_loss, nonzeros, extra.<key> (``ClientReply.extra``), packed the same way} and
``cellm.uploads`` = ArrayRecord{"<client id>": payload}.

Validation
----------
Every field another party sends is checked before use, with bounds (:data:`MAX_ROUND`, :data:`MAX_EXAMPLES`,
:data:`EXTRA_BOUNDS`, :func:`max_payload_bytes`) and a :class:`ProtocolError` that names the field: a node reads
a train message whose every field has its ``ClientTask`` type and range (an unknown field is refused: the
server runs other code); the server reads a reply whose client ids are in range and distinct, counts are ints in
range, the loss a non-negative number (NaN allowed: a client whose training diverged says so, its upload is
judged on its own), ``extra`` only the known keys as bounded non-negative floats, and payloads no larger than
an encoding of the whole vector can be. What a message claims about the run (whose clients, which round) is the
strategy's to check (:mod:`cellm.runtime.flower.server_app`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import typing
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from cellm.core.codec import HARD_MAX_N, CodecSpec
from cellm.core.support import UP_SUPPORTS
from cellm.federated.messages import ClientReply, ClientTask

PAYLOAD_STYPE = "cellm.payload"  # Array.data is the raw cellm message (dtype uint8, shape (len,))
SETUP, NODE, FINISH = "cellm.setup", "cellm.node", "cellm.finish"
FINISH_TYPE = "query.finish"  # message type of the end-of-run message
TASKS, DOWNLOADS = "cellm.tasks", "cellm.downloads"
REPLIES, UPLOADS = "cellm.replies", "cellm.uploads"
CLIENTS = "clients"
CONFIG_DIGEST, CHECKPOINT_ROUND, RUN_ID = "config-digest", "checkpoint-round", "run-id"
NOT_SET_UP = "train message before the run's setup message"  # a node that lost its setup (restarted) says so
STATE_CONFIG = "cellm.config"  # context.state key of the node's cellm config (set by the setup message)
_SCALARS = (bool, int, float, str)
MAX_ROUND = 2**31 - 1  # rounds and ranks: far above any run, and an int32 everywhere
MAX_CLIENTS = 1 << 20  # client ids (and so clients in one message) when the run's count is not known
MAX_EXAMPLES = 2**31  # a client's claimed example count
MAX_SECONDS = 1e6  # a reported duration
EXTRA_BOUNDS: dict[str, float] = {"codec_s": MAX_SECONDS}  # the keys a reply's extra may hold, and their bound
_MAX_STR = 4096  # a string setting of a task (codec names, digests)
_HEX = re.compile(r"^[0-9a-f]{1,64}$")


class ProtocolError(ValueError):
    """A Flower message that does not carry what cellm expects (wrong keys, wrong types, wrong client)."""


def _show(value: Any) -> str:
    """A value for an error message, cut short: a hostile party's string can be megabytes."""
    if isinstance(value, list | str | bytes) and len(value) > 16:
        return f"{repr(value[:16])[:60]}... ({type(value).__name__} of length {len(value)})"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise ProtocolError(f"{what} must be an int in [{lo}, {hi}], got {_show(value)}")
    return value


def _float(value: Any, what: str, lo: float, hi: float, nan_ok: bool = False) -> float:
    """A number (an int is taken as a float) in [lo, hi]; NaN only with ``nan_ok``; never inf."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{what} must be a number, got {_show(value)}")
    x = float(value)
    if math.isnan(x) and nan_ok:
        return x
    if not (math.isfinite(x) and lo <= x <= hi):
        raise ProtocolError(f"{what} must be a finite number in [{lo:g}, {hi:g}]{' or NaN' if nan_ok else ''}, "
                            f"got {_show(value)}")
    return x


def max_payload_bytes(n: int) -> int:
    """The most bytes an encoded cellm message of an n-entry vector can take (fp32 values, positions and block
    scales of every entry, and the header, with room to spare): a larger payload is refused unread."""
    return 8 * int(n) + 4096


# ------------------------------------------------------------------ payload bytes <-> Array

def payload_array(payload: bytes) -> Array:
    """The encoded cellm message as a uint8 Array: ``data`` holds exactly these bytes."""
    return Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=bytes(payload))


def array_payload(arr: Array) -> bytes:
    if arr.stype != PAYLOAD_STYPE or arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
        raise ProtocolError(f"expected a cellm payload array, got stype={arr.stype!r} dtype={arr.dtype!r} "
                            f"shape={tuple(arr.shape)} with {len(arr.data)} bytes")
    return bytes(arr.data)


# ------------------------------------------------------------------ config

def config_digest(toml_text: str) -> str:
    return hashlib.sha256(toml_text.encode()).hexdigest()


def setup_content(toml_text: str, run_id: str) -> RecordDict:
    return RecordDict({SETUP: ConfigRecord({"config": toml_text, "digest": config_digest(toml_text),
                                            RUN_ID: run_id})})


def read_setup(content: RecordDict) -> tuple[str, str, str]:
    """(config TOML, digest, run id) from a setup message; the digest is checked."""
    if SETUP not in content.config_records:
        raise ProtocolError(f"setup message has no '{SETUP}' record")
    rec = content.config_records[SETUP]
    text, digest, run_id = rec.get("config"), rec.get("digest"), rec.get(RUN_ID)
    if not isinstance(text, str) or digest != config_digest(text):
        raise ProtocolError("setup message: config digest does not match its TOML")
    if not isinstance(run_id, str) or not run_id:
        raise ProtocolError(f"setup message has no '{RUN_ID}'")
    return text, digest, run_id


def finish_content(run_id: str) -> RecordDict:
    return RecordDict({FINISH: ConfigRecord({RUN_ID: run_id})})


def read_finish(content: RecordDict) -> str:
    run_id = content.config_records[FINISH].get(RUN_ID) if FINISH in content.config_records else None
    if not isinstance(run_id, str) or not run_id:
        raise ProtocolError(f"finish message has no '{FINISH}' record with a '{RUN_ID}'")
    return run_id


# ------------------------------------------------------------------ tasks (one message per node and round)
#
# Two records a message, whatever the number of clients: the scalars in one ConfigRecord (a field equal for every
# client once, a field that differs as a list aligned with "clients"), the payloads in one ArrayRecord keyed by
# client id. Each record costs an object of its own on the wire (ids, headers), so fewer records, fewer bytes.

def _pack(rows: list[dict[str, Any]], rec: ConfigRecord, what: str) -> None:
    """Put ``rows`` (one dict of scalars per client, same keys) into ``rec``: shared values once, others as lists."""
    for key in rows[0]:
        values = [r[key] for r in rows]
        bad = [v for v in values if not isinstance(v, _SCALARS)]
        if bad:
            raise TypeError(f"{what}.{key} is {type(bad[0]).__name__}; the Flower protocol carries scalars only")
        if all(type(v) is type(values[0]) and v == values[0] for v in values):
            rec[key] = values[0]
        else:
            if len({type(v) for v in values}) != 1:
                raise TypeError(f"{what}.{key} has values of different types across clients: {values}")
            rec[key] = values


def _unpack(rec: ConfigRecord, n: int, skip: tuple[str, ...]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in rec.items():
        if key in skip:
            continue
        if isinstance(value, list):
            if len(value) != n:
                raise ProtocolError(f"record field {key!r} has {len(value)} values for {n} clients")
            for row, v in zip(rows, value, strict=True):
                row[key] = v
        else:
            for row in rows:
                row[key] = value
    return rows


def _task_row(task: ClientTask) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for f in dataclasses.fields(ClientTask):
        value = getattr(task, f.name)
        if f.name in ("download", "client"):  # the payload travels as an array; the id is in "clients"
            continue
        if isinstance(value, CodecSpec):
            for g in dataclasses.fields(CodecSpec):
                row[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            row[f.name] = value
    return row


def _task_defaults() -> dict[str, Any]:
    """The values a reader fills in for absent fields: the dataclasses' own defaults."""
    out = {f"codec_up.{g.name}": g.default for g in dataclasses.fields(CodecSpec)}
    out.update({f.name: f.default for f in dataclasses.fields(ClientTask) if f.default is not dataclasses.MISSING})
    return out


def task_content(tasks: ClientTask | list[ClientTask], digest: str, checkpoint_round: int = 0) -> RecordDict:
    """The train message for one node: the round's tasks of the cellm clients it serves. A setting at its
    default for every client is left out (the reader fills it in): most settings are, and each costs bytes."""
    tasks = [tasks] if isinstance(tasks, ClientTask) else list(tasks)
    if not tasks or len({t.client for t in tasks}) != len(tasks):
        raise ValueError("a train message needs tasks of distinct clients")
    rec = ConfigRecord({CLIENTS: [int(t.client) for t in tasks]})
    rows = [_task_row(t) for t in tasks]
    defaults = _task_defaults()
    at_default = [k for k in rows[0] if k in defaults and all(type(r[k]) is type(defaults[k]) and r[k] == defaults[k]
                                                               for r in rows)]
    for r in rows:
        for k in at_default:
            del r[k]
    _pack(rows, rec, "ClientTask")
    rec[CONFIG_DIGEST] = digest
    rec[CHECKPOINT_ROUND] = int(checkpoint_round)
    arrays = ArrayRecord({str(t.client): payload_array(t.download) for t in tasks})
    return RecordDict({TASKS: rec, DOWNLOADS: arrays})


def _clients(rec: ConfigRecord, what: str, num_clients: int | None = None, allow_empty: bool = False) -> list[int]:
    """The message's client ids: distinct ints in [0, num_clients) (or [0, MAX_CLIENTS) when not known)."""
    clients = rec.get(CLIENTS)
    hi = (MAX_CLIENTS if num_clients is None else num_clients) - 1
    if (not isinstance(clients, list) or not (clients or allow_empty) or len(clients) > hi + 1
            or not all(_is_int(c) and 0 <= c <= hi for c in clients) or len(set(clients)) != len(clients)):
        raise ProtocolError(f"{what}: '{CLIENTS}' must be a {'' if allow_empty else 'non-empty '}list of distinct "
                            f"client ids in [0, {hi}], got {_show(clients)}")
    return clients


def _payloads(content: RecordDict, key: str, clients: list[int], what: str,
              max_bytes: int | None = None) -> dict[int, bytes]:
    if key not in content.array_records:
        raise ProtocolError(f"{what} has no '{key}' record (records: {sorted(content.keys())})")
    arrays = content.array_records[key]
    if sorted(arrays.keys()) != sorted(str(c) for c in clients):
        raise ProtocolError(f"{what}: payloads for {_show(sorted(arrays.keys()))}, clients {_show(clients)}")
    out = {}
    for c in clients:
        arr = arrays[str(c)]
        if max_bytes is not None and len(arr.data) > max_bytes:
            raise ProtocolError(f"{what}: the payload of client {c} has {len(arr.data)} bytes, more than the "
                                f"{max_bytes} any encoding of the vector takes")
        out[c] = array_payload(arr)
    return out


_TASK_TYPES: dict[str, Any] = typing.get_type_hints(ClientTask)
_CODEC_TYPES: dict[str, Any] = typing.get_type_hints(CodecSpec)
_TASK_KEYS = frozenset(
    [f"{f.name}.{g.name}" for f in dataclasses.fields(ClientTask) if _TASK_TYPES[f.name] is CodecSpec
     for g in dataclasses.fields(CodecSpec)]
    + [f.name for f in dataclasses.fields(ClientTask)
       if f.name not in ("download", "client") and _TASK_TYPES[f.name] is not CodecSpec])


def _typed(value: Any, kind: Any, what: str) -> Any:
    """``value`` as a scalar field of type ``kind`` (an int is taken for a float); ProtocolError otherwise."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{what} must be a bool, got {_show(value)}")
        return value
    if kind is int:
        return _int(value, what, -MAX_ROUND, MAX_ROUND)  # the field's own range is checked by _check_task
    if kind is float:
        return _float(value, what, -math.inf, math.inf)
    if kind is str:
        if not isinstance(value, str) or len(value) > _MAX_STR:
            raise ProtocolError(f"{what} must be a string of at most {_MAX_STR} characters, got {_show(value)}")
        return value
    raise ProtocolError(f"{what}: a field of type {kind} cannot travel in a train message")


def _check_task(task: ClientTask) -> None:
    """The ranges of a task's settings (their types are checked already)."""
    what = f"train message, client {task.client}:"
    _int(task.round, f"{what} round", 1, MAX_ROUND)
    _int(task.acked_round, f"{what} acked_round", 0, task.round - 1)
    if not 0 < task.up_density <= 1:
        raise ProtocolError(f"{what} up_density must be in (0, 1], got {_show(task.up_density)}")
    if task.download_mode not in ("weights", "delta"):
        raise ProtocolError(f"{what} download_mode must be 'weights' or 'delta', got {_show(task.download_mode)}")
    _int(task.support_rank, f"{what} support_rank", 0, MAX_ROUND)
    _int(task.stage, f"{what} stage", 0, 2)
    if task.up_support not in UP_SUPPORTS:
        raise ProtocolError(f"{what} up_support must be one of {', '.join(UP_SUPPORTS)}, got {_show(task.up_support)}")
    if task.up_support_head and task.up_support == "topk":
        raise ProtocolError(f"{what} up_support_head needs a shared up_support, got 'topk'")
    if task.init_digest and not _HEX.match(task.init_digest):
        raise ProtocolError(f"{what} init_digest must be empty or 1-64 lowercase hex digits, got "
                            f"{_show(task.init_digest)}")
    try:
        task.codec_up.validate()
    except ValueError as exc:
        raise ProtocolError(f"{what} {exc}") from None


def read_tasks(content: RecordDict, max_payload: int | None = None) -> tuple[list[ClientTask], str, int]:
    """(tasks, config digest, the round of the server's last checkpoint) from a train message; every field is
    checked (type and range; ``max_payload`` bounds each download's bytes)."""
    if TASKS not in content.config_records:
        raise ProtocolError(f"train message has no '{TASKS}' record (records: {sorted(content.keys())})")
    rec = content.config_records[TASKS]
    unknown = sorted(k for k in rec if k not in _TASK_KEYS and k not in (CLIENTS, CONFIG_DIGEST, CHECKPOINT_ROUND))
    if unknown:
        raise ProtocolError(f"train message has fields this node does not know: {_show(unknown)} (the server runs "
                            "another version of cellm)")
    clients = _clients(rec, "train message")
    payloads = _payloads(content, DOWNLOADS, clients, "train message", max_payload)
    rows = _unpack(rec, len(clients), (CLIENTS, CONFIG_DIGEST, CHECKPOINT_ROUND))
    tasks = []
    for c, row in zip(clients, rows, strict=True):
        kwargs: dict[str, Any] = {"download": payloads[c], "client": c}
        for f in dataclasses.fields(ClientTask):
            kind = _TASK_TYPES[f.name]
            if f.name in ("download", "client"):
                continue
            if kind is CodecSpec:
                prefix = f"{f.name}."
                kwargs[f.name] = CodecSpec(**{k[len(prefix):]: _typed(v, _CODEC_TYPES[k[len(prefix):]],
                                                                      f"train message, client {c}: {k}")
                                              for k, v in row.items() if k.startswith(prefix)})
            elif f.name in row:
                kwargs[f.name] = _typed(row[f.name], kind, f"train message, client {c}: {f.name}")
        try:
            task = ClientTask(**kwargs)
        except TypeError as exc:
            raise ProtocolError(f"train message: {exc}") from None
        _check_task(task)
        tasks.append(task)
    digest = rec.get(CONFIG_DIGEST)
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ProtocolError(f"train message: {CONFIG_DIGEST} must be 64 lowercase hex digits, got {_show(digest)}")
    first = min(t.round for t in tasks)
    checkpoint_round = _int(rec.get(CHECKPOINT_ROUND, 0), f"train message: {CHECKPOINT_ROUND}", 0, first - 1)
    return tasks, digest, checkpoint_round


# ------------------------------------------------------------------ replies

def reply_content(replies: list[tuple[int, int, ClientReply]]) -> RecordDict:
    """A node's reply: (client, round, ClientReply) for each task it was sent."""
    if not replies:
        raise ValueError("a reply needs at least one client's upload")
    rec = ConfigRecord({CLIENTS: [int(c) for c, _, _ in replies]})
    rows = []
    for _, round_, reply in replies:
        row = {"round": int(round_), "num_examples": int(reply.num_examples), "train_loss": float(reply.train_loss),
               "nonzeros": int(reply.nonzeros)}
        row.update({f"extra.{k}": v for k, v in reply.extra.items()})
        rows.append(row)
    if len({tuple(r) for r in rows}) != 1:
        raise TypeError("ClientReply.extra must have the same keys for every client of a reply")
    _pack(rows, rec, "ClientReply")
    arrays = ArrayRecord({str(c): payload_array(reply.payload) for c, _, reply in replies})
    return RecordDict({REPLIES: rec, UPLOADS: arrays})


_REPLY_KEYS = ("round", "num_examples", "train_loss", "nonzeros")


def read_replies(content: RecordDict, *, num_clients: int | None = None,
                 numel: int | None = None) -> list[tuple[int, int, ClientReply]]:
    """[(client, round, ClientReply)] from a node's train reply, every field checked: client ids in
    [0, num_clients), payloads of at most :func:`max_payload_bytes` (numel), nonzeros in [0, numel], the other
    fields as the module docstring says. Any defect refuses the whole message (ProtocolError)."""
    if REPLIES not in content.config_records:
        raise ProtocolError(f"train reply has no '{REPLIES}' record (records: {sorted(content.keys())})")
    rec = content.config_records[REPLIES]
    known = {CLIENTS, *_REPLY_KEYS, *(f"extra.{k}" for k in EXTRA_BOUNDS)}
    unknown = sorted(k for k in rec if k not in known)
    if unknown:
        raise ProtocolError(f"train reply has unknown fields {_show(unknown)} (known: {sorted(known)})")
    clients = _clients(rec, "train reply", num_clients)
    payloads = _payloads(content, UPLOADS, clients, "train reply", None if numel is None else max_payload_bytes(numel))
    max_k = HARD_MAX_N if numel is None else numel
    out = []
    for c, row in zip(clients, _unpack(rec, len(clients), (CLIENTS,)), strict=True):
        what = f"train reply, client {c}:"
        missing = [k for k in _REPLY_KEYS if k not in row]
        if missing:
            raise ProtocolError(f"{what} no {missing}")
        extra = {k[len("extra."):]: _float(v, f"{what} {k}", 0.0, EXTRA_BOUNDS[k[len("extra."):]])
                 for k, v in row.items() if k.startswith("extra.")}
        reply = ClientReply(payload=payloads[c],
                            num_examples=_int(row["num_examples"], f"{what} num_examples", 0, MAX_EXAMPLES),
                            train_loss=_float(row["train_loss"], f"{what} train_loss", 0.0, math.inf, nan_ok=True),
                            nonzeros=_int(row["nonzeros"], f"{what} nonzeros", 0, max_k), extra=extra)
        out.append((c, _int(row["round"], f"{what} round", 1, MAX_ROUND), reply))
    return out


# ------------------------------------------------------------------ node -> cellm clients

def served_clients(node_config: dict[str, Any], num_clients: int) -> list[int]:
    """The cellm client ids a Flower node serves, from its node config.

    ``cellm-clients = "0,3,7"`` lists them; otherwise ``partition-id = p`` and ``num-partitions = n`` serve
    every client ``c`` with ``c % n == p`` (Flower's simulation sets these two for each virtual node).
    """
    if "cellm-clients" in node_config:
        raw = str(node_config["cellm-clients"]).replace(" ", "")
        try:
            ids = sorted({int(x) for x in raw.split(",") if x})
        except ValueError:
            raise ProtocolError(f"node config cellm-clients must be comma-separated ints, got {raw!r}") from None
        bad = [c for c in ids if not 0 <= c < num_clients]
        if bad:
            raise ProtocolError(f"node config cellm-clients has ids outside [0, {num_clients}): {bad}")
        return ids
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ProtocolError("node config must set partition-id and num-partitions (or cellm-clients), e.g. "
                            "--node-config 'partition-id=0 num-partitions=2'")
    p, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if n < 1 or not 0 <= p < n:
        raise ProtocolError(f"node config needs 0 <= partition-id < num-partitions, got {p} and {n}")
    return [c for c in range(num_clients) if c % n == p]


def node_content(clients: list[int], node_config: dict[str, Any]) -> RecordDict:
    desc = " ".join(f"{k}={v}" for k, v in sorted(node_config.items()))
    return RecordDict({NODE: ConfigRecord({"clients": [int(c) for c in clients], "node-config": desc})})


def read_node(content: RecordDict, num_clients: int | None = None) -> list[int]:
    """The cellm client ids a node's setup reply claims: distinct ints in [0, num_clients) (possibly none)."""
    if NODE not in content.config_records:
        raise ProtocolError(f"setup reply has no '{NODE}' record")
    return _clients(content.config_records[NODE], "setup reply", num_clients, allow_empty=True)


# ------------------------------------------------------------------ what a message costs on the wire

def transport_size(msg: Any) -> int:
    """Bytes Flower serializes for ``msg`` (a Message or a RecordDict): every object of its tree (the message, its
    records, its arrays)
    deflated as Flower pushes them to the SuperLink, headers and metadata included. gRPC's own framing (a few
    bytes a frame) is not counted."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())

