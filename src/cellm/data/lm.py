"""Natural federated next-token data: one author (speaker, sender) = one client, as in LEAF Shakespeare.

Shared by the Shakespeare and chit-chat loaders, which differ only in how they gather each author's text.
Each author's text is tokenized as one stream and cut into fixed-length sequences; authors with too few
sequences are not eligible; a fixed, seed-determined share of eligible authors is held out as the test set
(so evaluation measures generalisation to unseen authors), and clients are drawn from the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cellm.data.errors import DataConfigError
from cellm.data.types import FederatedData, Split

HELD_OUT_FRACTION = 0.1
"""Share of eligible authors held out for test (at least one). Fixed, so the test set does not move when the
number of clients changes."""

MIN_LAST_CHUNK = 2
"""A trailing partial sequence shorter than this is dropped: with one real token there is nothing to predict."""


def tokenize_streams(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as one stream, without special tokens (BOS/CLS would appear mid-stream)."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def num_chunks(num_tokens: int, seq_len: int) -> int:
    """How many sequences ``chunk_tokens`` makes from a stream of ``num_tokens`` tokens."""
    full, rest = divmod(num_tokens, seq_len)
    return full + (1 if rest >= MIN_LAST_CHUNK else 0)


def chunk_tokens(ids: list[int] | np.ndarray, seq_len: int, pad_id: int) -> Split:
    """Cut a token stream into rows of exactly ``seq_len`` tokens; the last partial row is right-padded with
    ``pad_id`` (attention 0, label -100). Labels are the input ids: causal LMs shift them internally."""
    arr = np.asarray(ids, dtype=np.int64)
    n = num_chunks(len(arr), seq_len)
    arr = arr[: n * seq_len]
    input_ids = np.full(n * seq_len, pad_id, dtype=np.int64)
    input_ids[: len(arr)] = arr
    mask = np.zeros(n * seq_len, dtype=np.int64)
    mask[: len(arr)] = 1
    input_ids, mask = input_ids.reshape(n, seq_len), mask.reshape(n, seq_len)
    labels = np.where(mask == 1, input_ids, -100)
    return Split(torch.from_numpy(input_ids), torch.from_numpy(mask), torch.from_numpy(labels))


def pad_token_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has no pad_token_id; set tokenizer.pad_token before loading data")
    return int(pad)


def build_lm_federated(
    texts: dict[str, str],
    tokenizer: Any,
    *,
    what: str,
    num_clients: int,
    seq_len: int,
    min_client_size: int,
    seed: int,
    held_out_fraction: float = HELD_OUT_FRACTION,
) -> FederatedData:
    """Federated causal-LM data from ``texts`` (author name -> all of that author's text).

    Eligible authors have >= ``min_client_size`` sequences of ``seq_len`` tokens. They are shuffled by
    ``seed``; the first ``max(1, round(held_out_fraction * eligible))`` form the test split and the next
    ``num_clients`` become clients (client i = i-th of them). ``what`` names the authors in error messages.
    """
    pad_id = pad_token_id(tokenizer)
    names = sorted(texts)
    streams = dict(zip(names, tokenize_streams(tokenizer, [texts[n] for n in names]), strict=True))
    eligible = [n for n in names if num_chunks(len(streams[n]), seq_len) >= min_client_size]
    n_test = max(1, int(round(held_out_fraction * len(eligible))))
    available = len(eligible) - n_test
    if available < num_clients:
        raise DataConfigError(
            f"data.num_clients={num_clients} but only {max(available, 0)} {what} are available: "
            f"{len(eligible)} of {len(names)} have >= data.min_client_size={min_client_size} sequences of "
            f"data.seq_len={seq_len} tokens and {n_test} are held out for test; lower data.num_clients, "
            "data.min_client_size or data.seq_len"
        )
    order = np.random.default_rng(seed).permutation(len(eligible))
    chosen = [eligible[i] for i in order]
    held_out, client_names = chosen[:n_test], chosen[n_test : n_test + num_clients]
    return FederatedData(
        task="causal_lm",
        num_labels=None,
        label_names=None,
        clients=[chunk_tokens(streams[n], seq_len, pad_id) for n in client_names],
        client_names=client_names,
        test=Split.concat([chunk_tokens(streams[n], seq_len, pad_id) for n in held_out]),
        test_names=held_out,
    )
