"""Stop-and-restore guard for iterative unlearning: a NaN/inf loss or weight, or weights that explode, stop the
run and put the model back to its last good state, bit for bit."""
from __future__ import annotations

import math

import torch
from torch import nn


class GuardTripped(Exception):
    """Raised inside a training loop when the guard restored the model; the loop stops."""


class ModelState:
    """A copy of what a run can change: the trainable parameters and the buffers (frozen weights, e.g. the base
    of a LoRA model, never move, so they are not copied). ``restore()`` writes it back bit for bit."""

    def __init__(self, model: nn.Module):
        self.tensors = [p for p in model.parameters() if p.requires_grad] + list(model.buffers())
        self.copies = [t.detach().clone() for t in self.tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for t, c in zip(self.tensors, self.copies):
                t.copy_(c)

    def update(self) -> None:
        """Take the current values into the same buffers (no new allocation per step)."""
        with torch.no_grad():
            for t, c in zip(self.tensors, self.copies):
                c.copy_(t)


class TrainingGuard:
    """Keeps a copy of the last good trainable weights and buffers (taken every ``snapshot_every`` steps, and at
    the start) and checks every step.

    ``check(loss)`` raises :class:`GuardTripped` after restoring the snapshot when the loss is NaN/inf, a
    trainable weight is NaN/inf, or the weights' norm has grown beyond ``max_norm_ratio`` times its initial
    value. ``events`` records what happened, for the report.
    """

    def __init__(self, model: nn.Module, snapshot_every: int = 1, max_norm_ratio: float = 100.0):
        self.model = model
        self.snapshot_every = max(1, int(snapshot_every))
        self.max_norm_ratio = max_norm_ratio
        self.events: list[dict] = []
        self.steps = 0
        self._initial_norm = self._norm()
        self._snapshot = ModelState(model)
        self._snapshot_step = 0

    def _trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _norm(self) -> float:
        return math.sqrt(sum(float(p.detach().float().square().sum()) for p in self._trainable()))

    def restore(self) -> None:
        self._snapshot.restore()

    def check(self, loss: torch.Tensor | float) -> None:
        self.steps += 1
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        reason = None
        if not math.isfinite(value):
            reason = f"loss is {value}"
        elif any(not bool(torch.isfinite(p).all()) for p in self._trainable()):
            reason = "a weight became NaN or infinite"
        elif self._initial_norm > 0:  # an all-zero start has no scale to compare against
            norm = self._norm()
            if norm > self.max_norm_ratio * self._initial_norm:
                reason = f"weights exploded (norm {norm:.3g}, {norm / self._initial_norm:.0f}x the original)"
        if reason is not None:
            self.restore()
            self.events.append({"step": self.steps, "reason": reason, "restored_to_step": self._snapshot_step})
            raise GuardTripped(reason)
        if self.steps % self.snapshot_every == 0:
            self._snapshot.update()
            self._snapshot_step = self.steps
