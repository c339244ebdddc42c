"""comm.topk_block: block top-k runs end to end, every message names blocks, and the server refuses the rest."""

import dataclasses
import json

import pytest
import torch

import cellm
from cellm.core.codec import CodecError, CodecSpec, decode, encode
from cellm.core.codec import header as hdr
from cellm.core.sparse import SparseVector
from cellm.core.topk import max_kept_entries, sparsify
from cellm.errors import ConfigError
from cellm.federated.server import check_upload, codec_spec
from cellm.interface.cli import main

BLOCK = ["comm.topk_block=16", "comm.down_density=0.25", "comm.up_density=0.25"]


def tiny(cache_dir, *extra):
    return cellm.load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "rounds=3", *extra])


def watch_payloads(monkeypatch):
    """Every round's (downloads, uploads) as the server sends and receives them."""
    import cellm.runtime.driver as D

    seen, real = [], D.simulate_attacks

    def spy(cfg, plan, replies):
        seen.append(([t.download for t in plan.tasks.values()], [r.payload for r in replies.values()]))
        return real(cfg, plan, replies)

    monkeypatch.setattr(D, "simulate_attacks", spy)
    return seen


@pytest.mark.parametrize("extra", [[], ['comm.codec_down="int4"', 'comm.codec_up="int4"', "comm.error_feedback_up=true"],
                                   ['comm.download_mode="delta"', "comm.init_relative=true"],
                                   ["comm.freeze_mask_after=1", "comm.client_freeze=true"]],
                         ids=["fp32", "int4+ef", "delta+init-relative", "pruned+client-freeze"])
def test_block_top_k_runs_with_every_sparse_message_naming_whole_blocks(cache_dir, monkeypatch, extra):
    seen = watch_payloads(monkeypatch)
    cfg = tiny(cache_dir, *BLOCK, *extra)
    result = cellm.run(cfg, save=False)
    rows = result.metrics[1:]
    assert all(r["accepted"] == cfg.fl.clients_per_round and r["rejected"] == 0 for r in rows)
    schemes = set()
    for downloads, uploads in seen:
        for payload in downloads + uploads:
            vec = decode(payload, max_n=1 << 30)
            schemes.add(payload[5])
            if payload[5] != hdr.PositionScheme.DENSE:
                assert payload[5] == hdr.PositionScheme.BLOCKS and vec.k % 16 in (0, vec.n % 16)
    assert hdr.PositionScheme.BLOCKS in schemes


def test_block_positions_make_the_same_density_cheaper_than_per_entry_positions(cache_dir):
    int4 = ['comm.codec_down="int4"', 'comm.codec_up="int4"']
    blocks = cellm.run(tiny(cache_dir, *BLOCK, *int4), save=False).totals
    entries = cellm.run(tiny(cache_dir, *BLOCK, *int4, "comm.topk_block=1"), save=False).totals
    assert blocks["up_bytes"] < 0.8 * entries["up_bytes"] and blocks["down_bytes"] < 0.8 * entries["down_bytes"]


def test_cellm_run_with_topk_block_and_int4_writes_a_complete_run(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--set", f"data.cache_dir='{cache_dir}'", "--set", "rounds=2",
            "--set", "comm.topk_block=16", "--set", 'comm.codec_up="int4"', "--set", "comm.up_density=0.0625",
            "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 2 and all(r.get("rejected", 0) == 0 for r in rows)


def test_an_upload_that_is_not_whole_blocks_is_rejected_and_counted(cache_dir, monkeypatch):
    import cellm.runtime.driver as D

    real = D.simulate_attacks

    def per_entry(cfg, plan, replies):  # one client sends its upload minus one entry, coded per entry
        c = plan.clients[0]
        honest = decode(replies[c].payload, max_n=1 << 30)
        cut = SparseVector(honest.n, honest.indices[1:], honest.values[1:])
        replies[c] = dataclasses.replace(replies[c], payload=encode(cut, CodecSpec()))
        return real(cfg, plan, replies)

    monkeypatch.setattr(D, "simulate_attacks", per_entry)
    result = cellm.run(tiny(cache_dir, *BLOCK), save=False)
    assert [r["rejected"] for r in result.metrics[1:]] == [1, 1, 1]


def test_check_upload_bounds_k_by_whole_blocks_and_refuses_partial_blocks():
    n, b = 1000, 16
    x = torch.randn(n)
    good = sparsify(x, 0.25, b)
    limit = max_kept_entries(n, 0.25, b)  # 15 of the 63 blocks
    spec = CodecSpec(pos_block=b)
    assert torch.equal(check_upload(encode(good, spec), n, limit, block=b).indices, good.indices)
    partial = SparseVector(n, good.indices[:-1], good.values[:-1])
    with pytest.raises(CodecError, match="whole blocks of comm.topk_block = 16"):
        check_upload(encode(partial, CodecSpec()), n, limit, block=b)
    shifted = SparseVector(n, torch.arange(8, 24), torch.ones(16))  # 16 entries, straddling two blocks
    with pytest.raises(CodecError, match="whole blocks"):
        check_upload(encode(shifted, CodecSpec(pos_block=8)), n, limit, block=b)
    too_many = sparsify(x, 0.5, b)
    with pytest.raises(CodecError, match="more than"):
        check_upload(encode(too_many, spec), n, limit, block=b)


def test_codec_spec_carries_topk_block_in_both_directions(cache_dir):
    cfg = tiny(cache_dir, *BLOCK)
    assert codec_spec(cfg, "down").pos_block == codec_spec(cfg, "up").pos_block == 16


@pytest.mark.parametrize("extra, fields", [
    (['comm.up_support="random"'], ("comm.topk_block", "comm.up_support")),
    (['hetero.mode="rank"', "hetero.num_tiers=2"], ("comm.topk_block", "hetero.mode")),
    (['comm.up_support="random"', "secagg.enabled=true", "fl.clients_per_round=3", "robust.clip_factor=0",
      "robust.history_rounds=0"], ("comm.topk_block", "secagg.enabled")),
    (["comm.topk_block=0"], ("comm.topk_block",)),
    (["comm.topk_block=4097"], ("comm.topk_block",)),
])
def test_config_refuses_what_block_top_k_does_not_support_naming_the_fields(cache_dir, extra, fields):
    with pytest.raises(ConfigError) as e:
        tiny(cache_dir, "comm.topk_block=16", *extra)
    assert all(f in str(e.value) for f in fields), str(e.value)


def test_pos_block_travels_in_flower_train_messages_and_is_validated_there():
    pytest.importorskip("flwr", reason="Flower is not installed")
    from cellm.federated.messages import ClientTask
    from cellm.runtime.flower import protocol as P

    task = ClientTask(round=2, client=3, download=b"x", up_density=0.25, codec_up=CodecSpec(values="int4", pos_block=16))
    content = P.task_content([task], "d" * 64)
    assert content.config_records[P.TASKS]["codec_up.pos_block"] == 16
    assert P.read_tasks(content)[0] == [task]
    content.config_records[P.TASKS]["codec_up.pos_block"] = 5000
    with pytest.raises(P.ProtocolError, match="pos_block"):
        P.read_tasks(content)
