"""Chit-chat conversations split by sender: one client per person, standing in for the paper's Reddit task.

The ``chitchat-dataset`` package ships ``dataset.json``: conversation id -> {"messages": [turn, ...], ...}
where a turn is a list of consecutive messages ``{"text", "sender", "timestamp"}``. Each sender's messages,
across all their conversations, become that client's text (one message per line).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from cellm.data.assets import package_dir, require
from cellm.data.lm import build_lm_federated
from cellm.data.types import FederatedData

PIP_SPEC = "chitchat-dataset==0.9.0"


def read_senders() -> dict[str, str]:
    """Sender id -> all of that sender's messages in dataset order, newline-separated."""
    path = require(package_dir("chitchat", "chitchat_dataset", PIP_SPEC) / "dataset.json", "chitchat", PIP_SPEC)
    with open(path, encoding="utf-8") as f:
        conversations = json.load(f)
    messages: dict[str, list[str]] = defaultdict(list)
    for conversation in conversations.values():
        for turn in conversation["messages"]:
            for message in turn:
                text = " ".join(str(message.get("text", "")).split())
                if text:
                    messages[str(message["sender"])].append(text)
    return {sender: "\n".join(texts) for sender, texts in messages.items()}


def load_chitchat(
    tokenizer: Any, *, num_clients: int, seq_len: int, min_client_size: int, seed: int = 0
) -> FederatedData:
    """Federated next-token data, one client per sender; held-out senders form the test split."""
    return build_lm_federated(
        read_senders(),
        tokenizer,
        what="senders",
        num_clients=num_clients,
        seq_len=seq_len,
        min_client_size=min_client_size,
        seed=seed,
    )
