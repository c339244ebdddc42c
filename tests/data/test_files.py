"""The user's own files: formats, label masks, partitions, hold-out, drops and the cache (no model needed)."""

import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, own_rows, write_rows

from cellm.data import DEFAULT_CLIENTS, clients_to_load, load_federated
from cellm.data.errors import DataConfigError
from cellm.data.files import FileSpec, _partitions, label_names, load_files, read_table, tokenize_rows


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from cellm.models.registry import minilm_dir

    t = AutoTokenizer.from_pretrained(str(minilm_dir()))
    t.chat_template = CHAT_TEMPLATE
    return t


def _load(spec, tok, **kw):
    args = {"labels": None, "num_clients": 6, "seq_len": 32, "min_client_size": 2, "dirichlet_alpha": 1.0,
            "test_fraction": 0.2, "seed": 0}
    args.update(kw)
    return load_files(spec, tok, **args)


@pytest.fixture(scope="module")
def plain(tok):
    """The same tokenizer without a chat template."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_instruction_rows_count_only_response_tokens_in_the_loss(own_files, plain):
    tok = plain
    spec = FileSpec(own_files["jsonl"], prompt_column="prompt", response_column="response")
    ds = read_table(spec.path, "data.path")
    split = tokenize_rows(ds, spec, tok, 32, None, np.arange(3))
    for i in range(3):
        prompt = tok(ds[i]["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        response = tok(ds[i]["response"], add_special_tokens=False)["input_ids"]
        n = len(prompt) + len(response)
        assert split.input_ids[i, :n].tolist() == prompt + response
        assert (split.labels[i, :len(prompt)] == -100).all()
        assert split.labels[i, len(prompt):n].tolist() == response
        assert (split.labels[i, n:] == -100).all() and split.attention_mask[i].sum() == n


def test_instruction_rows_go_through_the_chat_template_when_the_tokenizer_has_one(own_files, tok):
    spec = FileSpec(own_files["jsonl"], prompt_column="prompt", response_column="response")
    ds = read_table(spec.path, "data.path")
    split = tokenize_rows(ds, spec, tok, 48, None, np.arange(2))
    for i in range(2):
        counted = tok.decode(split.labels[i][split.labels[i] != -100].tolist())
        assert counted.startswith(ds[i]["response"]) and ds[i]["prompt"].split()[1] not in counted
        assert "< user >" in tok.decode(split.input_ids[i][split.attention_mask[i] == 1].tolist())


def test_chat_rows_count_only_the_assistant_turn(own_files, tok):
    spec = FileSpec(own_files["parquet"], messages_column="messages")
    ds = read_table(spec.path, "data.path")
    split = tokenize_rows(ds, spec, tok, 48, None, np.arange(2))
    for i in range(2):
        answer = ds[i]["messages"][1]["content"]
        counted = split.labels[i][split.labels[i] != -100].tolist()
        assert tok.decode(counted).startswith(answer)  # the answer, then the template's end-of-turn
        assert ds[i]["messages"][0]["content"].split()[1] not in tok.decode(counted)


def test_a_natural_partition_gives_one_client_per_value_and_holds_out_a_share_of_each(own_files, tok):
    spec = FileSpec(own_files["jsonl"], text_column="text", client_column="user")
    data = _load(spec, tok, num_clients=9)
    assert sorted(data.client_names) == [f"user{i}" for i in range(9)]
    assert len(data.test) > 0 and data.task == "causal_lm"


def test_holding_out_clients_keeps_whole_clients_out_of_training(own_files, tok):
    spec = FileSpec(own_files["jsonl"], text_column="text", client_column="user", holdout="clients")
    data = _load(spec, tok, num_clients=7, test_fraction=0.2)
    assert len(data.client_names) == 7 and len(set(data.client_names)) == 7  # 2 of 9 users held out


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shard"])
def test_synthetic_partitions_split_rows_disjointly_with_flowers_partitioners(own_files, kind):
    spec = FileSpec(own_files["csv"], text_column="text", label_column="label", partition=kind)
    ds = read_table(spec.path, "data.path")
    parts, names = _partitions(ds, spec, 6, alpha=0.5, min_size=2, seed=0)
    rows = np.concatenate(parts)
    assert len(parts) == 6 and len(set(names)) == 6
    assert len(rows) == len(set(rows.tolist())) and set(rows.tolist()) <= set(range(len(ds)))
    if kind == "iid":
        assert len(rows) == len(ds)


def test_classification_labels_map_to_sorted_ids_and_the_head_fits_them(own_files, tok):
    spec = FileSpec(own_files["csv"], text_column="text", label_column="label", partition="iid")
    labels = label_names(spec)
    assert labels == ["food", "sport", "tech"]
    data = _load(spec, tok, labels=labels)
    assert data.num_labels == 3 and set(torch.cat([c.labels for c in data.clients]).tolist()) <= {0, 1, 2}


def test_non_categorical_labels_are_refused_naming_the_field(tmp_path):
    rows = [{"text": f"t{i}", "label": i + 0.5} for i in range(30)]
    spec = FileSpec(write_rows(tmp_path / "x.jsonl", rows), text_column="text", label_column="label")
    with pytest.raises(DataConfigError, match="data.label_column.*categorical"):
        label_names(spec)


def test_clients_below_min_client_size_are_dropped_with_one_line(tmp_path, tok, capsys):
    rows = own_rows(n=90, users=9)
    rows += [{**rows[0], "user": "tiny"}]  # one client with a single row
    spec = FileSpec(write_rows(tmp_path / "d.jsonl", rows), prompt_column="prompt", response_column="response",
                    client_column="user")
    data = _load(spec, tok, num_clients=9, min_client_size=3)
    assert "tiny" not in data.client_names
    assert "dropped 1 of 10 clients with fewer than data.min_client_size=3" in capsys.readouterr().out


def test_prompts_longer_than_seq_len_everywhere_are_an_error_naming_seq_len(own_files, tok):
    spec = FileSpec(own_files["jsonl"], prompt_column="prompt", response_column="response", partition="iid")
    with pytest.raises(DataConfigError, match="data.seq_len"):
        _load(spec, tok, seq_len=3)


def test_tokenized_files_are_cached_by_content_so_an_edit_is_never_served_stale(tmp_path, tok):
    path = write_rows(tmp_path / "d.jsonl", own_rows(n=60))
    spec = FileSpec(path, text_column="text", label_column="label", partition="iid")
    kw = {"num_clients": 4, "seq_len": 16, "min_client_size": 2, "cache_dir": tmp_path / "cache", "files": spec,
          "labels": label_names(spec)}
    first = load_federated("files", tok, "t", **kw)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = load_federated("files", tok, "t", **kw)
    assert torch.equal(first.clients[0].input_ids, again.clients[0].input_ids)
    write_rows(path, own_rows(n=60, seed=1))
    load_federated("files", tok, "t", **kw)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# ---------------------------------------------------------------- data.num_clients = 0: every usable client

def _same(a, b):
    assert a.client_names == b.client_names and a.num_clients == b.num_clients
    for x, y in zip([*a.clients, a.test], [*b.clients, b.test], strict=True):
        for field in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(x, field), getattr(y, field))


@pytest.fixture(scope="module")
def twelve_users(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("users") / "users.jsonl", own_rows(n=144, users=12))


@pytest.mark.parametrize(("holdout", "kept"), [("fraction", 12), ("clients", 10)])
def test_num_clients_0_keeps_every_usable_client_of_a_natural_partition(twelve_users, tok, holdout, kept):
    spec = FileSpec(twelve_users, text_column="text", client_column="user", holdout=holdout)
    data = load_federated("files", tok, "t", num_clients=0, seq_len=32, min_client_size=2, files=spec)
    assert data.num_clients == kept and len(set(data.client_names)) == kept  # 12 users, 2 held out as clients
    assert set(data.client_names) <= {f"user{i}" for i in range(12)}


@pytest.mark.parametrize("holdout", ["fraction", "clients"])
def test_loading_with_the_number_0_resolved_to_gives_the_same_clients_rows_and_order(twelve_users, tok, holdout):
    spec = FileSpec(twelve_users, text_column="text", client_column="user", holdout=holdout)
    auto = _load(spec, tok, num_clients=0)
    _same(_load(spec, tok, num_clients=auto.num_clients), auto)
    fewer = _load(spec, tok, num_clients=auto.num_clients - 1)  # a smaller number is a seeded choice of them
    assert set(fewer.client_names) < set(auto.client_names)


def test_num_clients_0_with_no_usable_client_names_min_client_size(twelve_users, tok):
    spec = FileSpec(twelve_users, text_column="text", client_column="user")
    with pytest.raises(DataConfigError, match=r"data.num_clients' = 0 \(every usable client\) but .* gives only 0 "
                                              r"usable clients.*lower data.min_client_size$"):
        _load(spec, tok, num_clients=0, min_client_size=1000)


def test_num_clients_0_stands_for_the_default_number_where_the_data_names_no_clients():
    natural = FileSpec("f.jsonl", text_column="text", client_column="user")
    assert clients_to_load("files", 0, natural) == 0  # every usable client
    for spec in (FileSpec("f.jsonl", text_column="text"), FileSpec("f.jsonl", text_column="text", partition="iid",
                                                                   client_column="user")):
        assert clients_to_load("files", 0, spec) == DEFAULT_CLIENTS == 50
    assert [clients_to_load(name, 0) for name in ("bbc", "shakespeare", "chitchat")] == [50, 50, 50]
    assert clients_to_load("files", 7, natural) == clients_to_load("bbc", 7) == 7


def test_an_auto_number_that_the_file_cannot_give_says_where_the_number_came_from(own_files, tok):
    spec = FileSpec(own_files["jsonl"], text_column="text", partition="iid")
    with pytest.raises(DataConfigError, match=r"data.num_clients' = 50 .*\(data.num_clients = 0 is auto: 50 here\)"):
        load_federated("files", tok, "t", num_clients=0, seq_len=32, min_client_size=8, files=spec)


def test_load_files_refuses_0_clients_for_a_partition_that_needs_a_number(own_files, tok):
    with pytest.raises(ValueError, match="iid partition needs a number of clients"):
        _load(FileSpec(own_files["jsonl"], text_column="text", partition="iid"), tok, num_clients=0)
