"""Data for causal-LM unlearning: tokenized question-answer and text datasets (``erasus.data.text``), the
offline TOFU-style corpus of fictitious authors (``erasus.data.tofu``) and tiny cached causal LMs trained on it
(``erasus.data.lm_models``, needs ``transformers``)."""
from erasus.data.text import QADataset, TextDataset, lm_dataset
from erasus.data.tofu import build_tokenizer, make_authors, qa_records, tofu_splits

__all__ = ["QADataset", "TextDataset", "lm_dataset", "build_tokenizer", "make_authors", "qa_records",
           "tofu_splits", "tiny_causal_lm", "train_causal_lm", "lm_scenario", "greedy_answers"]

_LM_MODELS = ("tiny_causal_lm", "train_causal_lm", "lm_scenario", "greedy_answers")


def __getattr__(name):
    # lm_models imports transformers (the ``llm`` extra): load it on first use only.
    if name in _LM_MODELS:
        from erasus.data import lm_models

        return getattr(lm_models, name)
    raise AttributeError(f"module 'erasus.data' has no attribute {name!r}")
