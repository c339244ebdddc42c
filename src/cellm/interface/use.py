"""Using a finished run: ``cellm generate`` (base model + the run's adapter) and ``cellm export`` (merged model).

Both rebuild the base model exactly as the run did (same config, same seed), then load the saved adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from cellm.config import file_spec, load_config, task_of
from cellm.data import DATASETS, label_names
from cellm.errors import ConfigError
from cellm.models.registry import LoadedModel, load_model, resolve_spec
from cellm.runtime import runfolder as rf


def load_trained(run_dir: str | Path) -> tuple[LoadedModel, list[str] | None, str]:
    """(base model with the run's final adapter, class names or None, how prompts were rendered in training:
    "chat" (the tokenizer's chat template), "instruction" (BOS + prompt) or "text")."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    d = Path(run_dir)
    weights = d / rf.ADAPTER / "adapter_model.safetensors"
    if not (d / rf.CONFIG).is_file() or not weights.is_file():
        raise ConfigError(f"{d} is not a finished cellm run folder (no {rf.CONFIG} or {rf.ADAPTER}/adapter_model.safetensors)")
    cfg = load_config(d / rf.CONFIG)
    task = task_of(cfg)
    labels = None
    if task == "classification":
        if (d / rf.LABELS).is_file():
            labels = json.loads((d / rf.LABELS).read_text())
        elif cfg.data.name == "files":
            labels = label_names(file_spec(cfg.data))
    num_labels = len(labels) if labels else DATASETS[cfg.data.name].num_labels
    m = cfg.model
    loaded = load_model(resolve_spec(m.name, m.path, task), lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                        lora_dropout=m.lora_dropout, target_modules=m.target_modules, num_labels=num_labels,
                        seed=cfg.seed, freeze_a=m.freeze_a, adapter=m.adapter,
                        vera_rank=m.vera_rank)
    result = set_peft_model_state_dict(loaded.model, load_file(str(weights)))
    missing = [k for k in getattr(result, "unexpected_keys", []) if m.adapter in k]
    if missing:
        raise ConfigError(f"{weights} does not fit the model its config builds ({missing[0]} is unexpected)")
    loaded.model.eval()
    style = "chat" if cfg.data.messages_column else ("instruction" if cfg.data.prompt_column else "text")
    return loaded, labels, style


@torch.no_grad()
def generate(run_dir: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> str:
    """The run's model's completion of ``prompt`` (greedy at temperature 0); a classifier answers its class.

    The prompt is rendered as in training: a user turn through the chat template (chat and prompt/response data;
    BOS + prompt + newline for prompt/response data when the tokenizer has no template), or as it is.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0; got {temperature}")
    loaded, labels, style = load_trained(run_dir)
    tok, model = loaded.tokenizer, loaded.model
    if loaded.task == "classification":
        enc = tok(prompt, return_tensors="pt", truncation=True)
        k = int(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1))
        return labels[k] if labels else str(k)
    if style == "chat" or (style == "instruction" and getattr(tok, "chat_template", None)):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    elif style == "instruction":
        text = (tok.bos_token or "") + prompt + "\n"
    else:
        text = prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=style == "text")
    sample = temperature > 0
    torch.manual_seed(seed)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_p=None, top_k=None,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def export(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the base model with the run's adapter merged in (peft's merge), and its tokenizer, as a plain
    transformers folder. Written to a temporary folder first: a failure leaves nothing under ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export folder {out} already exists and is not empty; choose a new one")
    loaded, labels, _ = load_trained(run_dir)
    merged = loaded.model.merge_and_unload()
    quantizer = getattr(merged, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        # a GGUF base is de-quantized to float tensors when loaded: save those as a plain model
        merged.hf_quantizer = None
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
    if labels:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {name: i for i, name in enumerate(labels)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
