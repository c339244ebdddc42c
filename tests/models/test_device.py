"""run.device / run.precision checks that need no GPU: they look at a device object, not at a computation."""

import pytest
import torch

from cellm.errors import ConfigError
from cellm.models.device import check_precision


def test_bf16_on_a_gpu_without_bfloat16_is_refused_before_the_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="run.precision.*does not support bfloat16"):
        check_precision("bf16", torch.device("cuda"))
    check_precision("fp16", torch.device("cuda"))
    check_precision("bf16", torch.device("cpu"))  # CPU autocast does bf16 whatever the GPU can do


def test_bf16_on_a_gpu_with_bfloat16_and_fp16_only_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    check_precision("bf16", torch.device("cuda"))
    with pytest.raises(ConfigError, match="'fp16' needs a GPU"):
        check_precision("fp16", torch.device("cpu"))
