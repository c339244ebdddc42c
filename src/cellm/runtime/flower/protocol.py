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
``cellm.uploads`` = ArrayRecord{"<client id>": payload}. Under secure aggregation each task also carries
``secagg_routed`` (the shares routed to its client, a list of bytes aligned with clients) and its ring
(``ring_bits``, ``ring_clip``, ``ring_clients``), and each upload is the client's masked vector.

``query.secagg_advertise``, ``query.secagg_share``, ``query.secagg_unmask`` (secure aggregation, one per node and
stage of a round, for every sampled client the node serves): ``cellm.secagg``, see the section below.

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
from cellm.core.secagg import SecAggError, SecAggParams
from cellm.core.secagg.params import MAX_LENGTH
from cellm.core.secagg.quantize import MAX_CLIENTS as SECAGG_MAX_CLIENTS
from cellm.core.secagg.wire import (
    ShareKind,
    advertise_size,
    keys_size,
    parse_advertise,
    parse_keys,
    parse_shares,
    parse_unmask,
    parse_unmask_request,
    routed_size,
    shares_size,
    unmask_request_size,
    unmask_size,
)
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
STATE_SECAGG = "cellm.secagg-state"  # context.state key of the node's clients' secure-aggregation states (secret)
ROUTED = "secagg_routed"  # a train message's field: each client's routed shares (secure aggregation), as bytes
_NOT_SCALARS = ("download", "client", "secagg_routed")  # task fields that do not travel as generic scalars
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
        if f.name in _NOT_SCALARS:  # the payloads travel apart; the id is in "clients"
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
    if any(t.secagg_routed for t in tasks):  # secure aggregation: the shares routed to each client, as bytes
        rec[ROUTED] = [bytes(t.secagg_routed) for t in tasks]
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
       if f.name not in _NOT_SCALARS and _TASK_TYPES[f.name] is not CodecSpec])


def max_routed_bytes(ring_clients: int) -> int:
    """The most bytes a task's ``secagg_routed`` can take in a round of at most ``ring_clients`` clients (the
    shares of every other client); 0 without secure aggregation."""
    return routed_size(ring_clients - 1) if ring_clients >= 2 else 0


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
    _check_ring(task, what)
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


def _check_ring(task: ClientTask, what: str) -> None:
    """Secure aggregation's fields: all off, or a ring every client of the round can share (its values are checked
    against the node's own config by the node) and routed shares no larger than such a round's."""
    if task.ring_bits == 0:
        if task.ring_clip != 0 or task.ring_clients != 0 or task.secagg_routed:
            raise ProtocolError(f"{what} ring_clip, ring_clients and secagg_routed must be unset when ring_bits "
                                f"is 0, got {_show(task.ring_clip)}, {_show(task.ring_clients)} and "
                                f"{len(task.secagg_routed)} bytes")
        return
    _int(task.ring_bits, f"{what} ring_bits", 2, 32)
    _float(task.ring_clip, f"{what} ring_clip", 0.0, math.inf)
    if task.ring_clip <= 0:
        raise ProtocolError(f"{what} ring_clip must be > 0 with ring_bits set, got {_show(task.ring_clip)}")
    _int(task.ring_clients, f"{what} ring_clients", 2, SECAGG_MAX_CLIENTS)
    if task.up_support == "topk":
        raise ProtocolError(f"{what} secure aggregation (ring_bits) needs a shared up_support, got 'topk'")
    limit = max_routed_bytes(task.ring_clients)
    if not 0 < len(task.secagg_routed) <= limit:
        raise ProtocolError(f"{what} secagg_routed has {len(task.secagg_routed)} bytes; a round of at most "
                            f"{task.ring_clients} clients routes 1 to {limit}")


