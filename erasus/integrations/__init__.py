"""Erasus inside other training frameworks. ``erasus.integrations.trainer``: a Hugging Face ``Trainer`` that runs
Erasus's unlearning strategies (:class:`UnlearningTrainer`), the stop-and-restore guard and the forgetting metrics
as ``TrainerCallback`` objects, and the forget/retain pairing of OpenUnlearning's data (:class:`ForgetRetainDataset`).
Needs ``transformers`` (the ``llm`` extra); it is imported on first use only."""

__all__ = ["ForgetRetainDataset", "UnlearningTrainer", "ErasusGuardCallback", "ForgetMetricsCallback"]


def __getattr__(name):
    # The trainer module imports transformers (the ``llm`` extra): load it on first use only.
    if name in __all__:
        from erasus.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'erasus.integrations' has no attribute {name!r}")
