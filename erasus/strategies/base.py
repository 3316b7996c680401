"""Strategies change a model so that it forgets. One registry, filled by the classes themselves.

Strategies are written once against the task layer (``erasus.tasks``): the same class unlearns a classifier
and a causal LM. Every strategy changes the model **in place** (``ErasusUnlearner(copy=True)`` works on a
copy). Gradient strategies expose ``loss(model, forget_batch, retain_batch)`` for use in your own training loop,
and ``unlearn`` to run their loop with the guard; training-free ones (SSD, Fisher forgetting) only ``unlearn``.
When only a peft adapter is trainable, only the adapter moves, and the frozen reference is the same model with
the adapter disabled (no copy).
"""
from __future__ import annotations

import abc
import copy
from typing import Callable, ClassVar

import torch
from torch import nn

from erasus import registry
from erasus._device import model_device, to_device
from erasus.errors import InvalidInputError
from erasus.losses import weight_anchor_loss
from erasus.strategies.guard import GuardTripped, TrainingGuard
from erasus.tasks import Reference, Task, infer_task

STRATEGIES: dict[str, type["Strategy"]] = {}
ANCHORS = (None, "outputs", "weights")


def get_strategy(name: str, **params) -> "Strategy":
    """Build a registered strategy by name, e.g. ``get_strategy("npo", beta=0.1)``."""
    return registry.build(STRATEGIES, "strategy", name, params)


class Strategy(abc.ABC):
    name: ClassVar[str]
    needs_retain: ClassVar[bool] = False
    training_free: ClassVar[bool] = False
    #: task names the strategy works on; None means every family
    tasks: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        registry.register(STRATEGIES, "strategy", cls, name)

    @property
    def needs_reference(self) -> bool:
        """Whether the strategy compares with the model before unlearning (then the unlearner keeps one)."""
        return False

    def check_task(self, task: Task) -> None:
        if self.tasks is not None and task.name not in self.tasks:
            raise InvalidInputError(f"strategy {getattr(self, 'name', type(self).__name__)!r} works on "
                                    f"{list(self.tasks)} models, not on task {task.name!r}")

    @abc.abstractmethod
    def unlearn(self, model: nn.Module, forget, retain=None, *, epochs: int = 1, original: nn.Module | None = None,
                on_step: Callable[[dict], None] | None = None, on_epoch: Callable[[int], None] | None = None,
                guard: TrainingGuard | None = None, task: Task | str | None = None,
                reference: Reference | None = None) -> dict:
        """Make ``model`` (in place) forget the batches of ``forget``; ``retain`` batches hold utility.
        Batches are the task's format (``(inputs, labels)`` for classifiers, token dicts for causal LMs).
        ``reference`` (or ``original``, a frozen module) is the model before unlearning; made if needed.
        Returns a log: ``{"steps": int, "stopped": reason or None}``."""

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_") and not isinstance(v, nn.Module)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def frozen_copy(model: nn.Module) -> nn.Module:
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    return original


