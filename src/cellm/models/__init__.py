"""Packaged pretrained models with a LoRA adapter attached, and a flat view of their trainable tensors.

Import from the defining modules (``cellm.models.registry``, ``cellm.models.flat``); the two names below remain
for existing callers.
"""

from cellm.models.flat import FlatView
from cellm.models.registry import load_model

__all__ = ["FlatView", "load_model"]
