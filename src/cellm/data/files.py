"""The user's own data: JSON Lines, CSV or Parquet files read with Hugging Face ``datasets``, split over clients
with Flower's partitioners (``flwr-datasets``), tokenized into the same :class:`FederatedData` as the packaged sets.

Which columns are named decides the format:

- ``label_column`` (with ``text_column``): classification; labels are mapped to ids in sorted order;
- ``prompt_column`` + ``response_column``: instruction tuning, a user and an assistant turn of the tokenizer's chat
  template (BOS + prompt + newline without one); the loss counts response tokens only;
- ``messages_column``: chat rows rendered with the tokenizer's chat template; the loss counts assistant turns;
- ``text_column`` alone: language modelling; each client's rows form one token stream cut into sequences.

What is hand-written here is only what the libraries do not do: the response-only label mask, the hold-out
(whole clients, or a stratified fraction of each) and the checks that turn bad input into one-line errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellm.data.bbc import tokenize_texts
from cellm.data.errors import DataConfigError, first_line
from cellm.data.lm import chunk_tokens, pad_token_id, tokenize_streams
from cellm.data.partition import stratified_split
from cellm.data.types import FederatedData, Split

PARTITIONS = ("auto", "natural", "iid", "dirichlet", "shard")
"""data.partition: auto (natural with a client column, else iid) or a flwr-datasets partitioner."""
HOLDOUTS = ("fraction", "clients")
"""data.holdout without a test file: a stratified fraction of each client's rows, or that share of whole clients."""
SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_CLASSES = 1000
ROW = "__cellm_row__"
FILES_FORMAT = 2
"""Part of the files' cache key: bump when rendering, tokenizing or splitting files changes (the packaged
datasets' keys, and so their caches, stay as they are)."""


@dataclass(frozen=True)
class FileSpec:
    """Everything about a files dataset that changes the result (the ``data.*`` fields it uses)."""

    path: str
    test_path: str = ""
    text_column: str = ""
    label_column: str = ""
    prompt_column: str = ""
    response_column: str = ""
    messages_column: str = ""
    client_column: str = ""
    partition: str = "auto"
    holdout: str = "fraction"
    shards_per_client: int = 2

    @property
    def format(self) -> str:
        return file_format(self.text_column, self.label_column, self.prompt_column, self.response_column,
                           self.messages_column)

    @property
    def task(self) -> str:
        return "classification" if self.format == "classification" else "causal_lm"

    @property
    def partition_kind(self) -> str:
        if self.partition != "auto":
            return self.partition
        return "natural" if self.client_column else "iid"


def file_format(text: str, label: str, prompt: str, response: str, messages: str) -> str:
    """The data format named by the columns set, or a ConfigError saying which columns go together."""
    if messages:
        if text or label or prompt or response:
            raise DataConfigError("config field 'data.messages_column' is set: leave data.text_column, "
                                  "data.label_column, data.prompt_column and data.response_column empty")
        return "chat"
    if prompt or response:
        if not (prompt and response):
            missing = "data.response_column" if prompt else "data.prompt_column"
            raise DataConfigError(f"config field '{missing}' is empty: instruction data needs both "
                                  "data.prompt_column and data.response_column")
        if text or label:
            raise DataConfigError("config fields 'data.text_column' / 'data.label_column' must be empty for "
                                  "instruction data (data.prompt_column + data.response_column)")
        return "instruction"
    if not text:
        raise DataConfigError("config field 'data.text_column' is empty: name the text column (with "
                              "data.label_column for classification), or set data.prompt_column + "
                              "data.response_column, or data.messages_column")
    return "classification" if label else "lm"


# ---------------------------------------------------------------- reading

def read_table(path: str, field: str) -> Any:
    """A file as an in-memory ``datasets.Dataset``; one-line errors for a missing, unknown or unreadable file."""
    import datasets

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataConfigError(f"config field '{field}': file not found: {p}")
    builder = SUFFIXES.get(p.suffix.lower())
    if builder is None:
        raise DataConfigError(f"config field '{field}': {p} is not .jsonl, .json, .csv or .parquet")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="cellm-datasets-") as tmp:  # nothing left in ~/.cache
        try:
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=tmp,
                                       keep_in_memory=True)
        except Exception as exc:
            raise DataConfigError(f"config field '{field}': cannot read {p} as {builder} ({first_line(exc)})") from None
    if len(ds) == 0:
        raise DataConfigError(f"config field '{field}': {p} holds no rows")
    return ds