class GradientStrategy(Strategy):
    """A strategy trained by gradient steps on ``loss(model, forget_batch, retain_batch)``.

    Args:
        lr: learning rate. optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9). weight_decay: as the
            optimizer's.
        retain_weight: weight of the retain term where the method has one.
        anchor: the retain-anchor penalty, combinable with any gradient method: ``"outputs"`` adds
            ``anchor_weight * KL(p_original || p_model)`` on the retain batch, ``"weights"`` adds
            ``anchor_weight * ||theta - theta_original||^2`` over the trainable parameters; ``None`` adds nothing.
        max_grad_norm: clip the gradient's global norm to this before each step (None: no clipping).
    """

    def __init__(self, lr: float = 1e-3, optimizer: str = "adam", weight_decay: float = 0.0,
                 retain_weight: float = 1.0, anchor: str | None = None, anchor_weight: float = 1.0,
                 max_grad_norm: float | None = None):
        if optimizer not in ("adam", "adamw", "sgd"):
            raise InvalidInputError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {optimizer!r}")
        if anchor not in ANCHORS:
            raise InvalidInputError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        _positive("lr", lr)
        _nonnegative("weight_decay", weight_decay)
        _nonnegative("retain_weight", retain_weight)
        _nonnegative("anchor_weight", anchor_weight)
        if max_grad_norm is not None:
            _positive("max_grad_norm", max_grad_norm)
        self.lr, self.optimizer, self.weight_decay = lr, optimizer, weight_decay
        self.retain_weight, self.anchor, self.anchor_weight = retain_weight, anchor, anchor_weight
        self.max_grad_norm = max_grad_norm
        self._task: Task | None = None
        self._reference: Reference | None = None
        self._initial: dict[str, torch.Tensor] | None = None

    # -- what a method is written with ------------------------------------------------------------------
    @abc.abstractmethod
    def method_loss(self, model: nn.Module, forget_batch, retain_batch) -> torch.Tensor:
        """The method's own scalar loss (without the anchor)."""

    @property
    def task(self) -> Task:
        if self._task is None:
            raise InvalidInputError("the strategy is not bound to a task yet: call loss() or unlearn() first")
        return self._task

    def outputs(self, model: nn.Module, batch) -> torch.Tensor:
        return self.task.outputs(model, batch)

    def reference_outputs(self, model: nn.Module, batch) -> torch.Tensor:
        """The frozen original model's outputs on ``batch`` (no gradient)."""
        return self.reference(model).outputs(self.task, batch)

    def nll(self, model: nn.Module, batch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The task's training loss on a batch, averaged over its samples (CE; token-mean NLL)."""
        logits = self.outputs(model, batch) if logits is None else logits
        return self.task.per_sample_loss(logits, batch).mean()

    def reference(self, model: nn.Module) -> Reference:
        if self._reference is None:
            self._reference = Reference(model)
        return self._reference

    @property
    def needs_reference(self) -> bool:
        return self.anchor == "outputs"

    # -- one step ---------------------------------------------------------------------------------------
    def bind(self, model: nn.Module, task: Task | str | None = None, reference: Reference | None = None,
             original: nn.Module | None = None) -> None:
        """Set the task (inferred from the model unless given) and the reference for the next steps."""
        if task is not None or self._task is None:
            self._task = infer_task(model, task)
            self.check_task(self._task)
        if reference is not None:
            self._reference = reference
        elif original is not None:
            self._reference = Reference.of(original)
        if self.anchor == "weights" and self._initial is None:
            self._initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def loss(self, model: nn.Module, forget_batch, retain_batch=None, original: nn.Module | None = None
             ) -> torch.Tensor:
        """Scalar loss of one step: the method's loss plus the retain anchor, if any. ``original`` is the
        frozen model before unlearning (NPO, SCRUB, KL terms and the anchors use it); it is kept between calls,
        and made from ``model`` at the first call when not given."""
        self.bind(model, original=original)
        total = self.method_loss(model, forget_batch, retain_batch)
        if self.anchor == "outputs" and retain_batch is not None:
            ref = self.reference_outputs(model, retain_batch)
            total = total + self.anchor_weight * self.task.output_kl(self.outputs(model, retain_batch), ref,
                                                                     retain_batch).mean()
        elif self.anchor == "weights":
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n in self._initial]
            total = total + self.anchor_weight * weight_anchor_loss([p for _, p in named],
                                                                    [self._initial[n] for n, _ in named])
        return total

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    def before_step(self, model: nn.Module) -> None:
        """Hook run between backward and the optimizer step (SalUn masks gradients here)."""

    def after_step(self, model: nn.Module) -> None:
        """Hook run after every optimizer step (SalUn puts masked weights back here)."""

    def unlearn(self, model, forget, retain=None, *, epochs=1, original=None, on_step=None, on_epoch=None,
                guard=None, task=None, reference=None):
        if self.needs_retain and retain is None:
            raise InvalidInputError(f"{type(self).__name__} needs retain data")
        self._initial = None
        self.bind(model, task if task is not None else infer_task(model), reference, original)
        if self.needs_reference:
            self.reference(model)  # made now, before any step, if the caller gave none
        if not any(p.requires_grad for p in model.parameters()):
            raise InvalidInputError("the model has no trainable parameters (every requires_grad is False)")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        try:
            return self._run(model, forget, retain, epochs, on_step, on_epoch, guard)
        finally:
            for p, flag in flags:  # a strategy may freeze parameters for its run (RMU's train_layers)
                p.requires_grad_(flag)
            model.train(was_training)

    def _run(self, model, forget, retain, epochs, on_step, on_epoch, guard):
        self.prepare(model, forget, retain)
        opt = self.make_optimizer([p for p in model.parameters() if p.requires_grad])
        guard = guard or TrainingGuard(model)
        retain_iter = _cycle(retain) if retain is not None else None
        device = model_device(model)
        model.train()
        log = {"steps": 0, "stopped": None}
        try:
            for epoch in range(epochs):
                for forget_batch in self.forget_batches(forget, epoch):
                    forget_batch = to_device(forget_batch, device)
                    retain_batch = to_device(next(retain_iter), device) if retain_iter is not None else None
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss(model, forget_batch, retain_batch)
                    self.step(model, loss, opt, guard)
                    log["steps"] += 1
                    guard.check(loss.detach())
                    if on_step is not None:
                        on_step({"epoch": epoch, "step": log["steps"], "loss": float(loss.detach())})
                self.end_epoch(model, epoch, retain, opt, guard, log)
                if on_epoch is not None:
                    on_epoch(epoch)
        except GuardTripped as exc:
            log["stopped"] = str(exc)
        return log

    def step(self, model: nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer, guard: TrainingGuard) -> None:
        """Backward and one optimizer step (a non-finite loss trips the guard before anything moves)."""
        if not torch.isfinite(loss):
            guard.check(loss)
        if not loss.requires_grad:
            raise InvalidInputError(f"{type(self).__name__}'s loss does not depend on any trainable parameter "
                                    "(is the model frozen, or does a loss detach its output?)")
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], self.max_grad_norm)
        self.before_step(model)
        opt.step()
        self.after_step(model)

    def prepare(self, model: nn.Module, forget, retain) -> None:
        """Work before the first step (SalUn's mask)."""

    def forget_batches(self, forget, epoch: int):
        return forget

    def end_epoch(self, model, epoch, retain, opt, guard, log) -> None:
        """Work after each epoch's forget pass (SCRUB's min-steps)."""


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidInputError(f"{name} must be positive, got {value!r}")


def _nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidInputError(f"{name} must be a number >= 0, got {value!r}")


def _cycle(loader):
    """Batches of ``loader`` without end, a fresh pass (and shuffle) each time round."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise InvalidInputError("retain data yielded no batches")
