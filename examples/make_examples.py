"""Write the small example files of examples/ from cellm's packaged corpora (deterministic). Run from the repo root:

    .venv/bin/python examples/make_examples.py

- bbc-topics.csv             classification: text, label (5 BBC News topics), 600 articles cut to 400 characters
- shakespeare-lines.jsonl    language modelling: text, speaker (the client column), 24 roles x up to 60 speeches
- chitchat-pairs.parquet     instruction tuning: prompt, response, sender (who answered: the client column), 150 conversations
- chitchat-chat.jsonl        chat: messages [{role, content}, ...] (4 turns of 400 conversations), sender
- chitchat-chat-test.jsonl   the same from the next 80 conversations: a separate held-out file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from cellm.data.assets import package_dir, require
from cellm.data.bbc import read_articles
from cellm.data.chitchat import PIP_SPEC as CHITCHAT
from cellm.data.shakespeare import read_speakers

HERE = Path(__file__).parent


def bbc_topics(n: int = 600) -> pd.DataFrame:
    texts, labels, names = read_articles()
    pick = sorted(random.Random(0).sample(range(len(texts)), n))
    return pd.DataFrame({"text": [texts[i][:400] for i in pick], "label": [names[labels[i]] for i in pick]})


def shakespeare_lines(roles: int = 24, per_role: int = 60) -> list[dict]:
    speakers = read_speakers()
    big = sorted(s for s, text in speakers.items() if text.count("\n") >= per_role)
    chosen = sorted(random.Random(0).sample(big, roles))
    return [{"text": line, "speaker": s} for s in chosen for line in speakers[s].split("\n")[:per_role]]


def chitchat_turns(conversations: int = 480) -> list[list[tuple[str, str]]]:
    """(sender, text) turns of the first conversations, each turn's messages joined."""
    path = require(package_dir("chitchat", "chitchat_dataset", CHITCHAT) / "dataset.json", "chitchat", CHITCHAT)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    out = []
    for conv in list(data.values())[:conversations]:
        turns = [(t[0]["sender"], " ".join(" ".join(str(m["text"]).split()) for m in t)) for t in conv["messages"] if t]
        out.append(turns)
    return out


def chitchat_pairs(convs: list[list[tuple[str, str]]]) -> pd.DataFrame:
    rows = [{"prompt": a, "response": b, "sender": who}
            for turns in convs for (_, a), (who, b) in zip(turns, turns[1:], strict=False) if a and b]
    return pd.DataFrame(rows)


def chitchat_chats(convs: list[list[tuple[str, str]]]) -> list[dict]:
    """Each conversation's first four turns as a chat, the answering sender as the assistant (and the client)."""
    rows = []
    for turns in convs:
        if len(turns) < 4:
            continue
        assistant = turns[1][0]
        messages = [{"role": "assistant" if who == assistant else "user", "content": text} for who, text in turns[:4]]
        if messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
            rows.append({"messages": messages, "sender": assistant})
    return rows


def main() -> None:
    bbc_topics().to_csv(HERE / "bbc-topics.csv", index=False)
    with open(HERE / "shakespeare-lines.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in shakespeare_lines())
    convs = chitchat_turns()
    chitchat_pairs(convs[:150]).to_parquet(HERE / "chitchat-pairs.parquet", index=False)
    for name, part in (("chitchat-chat.jsonl", convs[:400]), ("chitchat-chat-test.jsonl", convs[400:])):
        with open(HERE / name, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in chitchat_chats(part))
    for f in sorted(HERE.glob("*.*")):
        if f.suffix in (".csv", ".jsonl", ".parquet"):
            print(f"{f.name}: {f.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
