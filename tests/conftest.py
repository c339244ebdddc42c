import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenized-data cache shared by the whole test session."""
    return str(tmp_path_factory.mktemp("cellm-cache"))


@pytest.fixture
def tiny_overrides(cache_dir):
    return [f"data.cache_dir='{cache_dir}'"]
