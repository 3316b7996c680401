"""Stop-and-restore guard for iterative unlearning: a NaN/inf loss or weight, or weights that explode, stop the
run and put the model back to its last good state, bit for bit.

Under data parallelism (several processes, e.g. ``accelerate launch``) every rank must stop at the same step, or
the ranks that go on wait forever in the next gradient all-reduce. Given ``agree`` (one all-gather of a short
float64 row per check), the guard decides on what every rank found: one rank's NaN stops and restores them all.
"""
from __future__ import annotations

import math
import sys
from typing import Callable

import torch
from torch import nn

# What one rank found at a check, as the number it sends to the others (0: nothing wrong).
_LOSS, _WEIGHT, _EXPLODED = 1, 2, 3


class GuardTripped(Exception):
    """Raised inside a training loop when the guard restored the model; the loop stops."""


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor spread over the processes (a DTensor, e.g. an FSDP2 parameter)."""
    return callable(getattr(t, "to_local", None))


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds: a sharded parameter (FSDP2's DTensor) is checked, copied and restored
    shard by shard, with no communication; a plain tensor is itself. Differentiable (a DTensor's ``to_local``)."""
    return t.to_local() if is_sharded(t) else t


def reshard_fsdp(model: nn.Module) -> None:
    """Free the unsharded parameters that FSDP2 keeps after a forward until the backward (the root module's, and
    every unit's with ``reshard_after_forward=False``, as accelerate makes of the embedding, final norm and head)
    and put the sharded ones back in the modules: the next forward then gathers the shards as they are now, e.g.
    just restored. No communication; changes no value in ``model``; without FSDP (never imported) it does nothing."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not hasattr(fsdp, "FSDPModule"):
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def _changeable(model: nn.Module) -> list[torch.Tensor]:
    """What a run can change, as this process holds it: the trainable parameters and the buffers."""
    return [local_part(t) for t in [p for p in model.parameters() if p.requires_grad] + list(model.buffers())]


class ModelState:
    """A copy of what a run can change: the trainable parameters and the buffers (frozen weights, e.g. the base
    of a LoRA model, never move, so they are not copied). ``restore()`` writes it back bit for bit."""

    def __init__(self, model: nn.Module):
        self.tensors = _changeable(model)
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
    value. ``events`` records what happened, for the report. ``check_loss(loss)``, called before backward, trips
    on a NaN/inf loss only.

    ``agree`` (None in one process): under data parallelism, a collective that gathers a 1-D float64 CPU tensor
    from every rank into a ``(world, n)`` tensor, e.g. :func:`agree_on` ``(accelerator)`` for accelerate.
    Every check then costs one all-gather and every rank takes the same decision: a rank whose own values were
    fine restores too, and the reason names the rank that tripped. With sharded parameters (FSDP2) each rank
    checks, copies and restores its own shards, and the norm test compares each shard with its initial norm.
    """

    def __init__(self, model: nn.Module, snapshot_every: int = 1, max_norm_ratio: float = 100.0, *,
                 agree: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.snapshot_every = max(1, int(snapshot_every))
        self.max_norm_ratio = max_norm_ratio
        self.agree = agree
        self.events: list[dict] = []
        self.steps = 0
        self._initial_norm = self._norm()
        self._snapshot = ModelState(model)
        self._snapshot_step = 0

    def track(self, model: nn.Module) -> None:
        """Guard ``model``'s parameters as they are now. A wrapper that replaces them in place (FSDP2's
        ``fully_shard``, run by ``accelerator.prepare``) would otherwise leave the guard copying tensors the model
        no longer uses: then the snapshot and the initial norm are taken again. Parameters that are still the
        guarded ones (DDP wraps without replacing them) change nothing."""
        current, guarded = _changeable(model), self._snapshot.tensors
        if len(current) == len(guarded) and all(a is b for a, b in zip(current, guarded)):
            return
        self.model = model
        self._initial_norm = self._norm()
        self._snapshot = ModelState(model)
        self._snapshot_step = self.steps

    def _trainable(self):
        return [local_part(p) for p in self.model.parameters() if p.requires_grad]

    def _norm(self) -> float:
        return math.sqrt(sum(float(p.detach().float().square().sum()) for p in self._trainable()))

    def restore(self) -> None:
        self._snapshot.restore()
        # a NaN loss trips between forward and backward, while FSDP2 still holds unsharded copies of what it just
        # restored: freed, so that the evaluations after the stop read the restored weights
        reshard_fsdp(self.model)

    def check_loss(self, loss: torch.Tensor | float) -> float:
        """Before backward: a NaN/inf loss trips the guard before anything moves (under ``agree``, a NaN on any
        rank trips every rank here, before the gradient all-reduce that a stopped rank would leave the others
        waiting in). Returns the loss to log: this rank's, or the mean over the ranks under ``agree`` (the loss
        of the whole global batch when every rank holds as many samples)."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if self.agree is None:
            if not math.isfinite(value):
                self.check(loss)
            return value
        table = self._gather([0.0 if math.isfinite(value) else _LOSS, value, 0.0, 0.0])
        if bool((table[:, 0] > 0).any()):
            self.steps += 1
            self._trip(_first_reason(table))
        return float(table[:, 1].mean())

    def check(self, loss: torch.Tensor | float) -> None:
        self.steps += 1
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        code, norm = self._inspect(value)
        ratio = norm / self._initial_norm if code == _EXPLODED else 0.0
        if self.agree is None:
            reason = _reason(code, value, norm, ratio) if code else None
        else:
            table = self._gather([code, value, norm, ratio])
            reason = _first_reason(table) if bool((table[:, 0] > 0).any()) else None
        if reason is not None:
            self._trip(reason)
        if self.steps % self.snapshot_every == 0:
            self._snapshot.update()
            self._snapshot_step = self.steps

    def _inspect(self, value: float) -> tuple[int, float]:
        """``(code, weight norm)`` of what this rank sees: a non-finite loss, a non-finite weight, or a weight
        norm beyond ``max_norm_ratio`` times its initial value (code 0 when nothing is wrong)."""
        if not math.isfinite(value):
            return _LOSS, 0.0
        if any(not bool(torch.isfinite(p).all()) for p in self._trainable()):
            return _WEIGHT, 0.0
        if self._initial_norm > 0:  # an all-zero start has no scale to compare against
            norm = self._norm()
            if norm > self.max_norm_ratio * self._initial_norm:
                return _EXPLODED, norm
        return 0, 0.0

    def _gather(self, row: list[float]) -> torch.Tensor:
        return self.agree(torch.tensor(row, dtype=torch.float64)).reshape(-1, len(row)).cpu()

    def _trip(self, reason: str) -> None:
        self.restore()
        self.events.append({"step": self.steps, "reason": reason, "restored_to_step": self._snapshot_step})
        raise GuardTripped(reason)


def _reason(code: int, value: float, norm: float, ratio: float) -> str:
    if code == _LOSS:
        return f"loss is {value}"
    if code == _WEIGHT:
        return "a weight became NaN or infinite"
    return f"weights exploded (norm {norm:.3g}, {ratio:.0f}x the original)"


def _first_reason(table: torch.Tensor) -> str:
    """The reason of the first rank that tripped, named, from the gathered ``(world, 4)`` table: the same text on
    every rank."""
    rank = int((table[:, 0] > 0).nonzero()[0])
    code, value, norm, ratio = int(table[rank, 0]), *(float(v) for v in table[rank, 1:])
    return f"{_reason(code, value, norm, ratio)} on rank {rank} of {table.shape[0]}"


def agree_on(accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    """The guard's ``agree`` over an ``accelerate.Accelerator``'s processes: its all-gather of every rank's row,
    moved to the accelerator's device and back (NCCL gathers CUDA tensors only)."""

    def agree(row: torch.Tensor) -> torch.Tensor:
        return accelerator.gather(row.to(accelerator.device)[None]).cpu()

    return agree
