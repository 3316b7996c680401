"""Strategies change a model so that it forgets. One registry, filled by the classes themselves.

Every strategy changes the model **in place** (``ErasusUnlearner(copy=True)`` works on a copy). Gradient
strategies expose ``loss(model, forget_batch, retain_batch)`` for use in your own training loop, and
``unlearn`` to run their loop with the guard; training-free ones (SSD, Fisher forgetting) only ``unlearn``.
"""
from __future__ import annotations

import abc
import copy
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from erasus import registry
from erasus._device import model_device, to_device
from erasus.errors import InvalidInputError
from erasus.losses import output_anchor_loss, weight_anchor_loss
from erasus.strategies.guard import GuardTripped, TrainingGuard

STRATEGIES: dict[str, type["Strategy"]] = {}
ANCHORS = (None, "outputs", "weights")


def get_strategy(name: str, **params) -> "Strategy":
    """Build a registered strategy by name, e.g. ``get_strategy("npo", beta=0.1)``."""
    return registry.build(STRATEGIES, "strategy", name, params)


class Strategy(abc.ABC):
    name: ClassVar[str]
    needs_retain: ClassVar[bool] = False
    training_free: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        registry.register(STRATEGIES, "strategy", cls, name)

    @abc.abstractmethod
    def unlearn(self, model: nn.Module, forget, retain=None, *, epochs: int = 1, original: nn.Module | None = None,
                on_step: Callable[[dict], None] | None = None, on_epoch: Callable[[int], None] | None = None,
                guard: TrainingGuard | None = None) -> dict:
        """Make ``model`` (in place) forget the batches of ``forget``; ``retain`` batches hold utility.
        Batches are ``(inputs, labels)``. Returns a log: ``{"steps": int, "stopped": reason or None}``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def frozen_copy(model: nn.Module) -> nn.Module:
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    return original


class GradientStrategy(Strategy):
    """A strategy trained by gradient steps on ``loss(model, forget_batch, retain_batch)``.

    Args:
        lr: learning rate. optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9). weight_decay: as the optimizer's.
        retain_weight: weight of the retain term where the method has one.
        anchor: the retain-anchor penalty, combinable with any gradient method: ``"outputs"`` adds
            ``anchor_weight * KL(p_original || p_model)`` on the retain batch, ``"weights"`` adds
            ``anchor_weight * ||theta - theta_original||^2``; ``None`` adds nothing.
    """

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", weight_decay: float = 0.0,
                 retain_weight: float = 1.0, anchor: str | None = None, anchor_weight: float = 1.0):
        if optimizer not in ("adam", "sgd"):
            raise InvalidInputError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if anchor not in ANCHORS:
            raise InvalidInputError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        if not lr > 0:
            raise InvalidInputError(f"lr must be positive, got {lr!r}")
        self.lr, self.optimizer, self.weight_decay = lr, optimizer, weight_decay
        self.retain_weight, self.anchor, self.anchor_weight = retain_weight, anchor, anchor_weight
        self._original: nn.Module | None = None

    @abc.abstractmethod
    def method_loss(self, model: nn.Module, forget_batch, retain_batch) -> torch.Tensor:
        """The method's own scalar loss (without the anchor)."""

    def loss(self, model: nn.Module, forget_batch, retain_batch=None, original: nn.Module | None = None
             ) -> torch.Tensor:
        """Scalar loss of one step: the method's loss plus the retain anchor, if any. ``original`` is the
        frozen model before unlearning (needed by NPO, SCRUB and the anchors); it is kept between calls."""
        if original is not None:
            self._original = original
        total = self.method_loss(model, forget_batch, retain_batch)
        if self.anchor == "outputs" and retain_batch is not None:
            x = retain_batch[0]
            with torch.no_grad():
                ref = self.original(model)(x)
            total = total + self.anchor_weight * output_anchor_loss(model(x), ref).mean()
        elif self.anchor == "weights":
            params = [p for p in model.parameters() if p.requires_grad]
            ref = [p for p, q in zip(self.original(model).parameters(), model.parameters()) if q.requires_grad]
            total = total + self.anchor_weight * weight_anchor_loss(params, ref)
        return total

    def original(self, model: nn.Module) -> nn.Module:
        if self._original is None:
            self._original = frozen_copy(model)
        return self._original

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def before_step(self, model: nn.Module) -> None:
        """Hook run between backward and the optimizer step (SalUn masks gradients here)."""

    def after_step(self, model: nn.Module) -> None:
        """Hook run after every optimizer step (SalUn puts masked weights back here)."""

    def unlearn(self, model, forget, retain=None, *, epochs=1, original=None, on_step=None, on_epoch=None,
                guard=None):
        if self.needs_retain and retain is None:
            raise InvalidInputError(f"{type(self).__name__} needs retain data")
        self._original = original if original is not None else frozen_copy(model)
        self.prepare(model, forget, retain)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = self.make_optimizer(params)
        guard = guard or TrainingGuard(model)
        retain_iter = _cycle(retain) if retain is not None else None
        device = model_device(model)
        was_training = model.training
        model.train()
        log = {"steps": 0, "stopped": None}
        try:
            for epoch in range(epochs):
                for forget_batch in self.forget_batches(forget, epoch):
                    forget_batch = to_device(forget_batch, device)
                    retain_batch = to_device(next(retain_iter), device) if retain_iter is not None else None
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss(model, forget_batch, retain_batch)
                    if not torch.isfinite(loss):
                        guard.check(loss)
                    loss.backward()
                    self.before_step(model)
                    opt.step()
                    self.after_step(model)
                    log["steps"] += 1
                    guard.check(loss.detach())
                    if on_step is not None:
                        on_step({"epoch": epoch, "step": log["steps"], "loss": float(loss.detach())})
                self.end_epoch(model, epoch, retain, opt, guard, log)
                if on_epoch is not None:
                    on_epoch(epoch)
        except GuardTripped as exc:
            log["stopped"] = str(exc)
        finally:
            model.train(was_training)
        return log

    def prepare(self, model: nn.Module, forget, retain) -> None:
        """Work before the first step (SalUn's mask)."""

    def forget_batches(self, forget, epoch: int):
        return forget

    def end_epoch(self, model, epoch, retain, opt, guard, log) -> None:
        """Work after each epoch's forget pass (SCRUB's min-steps)."""


def _cycle(loader):
    """Batches of ``loader`` without end, a fresh pass (and shuffle) each time round."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise InvalidInputError("retain data yielded no batches")


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = to_device(batch, model_device(model))[:2]
    return F.cross_entropy(model(x), y)
