"""Loading a causal LM and its tokenizer from a local folder, offline (never from a hub)."""
from __future__ import annotations

from pathlib import Path

from erasus.errors import InvalidInputError


def load_causal_lm(path, *, torch_dtype=None):
    """``(model, tokenizer)`` from a folder written by ``save_pretrained`` (``local_files_only``: nothing is
    downloaded). A folder holding a peft adapter (adapter_config.json) loads its base model from the path the
    adapter names and attaches the adapter. A tokenizer without a pad token gets none invented: QADataset will
    say so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise InvalidInputError(f"model path {str(folder)!r} is not a folder (models load from local folders only)")
    try:
        if (folder / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(folder), local_files_only=True, is_trainable=True)
        else:
            kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"could not load a causal LM and tokenizer from {str(folder)!r}: {exc}") from exc
    return model, tokenizer
