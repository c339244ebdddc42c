"""Packaged pretrained models with a LoRA adapter attached, and a flat view of their trainable tensors."""

from cellm.models.flat import FlatView
from cellm.models.registry import MODELS, LoadedModel, load_model

__all__ = ["MODELS", "FlatView", "LoadedModel", "load_model"]