def read_tasks(content: RecordDict, max_payload: int | None = None) -> tuple[list[ClientTask], str, int]:
    """(tasks, config digest, the round of the server's last checkpoint) from a train message; every field is
    checked (type and range; ``max_payload`` bounds each download's bytes)."""
    if TASKS not in content.config_records:
        raise ProtocolError(f"train message has no '{TASKS}' record (records: {sorted(content.keys())})")
    rec = content.config_records[TASKS]
    unknown = sorted(k for k in rec if k not in _TASK_KEYS and k not in (CLIENTS, CONFIG_DIGEST, CHECKPOINT_ROUND,
                                                                         ROUTED))
    if unknown:
        raise ProtocolError(f"train message has fields this node does not know: {_show(unknown)} (the server runs "
                            "another version of cellm)")
    clients = _clients(rec, "train message")
    payloads = _payloads(content, DOWNLOADS, clients, "train message", max_payload)
    routed = _routed(rec.get(ROUTED, None), len(clients))
    rows = _unpack(rec, len(clients), (CLIENTS, CONFIG_DIGEST, CHECKPOINT_ROUND, ROUTED))
    tasks = []
    for c, row, shares in zip(clients, rows, routed, strict=True):
        kwargs: dict[str, Any] = {"download": payloads[c], "client": c, "secagg_routed": shares}
        for f in dataclasses.fields(ClientTask):
            kind = _TASK_TYPES[f.name]
            if f.name in _NOT_SCALARS:
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


def _routed(value: Any, n: int) -> list[bytes]:
    """The train message's ``secagg_routed``: absent (no secure aggregation), or one bytes a client, each bounded
    by the largest a round can route (a task's own bound is checked with its ring_clients)."""
    if value is None:
        return [b""] * n
    most = max_routed_bytes(SECAGG_MAX_CLIENTS)
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(v, bytes) and len(v) <= most for v in value)):
        raise ProtocolError(f"train message: {ROUTED} must be a list of {n} byte strings of at most {most} bytes, "
                            f"got {_show(value)}")
    return value


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


# ------------------------------------------------------------------ secure aggregation's stages
#
# One query message a stage and node, for every sampled client the node serves: ``cellm.secagg`` =
# ConfigRecord{stage, round, round-clients: the round's sampled ids (sorted), length: |S|, params-digest: the
# hex digest of the round's SecAggParams, config-digest, clients: [the node's ids], payloads: [bytes] aligned with
# clients (absent in "advertise")}. The node rebuilds the round's parameters from its own config and these public
# fields and refuses the message unless the digests match. Reply: ``cellm.secagg`` = ConfigRecord{stage, round,
# clients, payloads}. The payloads are SecAgg+ messages (:mod:`cellm.core.secagg.wire`): each is checked against
# the round's parameters and what its client was sent (:func:`read_secagg_part`) before the protocol uses it.

SECAGG = "cellm.secagg"
SECAGG_STAGES = ("advertise", "share", "unmask")
SECAGG_TYPES = {s: f"query.secagg_{s}" for s in SECAGG_STAGES}  # message type of each stage
STAGE, ROUND, ROUND_CLIENTS, LENGTH, PARAMS_DIGEST, PAYLOADS = (
    "stage", "round", "round-clients", "length", "params-digest", "payloads")
_QUERY_KEYS = frozenset({STAGE, ROUND, ROUND_CLIENTS, LENGTH, PARAMS_DIGEST, CONFIG_DIGEST, CLIENTS, PAYLOADS})
_REPLY_KEYS_SECAGG = frozenset({STAGE, ROUND, CLIENTS, PAYLOADS})


@dataclasses.dataclass(frozen=True)
class SecAggQuery:
    """A stage message as a node reads it: the round's public fields and the node's clients' inputs."""

    stage: str
    round: int
    round_clients: list[int]
    length: int
    params_digest: str
    config_digest: str
    parts: dict[int, bytes]  # the node's client -> its input (empty in "advertise")


