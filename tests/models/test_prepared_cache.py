"""The node-local cache of de-quantized GGUF weights, with processes that race to fill it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import torch

from cellm.models import registry


def _fake_gguf_spec(tmp_path):
    """tiny-llama standing in for a GGUF model: ``loader(prepared=folder)`` reads the kept folder back."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not read: only its path, size and time key the cache")
    loads = []

    def loader(num_labels, prepared=None):
        loads.append(prepared)
        if prepared is None:
            return registry._load_tiny_llama(num_labels)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return (AutoModelForCausalLM.from_pretrained(str(prepared), dtype=torch.float32, local_files_only=True),
                AutoTokenizer.from_pretrained(str(prepared), local_files_only=True))

    spec = dataclasses.replace(registry.MODELS["tiny-llama"], loader=loader, gguf=lambda: gguf)
    return spec, loads


def test_a_process_that_loses_the_race_to_keep_the_model_uses_the_winners_entry_without_a_warning(
        tmp_path, monkeypatch):
    spec, loads = _fake_gguf_spec(tmp_path)
    cache = tmp_path / "cache"
    real_replace = os.replace

    def another_process_was_first(src, dst):
        shutil.copytree(src, dst)  # the other process's rename lands first ...
        real_replace(src, dst)  # ... so ours fails as a rename onto a non-empty folder does

    monkeypatch.setattr(registry.os, "replace", another_process_was_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = registry._load_base(spec, None, str(cache))
    kept = list((cache / "models").iterdir())
    assert [p.name.startswith(".") for p in kept] == [False]  # one entry, no temporary folder left behind
    monkeypatch.setattr(registry.os, "replace", real_replace)
    again, _ = registry._load_base(spec, None, str(cache))
    assert loads == [None, kept[0]]  # the second load read the kept entry
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_that_cannot_be_written_warns_and_still_loads(tmp_path, monkeypatch):
    spec, _ = _fake_gguf_spec(tmp_path)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry.os, "replace", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok = registry._load_base(spec, None, str(tmp_path / "cache"))
    assert any("could not keep the de-quantized model" in str(w.message) for w in caught)
    assert model is not None and tok is not None
    assert not [p for p in (tmp_path / "cache" / "models").iterdir()]  # nothing half-written kept