def require_columns(ds: Any, spec: FileSpec, path: str) -> None:
    named = {"data.text_column": spec.text_column, "data.label_column": spec.label_column,
             "data.prompt_column": spec.prompt_column, "data.response_column": spec.response_column,
             "data.messages_column": spec.messages_column, "data.client_column": spec.client_column}
    for field, col in named.items():
        if col and col not in ds.column_names:
            raise DataConfigError(f"config field '{field}' = {col!r}: {path} has no such column "
                                  f"(its columns: {', '.join(ds.column_names)})")


def file_digest(path: str, field: str) -> str:
    """sha256 of a file's bytes: keys the tokenized-data cache by content, not by name or time."""
    if not Path(path).expanduser().is_file():
        raise DataConfigError(f"config field '{field}': file not found: {Path(path).expanduser()}")
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


def _categorical(values: list[Any], field: str, path: str) -> list[Any]:
    if any(v is None for v in values):
        raise DataConfigError(f"config field '{field}': {path} has rows without a label")
    out = []
    for v in values:
        if isinstance(v, float):
            if not float(v).is_integer():
                raise DataConfigError(f"config field '{field}': labels must be categorical (strings or integers); "
                                      f"{path} has {v!r}")
            v = int(v)
        elif not isinstance(v, (str, int, bool)):
            raise DataConfigError(f"config field '{field}': labels must be strings or integers; {path} has "
                                  f"{type(v).__name__} {v!r}")
        out.append(v)
    return out


