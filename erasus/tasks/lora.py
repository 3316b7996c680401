"""peft LoRA adapters: wrap a model so that only an adapter trains, save it, export a merged model."""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from erasus.errors import InvalidInputError
from erasus.tasks.reference import is_peft_model


def lora_config(config):
    """A ``peft.LoraConfig`` from a LoraConfig or a dict of its fields (``task_type`` defaults to causal LM for
    transformers causal LMs)."""
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - the llm extra
        raise InvalidInputError("LoRA needs peft: pip install 'erasus[llm]'") from exc
    if isinstance(config, LoraConfig):
        return config
    if not isinstance(config, dict):
        raise InvalidInputError(f"lora must be a peft.LoraConfig or a dict of its fields, got {type(config).__name__}")
    try:
        return LoraConfig(**config)
    except TypeError as exc:
        raise InvalidInputError(f"lora: {exc}") from exc


def apply_lora(model: nn.Module, config) -> nn.Module:
    """``peft.get_peft_model(model, config)``: only the new adapter is trainable. **peft injects the adapter
    layers into ``model`` itself** (its base weights are frozen and never change); ``remove_lora`` takes them
    out again. A target module the model lacks is an InvalidInputError naming it."""
    from peft import get_peft_model

    config = lora_config(config)
    if is_peft_model(model):
        raise InvalidInputError("the model already is a peft model: pass it without lora= to train its adapter")
    targets = config.target_modules
    if isinstance(targets, str):
        names = [targets]
    else:
        names = sorted(targets or [])
    modules = [n for n, _ in model.named_modules()]
    if isinstance(targets, (set, list, tuple)):
        missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())})
            raise InvalidInputError(f"lora target module(s) {missing} not found in {type(model).__name__}; its "
                                    f"leaf modules are named {leaves}")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise InvalidInputError(f"lora: {exc}") from exc


def remove_lora(peft_model: nn.Module) -> nn.Module:
    """Take the adapter layers out of the base model again (without merging): the model as before
    ``apply_lora``."""
    return peft_model.unload()


def save_adapter(peft_model: nn.Module, path) -> Path:
    """The adapter alone, as ``adapter_model.safetensors`` + ``adapter_config.json`` in ``path``."""
    path = Path(path)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    return path


def save_merged(peft_model: nn.Module, path, finalize=None) -> Path:
    """A plain transformers model with the adapter merged into its weights (``save_pretrained``, safetensors),
    written from a copy: the peft model is left as it is. ``finalize(merged) -> merged`` (optional) edits the
    merged copy before it is saved (a pruning strategy zeroes its pruned rows and columns there)."""
    path = Path(path)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    if finalize is not None:
        merged = finalize(merged)
    merged.save_pretrained(str(path), safe_serialization=True)
    return path