def secagg_content(stage: str, round_: int, params: SecAggParams, digest: str,
                   parts: dict[int, bytes]) -> RecordDict:
    """A stage message for one node: the round's public parameters and, by client, what the protocol sends it."""
    if stage not in SECAGG_STAGES or not parts:
        raise ValueError(f"a secagg message needs a stage of {SECAGG_STAGES} and clients, got {stage!r}")
    clients = sorted(parts)
    rec = ConfigRecord({STAGE: stage, ROUND: int(round_), ROUND_CLIENTS: [int(c) for c in params.client_ids],
                        LENGTH: int(params.length), PARAMS_DIGEST: params.digest.hex(), CONFIG_DIGEST: digest,
                        CLIENTS: [int(c) for c in clients]})
    if stage != "advertise":
        rec[PAYLOADS] = [bytes(parts[c]) for c in clients]
    return RecordDict({SECAGG: rec})


def _secagg_record(content: RecordDict, what: str, keys: frozenset[str], required: frozenset[str]) -> ConfigRecord:
    if SECAGG not in content.config_records:
        raise ProtocolError(f"{what} has no '{SECAGG}' record (records: {_show(sorted(content.keys()))})")
    rec = content.config_records[SECAGG]
    unknown, missing = sorted(k for k in rec if k not in keys), sorted(required - set(rec))
    if unknown or missing:
        raise ProtocolError(f"{what}: unknown fields {_show(unknown)}, missing fields {missing}")
    return rec


def _blobs(value: Any, n: int, most: int, what: str) -> list[bytes]:
    """``payloads``: n byte strings (aligned with the clients), each of 1 to ``most`` bytes."""
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(v, bytes) and 0 < len(v) <= most for v in value)):
        raise ProtocolError(f"{what}: '{PAYLOADS}' must be a list of {n} byte strings of 1 to {most} bytes, "
                            f"got {_show(value)}")
    return value


def read_secagg_query(content: RecordDict, stage: str) -> SecAggQuery:
    """A stage message (on the node), every field checked: the stage its type says, the round, the round's
    sampled clients (2 to the most a ring allows, increasing), |S|, the digests, the node's clients (among the
    round's), and inputs no larger than the stage's message for a round of that many clients."""
    what = f"secagg {stage} message"
    required = _QUERY_KEYS - {PAYLOADS} if stage == "advertise" else _QUERY_KEYS
    rec = _secagg_record(content, what, required, required)
    if rec[STAGE] != stage:
        raise ProtocolError(f"{what}: its '{STAGE}' field says {_show(rec[STAGE])}")
    round_ = _int(rec[ROUND], f"{what}: {ROUND}", 1, MAX_ROUND)
    everyone = rec[ROUND_CLIENTS]
    if (not isinstance(everyone, list) or not 2 <= len(everyone) <= SECAGG_MAX_CLIENTS
            or not all(_is_int(c) and 0 <= c < MAX_CLIENTS for c in everyone)
            or any(a >= b for a, b in zip(everyone, everyone[1:], strict=False))):
        raise ProtocolError(f"{what}: '{ROUND_CLIENTS}' must be 2 to {SECAGG_MAX_CLIENTS} increasing client ids "
                            f"in [0, {MAX_CLIENTS}), got {_show(everyone)}")
    length = _int(rec[LENGTH], f"{what}: {LENGTH}", 1, MAX_LENGTH)
    for key, digits in ((PARAMS_DIGEST, 32), (CONFIG_DIGEST, 64)):
        if not isinstance(rec[key], str) or not re.fullmatch(f"[0-9a-f]{{{digits}}}", rec[key]):
            raise ProtocolError(f"{what}: '{key}' must be {digits} lowercase hex digits, got {_show(rec[key])}")
    clients = _clients(rec, what)
    strangers = sorted(set(clients) - set(everyone))
    if strangers:
        raise ProtocolError(f"{what}: clients {_show(strangers)} are not among the round's {_show(everyone)}")
    n = len(everyone)
    if stage == "advertise":
        parts = {c: b"" for c in clients}
    else:
        most = keys_size(n - 1) if stage == "share" else unmask_request_size(n - 1, 0)
        parts = dict(zip(clients, _blobs(rec[PAYLOADS], len(clients), most, what), strict=True))
    return SecAggQuery(stage, round_, list(everyone), length, rec[PARAMS_DIGEST], rec[CONFIG_DIGEST], parts)


