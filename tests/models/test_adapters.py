"""A second peft adapter type (VeRA) behind the same flat vector: what it trains, what the seed fixes, a run."""

from __future__ import annotations

import pytest
import torch

from cellm import run
from cellm.config import load_config
from cellm.errors import ConfigError
from cellm.methods import method_overrides
from cellm.models.flat import FlatView
from cellm.models.registry import load_model

RANK = 16


def _vera(seed: int = 0):
    return load_model("tiny-bert", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, num_labels=5, seed=seed,
                      adapter="vera", vera_rank=RANK)


def test_a_vera_adapter_trains_only_its_scaling_vectors_and_the_head():
    loaded = _vera()
    flat = FlatView(loaded.model)
    assert flat.names and all("vera_lambda" in n or "classifier" in n for n in flat.names)
    wrapped = [m for m in loaded.model.modules() if hasattr(m, "vera_lambda_b")]
    assert wrapped
    head = sum(p.numel() for n, p in zip(flat.names, flat.params, strict=True) if "classifier" in n)
    want = sum(RANK + m.base_layer.out_features for m in wrapped) + head
    assert flat.numel == want
    lora = load_model("tiny-bert", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, num_labels=5, seed=0)
    assert flat.numel < FlatView(lora.model).numel


def test_vera_projections_and_starting_vector_come_from_the_seed_alone():
    a, b, c = _vera(0), _vera(0), _vera(1)

    def projection(loaded) -> torch.Tensor:
        return next(t for n, t in loaded.model.named_buffers() if "vera_A" in n)

    assert torch.equal(FlatView(a.model).get(), FlatView(b.model).get())
    assert torch.equal(projection(a), projection(b))  # a client rebuilds the server's frozen parts exactly
    assert not torch.equal(projection(a), projection(c))


@pytest.mark.parametrize("field, value", [("model.freeze_a", "true"), ("hetero.mode", "rank"),
                                          ("slora.stage1_rounds", "1")])
def test_lora_only_features_are_refused_for_vera_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(preset="tiny", overrides=["model.adapter=vera", f"{field}={value}"])


def test_an_unknown_adapter_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"model\.adapter"):
        load_config(preset="tiny", overrides=["model.adapter=ia3"])


def test_the_vera_peer_runs_sends_its_small_vector_and_saves_an_adapter_that_reloads(tmp_path, tiny_overrides):
    from cellm.interface.use import load_trained

    base = load_config(preset="tiny", overrides=tiny_overrides)
    cfg = load_config(preset="tiny", overrides=[*tiny_overrides, *method_overrides("vera-int4-ef", base),
                                                f"model.vera_rank={RANK}"])
    result = run(cfg, tmp_path / "vera")
    n = FlatView(_vera().model).numel
    uploads = cfg.rounds * cfg.fl.clients_per_round
    # dense int4: about half a byte a value, plus the header and the block scales
    assert result.totals["up_bytes"] <= uploads * (n // 2 + 64 + 4 * (n // cfg.comm.int8_block + 1))
    assert result.totals["up_bytes"] >= uploads * (n // 4)  # and nothing falls back to a tiny sparse upload
    loaded, _, _ = load_trained(tmp_path / "vera")
    state = loaded.model.state_dict()
    start = _vera().model.state_dict()
    trained = {k: v for k, v in result.adapter.items() if "vera_lambda" in k or "classifier" in k}
    assert len(trained) == len(FlatView(_vera().model).names)
    moved = 0
    for k, v in trained.items():
        name = k + ".default" if "vera_lambda" in k else k.replace("classifier.", "classifier.modules_to_save.default.")
        assert torch.equal(state[name], v)  # the saved adapter reloads exactly
        moved += not torch.equal(start[name], v)
    assert moved > 0  # and it is not the starting point
