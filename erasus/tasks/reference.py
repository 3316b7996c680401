"""The frozen model before unlearning, which NPO, SCRUB, KL retain terms, RMU, ELM and the anchors compare with.

For a peft model it is the same model with its adapters switched off (``disable_adapter()``): no second copy of
the weights. Otherwise it is a frozen deep copy, made once, at the start of the run.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


class Reference:
    """The model as it was when the Reference was made.

    ``Reference(model)`` shares the weights of a peft model (its base weights are frozen; the reference is the
    model under ``disable_adapter()``), and deep-copies any other model. ``Reference.of(frozen)`` wraps a
    model you already hold frozen. ``use()`` is a context manager giving a module to call in eval mode;
    ``outputs(task, batch)`` gives its outputs without gradients.
    """

    def __init__(self, model: nn.Module, *, shared: bool | None = None):
        self.model = model
        self.shared = is_peft_model(model) if shared is None else shared
        if self.shared and not is_peft_model(model):
            raise ValueError("a shared reference needs a peft model (one with disable_adapter())")
        self._copy = None if self.shared else _frozen_copy(model)

    @classmethod
    def of(cls, frozen: nn.Module) -> "Reference":
        """A reference that is ``frozen`` itself (not copied again)."""
        ref = cls.__new__(cls)
        ref.model, ref.shared, ref._copy = frozen, False, frozen
        return ref

    @property
    def copied_bytes(self) -> int:
        """Memory held by the reference beyond the model: 0 when shared."""
        if self._copy is None or self._copy is self.model:
            return 0
        return unique_bytes(self._copy)

    @contextlib.contextmanager
    def use(self):
        """A module computing the reference's outputs (eval mode; restored afterwards)."""
        if not self.shared:
            yield self._copy
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield self.model
        finally:
            self.model.train(was_training)

    def outputs(self, task, batch) -> torch.Tensor:
        with torch.no_grad(), self.use() as module:
            return task.outputs(module, batch)


def unique_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _frozen_copy(model: nn.Module) -> nn.Module:
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    return original
