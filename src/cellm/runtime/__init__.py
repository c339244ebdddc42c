"""Runtimes that drive rounds: the embedded simulator (one process, one base model) and the Flower apps."""