def label_names(spec: FileSpec) -> list[str]:
    """The sorted distinct labels of the train file (and the test file, if any): the classifier's head size."""
    names: set[Any] = set()
    for field, path in (("data.path", spec.path), ("data.test_path", spec.test_path)):
        if not path:
            continue
        ds = read_table(path, field)
        require_columns(ds, spec, path)
        names |= set(_categorical(ds[spec.label_column], "data.label_column", path))
        if field == "data.path":
            n = len(ds)
    ordered = sorted(names, key=lambda v: (isinstance(v, str), v))
    if len(ordered) < 2:
        raise DataConfigError(f"config field 'data.label_column' = {spec.label_column!r}: {spec.path} has only "
                              f"{len(ordered)} distinct label; a classifier needs at least 2")
    if len(ordered) > MAX_CLASSES or (n >= 20 and len(ordered) > n // 2):
        raise DataConfigError(f"config field 'data.label_column' = {spec.label_column!r}: {len(ordered)} distinct "
                              f"labels in {n} rows is not categorical data; name a column of class labels")
    return [str(v) for v in ordered]


# ---------------------------------------------------------------- tokenizing

def _pad(rows: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Split:
    """(input ids, labels) rows, right-padded to ``seq_len`` with attention 0 and label -100."""
    n = len(rows)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
        labels[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    return Split(ids, mask, labels)


def _segments_row(tokenizer: Any, segments: list[tuple[str, bool]], seq_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids of text segments (text, counts in the loss), truncated to ``seq_len``; None if no counted
    token survives the truncation (the prompt alone fills the sequence)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, counted in segments:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        ids += piece
        labels += piece if counted else [-100] * len(piece)
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(t == -100 for t in labels):
        return None
    return ids, labels


def _instruction_segments(tokenizer: Any, prompt: str, response: str) -> list[tuple[str, bool]]:
    """A prompt/response pair as a user turn and an assistant turn of the tokenizer's chat template, as an
    instruction-tuned model expects; without a template, BOS + prompt + newline, then response + EOS."""
    if getattr(tokenizer, "chat_template", None):
        return _chat_segments(tokenizer, [{"role": "user", "content": str(prompt)},
                                          {"role": "assistant", "content": str(response)}])
    bos = tokenizer.bos_token if getattr(tokenizer, "bos_token", None) else ""
    eos = tokenizer.eos_token if getattr(tokenizer, "eos_token", None) else ""
    return [(bos + str(prompt) + "\n", False), (str(response) + eos, True)]


def _chat_segments(tokenizer: Any, messages: Any) -> list[tuple[str, bool]]:
    """The chat rendered with the tokenizer's template, cut so that each assistant turn counts in the loss.

    Each assistant turn's text is what the template adds between the conversation up to it (with the generation
    prompt) and the conversation including it; templates that re-render earlier turns are refused.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise DataConfigError("config field 'data.messages_column': each row must be a list of "
                              "{\"role\", \"content\"} messages")
    render = tokenizer.apply_chat_template
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True)
        after = render(messages[:i + 1], tokenize=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataConfigError("config field 'data.messages_column': the tokenizer's chat template re-renders "
                                  "earlier turns, so assistant tokens cannot be told apart; use "
                                  "data.prompt_column + data.response_column instead")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = render(messages, tokenize=False)
    if full.startswith(done) and len(full) > len(done):
        segments.append((full[len(done):], False))
    return segments


def tokenize_rows(ds: Any, spec: FileSpec, tokenizer: Any, seq_len: int, labels: list[str] | None,
                  rows: np.ndarray) -> Split | None:
    """The rows ``rows`` of ``ds`` as one Split in the spec's format (None when no row gives an example)."""
    pad_id = pad_token_id(tokenizer)
    if len(rows) == 0:
        return None
    part = ds.select(rows.tolist())
    fmt = spec.format
    if fmt == "classification":
        ids = {name: i for i, name in enumerate(labels or [])}
        y = np.asarray([ids[str(v)] for v in _categorical(part[spec.label_column], "data.label_column", spec.path)])
        return tokenize_texts(tokenizer, [str(t) for t in part[spec.text_column]], seq_len, y)
    if fmt == "lm":
        sep = tokenizer.eos_token or "\n"
        (stream,) = tokenize_streams(tokenizer, [sep.join(str(t) for t in part[spec.text_column])])
        return chunk_tokens(stream, seq_len, pad_id) if len(stream) >= 2 else None
    if fmt == "instruction":
        made = [_segments_row(tokenizer, _instruction_segments(tokenizer, p, r), seq_len)
                for p, r in zip(part[spec.prompt_column], part[spec.response_column], strict=True)]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise DataConfigError("config field 'data.messages_column' needs a tokenizer with a chat template; "
                                  "this model's has none: use data.prompt_column + data.response_column")
        made = [_segments_row(tokenizer, _chat_segments(tokenizer, m), seq_len) for m in part[spec.messages_column]]
    kept = [r for r in made if r is not None]
    return _pad(kept, seq_len, pad_id) if kept else None


# ---------------------------------------------------------------- splitting

def _partitions(ds: Any, spec: FileSpec, n: int, *, alpha: float, min_size: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Row indices of each partition and its name, from flwr-datasets' partitioner for ``spec.partition_kind``."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        ShardPartitioner,
    )

    kind = spec.partition_kind
    ds = ds.add_column(ROW, list(range(len(ds))))
    if kind == "natural":
        values = ds[spec.client_column]
        if any(v is None for v in values):
            raise DataConfigError(f"config field 'data.client_column' = {spec.client_column!r}: {spec.path} has "
                                  "rows without a client")
        if len(set(values)) < 2:
            raise DataConfigError(f"config field 'data.client_column' = {spec.client_column!r}: {spec.path} has a "
                                  "single client; federated training needs at least 2 (or use data.partition = iid)")
        part = NaturalIdPartitioner(partition_by=spec.client_column)
    else:
        ds = ds.shuffle(seed=seed)  # IidPartitioner cuts contiguous blocks: shuffle so file order does not matter
        if kind == "iid":
            part = IidPartitioner(num_partitions=n)
        elif kind == "dirichlet":
            part = DirichletPartitioner(num_partitions=n, partition_by=spec.label_column, alpha=alpha,
                                        min_partition_size=min_size, self_balancing=False, seed=seed)
        else:
            part = ShardPartitioner(num_partitions=n, partition_by=spec.label_column,
                                    num_shards_per_partition=spec.shards_per_client, seed=seed)
    part.dataset = ds
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():  # their progress bars and
            warnings.simplefilter("ignore", FutureWarning)  # pyarrow's deprecation notes are not the user's concern
            rows = [np.asarray(part.load_partition(i)[ROW], dtype=np.int64) for i in range(part.num_partitions)]
    except ValueError as exc:
        raise DataConfigError(f"config field 'data.partition' = {kind!r}: flwr-datasets cannot split {len(ds)} rows "
                              f"into {n} clients ({first_line(exc)}); lower data.num_clients or data.min_client_size"
                              ) from None
    if kind == "natural":
        names = [str(part.partition_id_to_natural_id[i]) for i in range(part.num_partitions)]
    else:
        names = [f"client-{i:03d}" for i in range(len(rows))]
    return rows, names


def load_files(
    spec: FileSpec, tokenizer: Any, *, labels: list[str] | None, num_clients: int, seq_len: int,
    min_client_size: int, dirichlet_alpha: float, test_fraction: float, seed: int,
) -> FederatedData:
    """Federated data from the user's files (see the module docstring for formats and splits).

    Held-out data: ``spec.test_path`` when given; else ``holdout = "clients"`` keeps a ``test_fraction`` share of
    whole clients out of training, and ``holdout = "fraction"`` a stratified ``test_fraction`` of each client's
    rows (stratified by label for classification). Clients with fewer than ``min_client_size`` examples after
    tokenizing are dropped with one log line; then ``num_clients`` are kept (seeded choice) or it is an error.
    ``num_clients = 0`` keeps every usable client of a natural partition (the same clients, rows and order as
    ``num_clients`` = that count); the other partitions need a number (:func:`cellm.data.clients_to_load`).
    """
    kind = spec.partition_kind
    if num_clients < 0 or (num_clients == 0 and kind != "natural"):
        raise ValueError(f"num_clients = {num_clients}: a {kind} partition needs a number of clients >= 1 "
                         "(0, every usable client, applies to natural partitions)")
    ds = read_table(spec.path, "data.path")
    require_columns(ds, spec, spec.path)
    rng = np.random.default_rng([seed, 7])
    by_clients = spec.holdout == "clients" and not spec.test_path
    total = num_clients
    if by_clients and kind != "natural":
        total = num_clients + max(1, int(round(num_clients * test_fraction / (1 - test_fraction))))
    # Dirichlet draws until every client has min_size rows; ask for enough that a held-out fraction leaves them.
    rows_needed = min_client_size if by_clients or spec.test_path else math.ceil(min_client_size / (1 - test_fraction))
    parts, names = _partitions(ds, spec, total, alpha=dirichlet_alpha, min_size=rows_needed, seed=seed)

    test_rows: list[np.ndarray] = []
    if by_clients:
        order = rng.permutation(len(parts))
        n_test = max(1, int(round(test_fraction * len(parts))))
        test_rows = [parts[i] for i in order[:n_test]]
        keep = sorted(order[n_test:].tolist())
        parts, names = [parts[i] for i in keep], [names[i] for i in keep]
    elif not spec.test_path:
        y_all = np.asarray(ds[spec.label_column]) if spec.format == "classification" else None
        train_parts = []
        for rows in parts:
            y = np.asarray([str(v) for v in y_all[rows]]) if y_all is not None else np.zeros(len(rows))
            if len(rows) < 2:
                train_parts.append(rows)
                continue
            tr, te = stratified_split(y, test_fraction, rng)
            train_parts.append(rows[tr])
            test_rows.append(rows[te])
        parts = train_parts

    clients, client_names = [], []
    for rows, name in zip(parts, names, strict=True):
        split = tokenize_rows(ds, spec, tokenizer, seq_len, labels, rows)
        if split is not None and len(split) >= min_client_size:
            clients.append(split)
            client_names.append(name)
    dropped = len(parts) - len(clients)
    if dropped:  # one line on stdout, as `cellm run` reports its other facts
        print(f"cellm: data: dropped {dropped} of {len(parts)} clients with fewer than "
              f"data.min_client_size={min_client_size} examples")
    if not clients and spec.format in ("instruction", "chat"):
        raise DataConfigError(f"config field 'data.seq_len' = {seq_len}: no example of {spec.path} keeps a response "
                              "token (every prompt fills the sequence); raise data.seq_len")
    if len(clients) < max(num_clients, 1):
        asked = f"{num_clients}" if num_clients else "0 (every usable client)"
        raise DataConfigError(f"config field 'data.num_clients' = {asked} but {spec.path} gives only "
                              f"{len(clients)} usable clients ({kind} partition, {len(test_rows) if by_clients else 0} "
                              f"held out, {dropped} below data.min_client_size={min_client_size}); lower "
                              f"{'data.num_clients or ' if num_clients else ''}data.min_client_size")
    if 0 < num_clients < len(clients):  # natural partitions: a seeded choice of the file's clients
        pick = sorted(rng.choice(len(clients), size=num_clients, replace=False).tolist())
        clients, client_names = [clients[i] for i in pick], [client_names[i] for i in pick]

    if spec.test_path:
        tds = read_table(spec.test_path, "data.test_path")
        require_columns(tds, FileSpec(**{**asdict(spec), "client_column": ""}), spec.test_path)
        test = tokenize_rows(tds, spec, tokenizer, seq_len, labels, np.arange(len(tds)))
        where = spec.test_path
    else:
        rows = np.concatenate(test_rows) if test_rows else np.zeros(0, dtype=np.int64)
        test = tokenize_rows(ds, spec, tokenizer, seq_len, labels, np.sort(rows))
        where = f"the held-out part of {spec.path}"
    if test is None or len(test) == 0:
        raise DataConfigError(f"config field 'data.test_fraction': {where} gives no test example; raise "
                              "data.test_fraction or give data.test_path")
    return FederatedData(
        task=spec.task,  # type: ignore[arg-type]
        num_labels=len(labels) if labels else None,
        label_names=labels,
        clients=clients,
        client_names=client_names,
        test=test,
        test_names=[],
    )
