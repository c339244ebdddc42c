"""Packaged pretrained models with a LoRA adapter attached (:mod:`cellm.models.registry`), a flat view of
their trainable tensors (:mod:`cellm.models.flat`), SLoRA's stage mechanics, devices and evaluation."""
