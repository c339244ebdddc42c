"""Where the model computes, and in what precision: one code path for CPU and GPU, tensors moved, nothing else.

The flat adapter vector, the codec and the server stay on CPU (:class:`cellm.models.flat.FlatView` copies across);
only the base model, its adapter and each batch live on the chosen device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cellm.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``run.device``: auto (a GPU when torch sees one), cpu, or cuda (an error when there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field 'run.device' is 'cuda' but torch sees no GPU here; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"config field 'run.device' must be auto, cpu or cuda; got {name!r}")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 autocast needs a GPU; bf16 autocast runs on either (slowly on most CPUs); fp32 is no autocast.

    A GPU that torch says cannot do bf16 is refused here, before any work, rather than by autocast mid-round.
    """
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("config field 'run.precision' = 'fp16' needs a GPU (run.device = cuda or auto with a "
                          "GPU); use fp32 or bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config field 'run.precision' = 'bf16' but this GPU does not support bfloat16 "
                          "(torch.cuda.is_bf16_supported() is False); use fp16 or fp32")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed-precision forward passes for ``precision`` bf16 / fp16; a no-op for fp32. Weights stay fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision]):
        yield


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
