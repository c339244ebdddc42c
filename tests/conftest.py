import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def one_thread_env(env: dict[str, str]):
    """Set ``env`` and one torch thread for the duration; restore both afterwards."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenized-data cache shared by the whole test session."""
    return str(tmp_path_factory.mktemp("cellm-cache"))


@pytest.fixture
def tiny_overrides(cache_dir):
    return [f"data.cache_dir='{cache_dir}'"]


# ---------------------------------------------------------------- the user's own model and data (tests/*own*)

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="session")
def own_models(tmp_path_factory):
    """Tiny random-weight models saved with save_pretrained, as a user's own folders: {"llama": dir, "bert": dir}."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from cellm.models.registry import minilm_dir

    root = tmp_path_factory.mktemp("own-models")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.chat_template = CHAT_TEMPLATE
    with torch.random.fork_rng():
        torch.manual_seed(0)
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                             max_position_embeddings=128, pad_token_id=tok.pad_token_id))
        bert = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=32, num_labels=2))
    dirs = {}
    for name, model in (("llama", llama), ("bert", bert)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


def own_rows(n: int = 180, users: int = 9, seed: int = 0) -> list[dict]:
    """Rows with every column the files formats use: text/label, prompt/response, messages, user."""
    import random

    rnd = random.Random(seed)
    words = "the cat dog sat ran on mat big small red blue house tree sun moon".split()
    rows = []
    for i in range(n):
        label = rnd.choice(["sport", "tech", "food"])
        rows.append({
            "text": " ".join(rnd.choice(words) for _ in range(10)) + f" {label} {label}",
            "label": label,
            "user": f"user{i % users}",
            "prompt": f"topic {label} please",
            "response": " ".join(rnd.choice(words) for _ in range(6)),
            "messages": [{"role": "user", "content": f"hi {label}"},
                         {"role": "assistant", "content": " ".join(rnd.choice(words) for _ in range(4))}],
        })
    return rows


def write_rows(path, rows: list[dict]) -> str:
    """``rows`` as .jsonl, .csv (without the nested messages) or .parquet, by ``path``'s suffix."""
    import json

    import pandas as pd

    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.endswith(".csv"):
        pd.DataFrame([{k: v for k, v in r.items() if k != "messages"} for r in rows]).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="session")
def own_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    rows = own_rows()
    return {fmt: write_rows(root / f"data.{fmt}", rows) for fmt in ("jsonl", "csv", "parquet")}