def secagg_reply_content(stage: str, round_: int, parts: dict[int, bytes]) -> RecordDict:
    """A node's answer to a stage message: each of its clients' SecAgg+ message."""
    if not parts:
        raise ValueError("a secagg reply needs at least one client's message")
    clients = sorted(parts)
    return RecordDict({SECAGG: ConfigRecord({STAGE: stage, ROUND: int(round_), CLIENTS: [int(c) for c in clients],
                                             PAYLOADS: [bytes(parts[c]) for c in clients]})})


def secagg_reply_max_bytes(stage: str, params: SecAggParams) -> int:
    """The size of a client's answer at ``stage`` in this round (the protocol's messages have fixed sizes)."""
    return {"advertise": advertise_size(), "share": shares_size(params.degree),
            "unmask": unmask_size(params.degree + 1)}[stage]


def read_secagg_reply(content: RecordDict, stage: str, round_: int, params: SecAggParams) -> dict[int, bytes]:
    """A node's answer to a stage message (on the server): the stage and round it was asked, distinct client ids
    among the round's, one message each of at most the stage's size. Whose clients they are is the strategy's to
    check, and each message's content :func:`read_secagg_part`'s."""
    what = f"secagg {stage} reply"
    rec = _secagg_record(content, what, _REPLY_KEYS_SECAGG, _REPLY_KEYS_SECAGG)
    if rec[STAGE] != stage:
        raise ProtocolError(f"{what}: its '{STAGE}' field says {_show(rec[STAGE])}")
    if rec[ROUND] != round_ or not _is_int(rec[ROUND]):
        raise ProtocolError(f"{what}: for round {_show(rec[ROUND])}, not this round ({round_})")
    clients = _clients(rec, what)
    strangers = sorted(set(clients) - params.id_set)
    if strangers:
        raise ProtocolError(f"{what}: clients {_show(strangers)} are not sampled in round {round_}")
    blobs = _blobs(rec[PAYLOADS], len(clients), secagg_reply_max_bytes(stage, params), what)
    return dict(zip(clients, blobs, strict=True))


def read_secagg_part(params: SecAggParams, stage: str, client: int, part: bytes, sent: bytes) -> bytes:
    """One client's SecAgg+ message at ``stage``, checked on its own before the protocol uses it: well formed for
    this round, sent by ``client``, and answering what it was ``sent`` (the shares go to exactly the neighbours
    whose keys it got; the unmasking holds exactly the shares asked). ProtocolError otherwise, so that a bad one
    drops its client, not the round."""
    what = f"secagg {stage} reply, client {client}:"
    try:
        if stage == "advertise":
            m = parse_advertise(params, part)
            if m.enc_pk == m.mask_pk:
                raise SecAggError("its two public keys are the same")
        elif stage == "share":
            m = parse_shares(params, part)
            peers = tuple(j for j, _, _ in parse_keys(params, sent).peers)
            if tuple(j for j, _ in m.ciphertexts) != peers:
                raise SecAggError("its shares are not addressed to exactly the neighbours whose keys it was sent")
        elif stage == "unmask":
            m = parse_unmask(params, part)
            asked = parse_unmask_request(params, sent)
            expected = sorted([(j, ShareKind.SEED) for j in (*asked.survivors, client)]
                              + [(j, ShareKind.MASK_KEY) for j in asked.dropped])
            if [(o, w) for o, w, _ in m.shares] != expected:
                raise SecAggError("its shares are not the ones asked for")
        else:
            raise SecAggError(f"no stage {stage!r}")
    except SecAggError as exc:
        raise ProtocolError(f"{what} {exc}") from None
    if m.sender != client:
        raise ProtocolError(f"{what} it names client {m.sender} as its sender")
    return part


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

