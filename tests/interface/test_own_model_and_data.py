"""`cellm run` on a model by path and on the user's files, then `cellm generate` / `cellm export`, and every bad
input of that path: exit code 2, one line naming the field or file, no run folder."""

import json
import tomllib

import pytest
import torch
from conftest import own_rows, write_rows

from cellm.interface.cli import main

BASE = ["--preset", "tiny", "--no-progress", "--set", "data.name=files", "--set", "rounds=1",
        "--set", "data.seq_len=24", "--set", "data.min_client_size=2", "--set", "fl.clients_per_round=2",
        "--set", "fl.local_steps=1", "--set", "data.max_test_examples=16",
        # one round of two clients: unbounded, LoRA B's first change is large enough to enter the download's top-k
        # (with the default bound at the smaller upload's norm, AdamW's first step leaves it below the head's)
        "--set", "robust.clip_factor=0"]


def _sets(**fields):
    out = []
    for k, v in fields.items():
        out += ["--set", f"{k.replace('__', '.')}={v}"]
    return out


def _run(tmp_path, cache_dir, model, **fields):
    out = tmp_path / "run"
    code = main(["run", *BASE, *_sets(model__path=model, data__cache_dir=cache_dir, **fields), "--out", str(out)])
    return code, out


CASES = {  # (model, file type, fields): every format and every split kind
    "classification-dirichlet": ("bert", "csv", {"data__text_column": "text", "data__label_column": "label",
                                                 "data__partition": "dirichlet", "data__num_clients": 5}),
    "classification-shard-heldout-clients": ("bert", "jsonl", {
        "data__text_column": "text", "data__label_column": "label", "data__partition": "shard",
        "data__holdout": "clients", "data__num_clients": 5}),
    "lm-natural-heldout-clients": ("llama", "jsonl", {"data__text_column": "text", "data__client_column": "user",
                                                      "data__holdout": "clients", "data__num_clients": 7}),
    "instruction-iid": ("llama", "parquet", {"data__prompt_column": "prompt", "data__response_column": "response",
                                             "data__partition": "iid", "data__num_clients": 5}),
    "chat-natural": ("llama", "parquet", {"data__messages_column": "messages", "data__client_column": "user",
                                          "data__num_clients": 9}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_model_by_path_trains_on_each_format_and_split_of_the_users_files(tmp_path, cache_dir, own_models,
                                                                            own_files, case, capsys):
    model, ext, fields = CASES[case]
    code, out = _run(tmp_path, cache_dir, own_models[model], data__path=own_files[ext], **fields)
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == ("accuracy" if model == "bert" else "perplexity")
    assert summary["total_bytes"] > 0 and torch.isfinite(torch.tensor(summary["final"]))
    assert (out / "labels.json").exists() == (model == "bert")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, own_models, own_files):
    """One finished run per task, trained on the user's files."""
    runs = {}
    for model, fields in (("llama", {"data__prompt_column": "prompt", "data__response_column": "response",
                                     "data__num_clients": 5}),
                          ("bert", {"data__text_column": "text", "data__label_column": "label",
                                    "data__num_clients": 5})):
        out = tmp_path_factory.mktemp(model) / "run"
        args = ["run", *BASE, *_sets(model__path=own_models[model], data__cache_dir=cache_dir,
                                     data__path=own_files["jsonl"], data__partition="iid", **fields)]
        assert main([*args, "--out", str(out)]) == 0
        runs[model] = out
    return runs


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_the_exported_merged_model_loads_with_plain_transformers_and_equals_base_plus_adapter(
        trained, tmp_path, model):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cellm.interface.use import load_trained

    out = tmp_path / "merged"
    assert main(["export", str(trained[model]), str(out)]) == 0
    auto = AutoModelForCausalLM if model == "llama" else AutoModelForSequenceClassification
    merged = auto.from_pretrained(str(out)).eval()
    loaded, labels, _ = load_trained(trained[model])
    ids = torch.tensor([[101, 2023, 4937, 2938, 2006, 102]])
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    lora_b = [v for k, v in loaded.model.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # the adapter is trained, so the check is not base == base
    if model == "bert":
        assert merged.config.id2label == {0: "food", 1: "sport", 2: "tech"} and labels == ["food", "sport", "tech"]


def test_export_refuses_a_folder_that_holds_files(trained, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["export", str(trained["llama"]), str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "keep.txt").read_text() == "x"


def test_generate_prints_a_completion_and_a_classifier_prints_its_class(trained, capsys):
    assert main(["generate", str(trained["llama"]), "topic sport please", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0
    assert main(["generate", str(trained["bert"]), "the cat sat on the mat"]) == 0
    assert capsys.readouterr().out.strip() in {"food", "sport", "tech"}


def _bad_files(tmp_path):
    rows = own_rows(n=60)
    floats = [{**r, "label": i + 0.25} for i, r in enumerate(rows)]
    one_user = [{**r, "user": "same"} for r in rows]
    long_prompts = [{**r, "prompt": "tell me about " * 20} for r in rows]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    return {"good": write_rows(tmp_path / "good.jsonl", rows), "floats": write_rows(tmp_path / "f.jsonl", floats),
            "one_user": write_rows(tmp_path / "one.jsonl", one_user),
            "long": write_rows(tmp_path / "long.jsonl", long_prompts), "empty": str(empty), "nocfg": str(nocfg)}


LM = {"data__text_column": "text", "data__partition": "iid", "data__num_clients": 4}
BAD = {  # name: (model, fields, what the one-line error must name)
    "missing file": ("llama", {"data__path": "{tmp}/nope.jsonl", **LM}, "nope.jsonl"),
    "missing column": ("llama", {"data__path": "{good}", "data__text_column": "body", "data__partition": "iid"},
                       "data.text_column"),
    "non-categorical labels": ("bert", {"data__path": "{floats}", "data__text_column": "text",
                                        "data__label_column": "label"}, "categorical"),
    "empty file": ("llama", {"data__path": "{empty}", **LM}, "empty.jsonl"),
    "a single client": ("llama", {"data__path": "{one_user}", "data__text_column": "text",
                                  "data__client_column": "user", "data__num_clients": 2}, "data.client_column"),
    "fewer clients than a round": ("llama", {"data__path": "{good}", "data__text_column": "text",
                                             "data__client_column": "user", "data__num_clients": 2,
                                             "fl__clients_per_round": 2, "data__min_client_size": 100},
                                   "data.num_clients"),
    "prompts longer than seq_len": ("llama", {"data__path": "{long}", "data__prompt_column": "prompt",
                                              "data__response_column": "response", "data__partition": "iid",
                                              "data__num_clients": 4, "data__seq_len": 16}, "data.seq_len"),
    "model folder without config": ("{nocfg}", {"data__path": "{good}", **LM}, "config.json"),
    "target modules that match nothing": ("llama", {"data__path": "{good}", **LM,
                                                    "model__target_modules": '["nosuch"]'}, "q_proj"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_own_input_exits_2_with_one_line_naming_it_and_leaves_no_run_folder(tmp_path, cache_dir, own_models,
                                                                               capsys, case):
    files = _bad_files(tmp_path)
    model, fields, needle = BAD[case]
    subst = {"tmp": str(tmp_path), **files}
    model = own_models.get(model) or model.format(**subst)
    fields = {k: v.format(**subst) if isinstance(v, str) else v for k, v in fields.items()}
    code, out = _run(tmp_path, cache_dir, model, **fields)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_model_type_peft_has_no_targets_for_lists_its_linear_layers(tmp_path, cache_dir, own_models, own_files,
                                                                      monkeypatch, capsys):
    from peft.utils import constants

    table = {k: v for k, v in constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items() if k != "llama"}
    monkeypatch.setattr(constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", table)
    code, out = _run(tmp_path, cache_dir, own_models["llama"], data__path=own_files["jsonl"], **LM)
    err = capsys.readouterr().err
    assert code == 2 and "model.target_modules" in err
    assert all(name in err for name in ("q_proj", "k_proj", "down_proj")) and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_run_device_cuda_without_a_gpu_is_refused(tmp_path, cache_dir, own_models, own_files, capsys):
    code, out = _run(tmp_path, cache_dir, own_models["llama"], data__path=own_files["jsonl"], run__device="cuda", **LM)
    assert code == 2 and "run.device" in capsys.readouterr().err and not out.exists()


def test_files_with_a_natural_partition_use_every_usable_client_by_default_and_the_number_reloads_the_same(
        tmp_path, cache_dir, own_models):
    from cellm.config import load_config, with_clients
    from cellm.runtime.setup import load_setup

    path = write_rows(tmp_path / "users.jsonl", own_rows(n=144, users=12))
    cfg = load_config(data={  # a config of the user's own, without a preset: num_clients is left at its default
        "model": {"path": str(own_models["llama"])}, "fl": {"clients_per_round": 3},
        "data": {"name": "files", "path": path, "text_column": "text", "client_column": "user",
                 "partition": "natural", "seq_len": 24, "min_client_size": 2, "cache_dir": cache_dir}})
    assert cfg.data.num_clients == 0
    auto = load_setup(cfg).data
    assert auto.num_clients == 12 and sorted(auto.client_names) == sorted(f"user{i}" for i in range(12))
    again = load_setup(with_clients(cfg, auto.num_clients)).data  # the number written back for a resume or a node
    assert again.client_names == auto.client_names
    for x, y in zip([*again.clients, again.test], [*auto.clients, auto.test], strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)


def test_a_run_on_every_usable_client_records_the_number_says_it_and_resumes(tmp_path, cache_dir, own_models,
                                                                            capsys):
    path = write_rows(tmp_path / "users.jsonl", own_rows(n=144, users=12))
    out = tmp_path / "run"
    args = [*BASE, *_sets(model__path=own_models["llama"], data__cache_dir=cache_dir, data__path=path,
                          data__text_column="text", data__client_column="user", data__partition="natural",
                          data__num_clients=0, rounds=2, run__checkpoint_every=1)]
    assert main(["run", *args, "--out", str(out)]) == 0
    assert "of 12 clients" in capsys.readouterr().out
    recorded = tomllib.loads((out / "config.toml").read_text())["data"]["num_clients"]
    assert recorded == 12 and json.loads((out / "summary.json").read_text())["clients"] == 12
    # a resume reads the number back; nothing is left to run, and it finishes to the same metrics
    metrics = (out / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "metrics.jsonl").read_text() == metrics
