"""Integration tests on the real packaged weights (MiniLM-L6, SmolLM2-135M). A minute or two on 2 cores."""

import pytest
import torch

import cellm
from cellm.runtime import runfolder as rf

pytestmark = pytest.mark.real


def _minilm(cache_dir, *extra):
    return cellm.load_config(preset="demo", overrides=[
        f"data.cache_dir='{cache_dir}'", "data.num_clients=10", "data.seq_len=32", "data.max_test_examples=128",
        "fl.clients_per_round=5", "fl.local_steps=3", *extra])


def test_two_rounds_of_minilm_on_bbc_and_the_saved_adapter_reproduces_the_last_eval(tmp_path, cache_dir):
    cfg = _minilm(cache_dir, "rounds=2", "fl.eval_every=1")
    res = cellm.run(cfg, tmp_path / "run")
    rows = rf.read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2] and all("eval" in r for r in rows)

    # Plain peft, fresh process state: base model + adapter folder -> the run's last metric.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from cellm.data import load_federated
    from cellm.models.evaluate import evaluate
    from cellm.models.registry import _minilm_tokenizer, minilm_dir

    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=5)
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    d = cfg.data
    data = load_federated("bbc", _minilm_tokenizer(), "minilm-l6", num_clients=d.num_clients, seq_len=d.seq_len,
                          min_client_size=d.min_client_size, dirichlet_alpha=d.dirichlet_alpha,
                          test_fraction=d.test_fraction, max_test_examples=d.max_test_examples, seed=cfg.seed,
                          cache_dir=cache_dir)
    ev = evaluate(model, data.test, "classification", 64)
    assert ev["accuracy"] == pytest.approx(res.final_eval["accuracy"], abs=1e-9)
    assert ev["loss"] == pytest.approx(res.final_eval["loss"], rel=1e-4)


def test_minilm_with_30_percent_dropout_still_improves_on_round_zero(cache_dir):
    cfg = _minilm(cache_dir, "rounds=6", "fl.eval_every=6", "faults.failure_prob=0.3")
    res = cellm.run(cfg, save=False)
    assert sum(r["failed"] for r in res.metrics[1:]) > 0
    assert res.final_eval["accuracy"] > res.initial_eval["accuracy"] + 0.1


def test_smollm2_loads_and_one_lora_step_lowers_the_loss_on_a_batch(tmp_path):
    from cellm.models.flat import FlatView
    from cellm.models.registry import load_model

    lm = load_model("smollm2-135m", lora_rank=8, lora_alpha=16, lora_dropout=0.0, cache_dir=str(tmp_path))
    # The GGUF was de-quantized once and kept: the next load reads the same bits from the cache, without the GGUF
    again = load_model("smollm2-135m", lora_rank=8, lora_alpha=16, lora_dropout=0.0, cache_dir=str(tmp_path))
    kept = list((tmp_path / "models").iterdir())
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()
    first, second = lm.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    tok = lm.tokenizer
    text = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"] * 2
    assert again.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    batch = tok(text, return_tensors="pt", padding="max_length", max_length=24, truncation=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    flat = FlatView(lm.model)
    assert flat.numel == 30 * 2 * 8 * (576 + 576) - 30 * 8 * (576 - 192)  # q: 576->576, v: 576->192
    opt = torch.optim.SGD(flat.params, lr=0.5)
    lm.model.train()
    before = lm.model(**batch, labels=labels).loss
    before.backward()
    opt.step()
    with torch.no_grad():
        after = lm.model(**batch, labels=labels).loss
    assert float(after) < float(before.detach())
