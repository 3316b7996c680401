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
import contextlib
import copy
import functools
import operator
import weakref
from typing import Callable, ClassVar

import torch
from torch import nn

from erasus import registry
from erasus._device import model_device, to_device
from erasus.errors import InvalidInputError
from erasus.losses import weight_anchor_loss
from erasus.strategies.guard import GuardTripped, TrainingGuard, agree_on, is_sharded, local_part
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

    #: whether ``unlearn(accelerator=...)`` may run the strategy data-parallel (see :meth:`runs_data_parallel`);
    #: a class opts in explicitly
    data_parallel: ClassVar[bool] = False
    #: why a strategy that does not opt in runs in one process only (the refusal's message)
    serial_reason: ClassVar[str] = (
        "only strategies whose loss is a mean of per-sample terms and that keep no per-rank state (built from the "
        "data or the gradients, like SalUn's saliency mask) give every rank's replica the one-process step")

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
        self._initial: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the weight anchor: (parameter, start)
        self._anchor_model: weakref.ref | None = None  # the model the anchor was taken from
        self._accelerator = None  # set for the length of a data-parallel unlearn()

    @classmethod
    def runs_data_parallel(cls) -> bool:
        """Whether the strategy may run under ``accelerate`` (``unlearn(accelerator=...)``): only when its class
        sets ``data_parallel = True``. Each rank sees only its share of every global batch and DDP averages the
        ranks' gradients, which equals the one-process gradient exactly when the loss is a mean of per-sample
        terms and no state is built from a rank's data or gradients. A loss that couples the samples of a batch
        (CLIP's in-batch negatives), or per-rank state (SalUn's saliency mask, dual_prune's scores, ELM's
        generated fluency data), would make each rank optimise something else: such a strategy runs in one
        process, and :attr:`serial_reason` says why."""
        return cls.data_parallel is True

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
             original: nn.Module | None = None, *, new_run: bool = False) -> None:
        """Set the task (inferred from the model unless given) and the reference for the next steps. The weight
        anchor (``anchor="weights"``) is taken from ``model`` as it is now when there is none yet, with
        ``new_run`` (each ``unlearn`` and each Trainer run starts one), or when ``model`` is neither the model it
        was taken from nor a wrapper of it (DDP's ``.module``, torch.compile's ``._orig_mod``): a strategy reused on
        another model anchors that model, not the first one."""
        if task is not None or self._task is None:
            self._task = infer_task(model, task)
            self.check_task(self._task)
        if reference is not None:
            self._reference = reference
        elif original is not None:
            self._reference = Reference.of(original)
        if self.anchor == "weights" and (new_run or not self._anchors(model)):
            self._initial = _anchored(model)
            self._anchor_model = weakref.ref(model)

    def _anchors(self, model: nn.Module) -> bool:
        """Whether the weight anchor was taken from ``model`` (or the model it wraps)."""
        held = self._anchor_model() if self._initial is not None and self._anchor_model is not None else None
        return held is not None and any(m is held for m in (model, getattr(model, "module", None),
                                                             getattr(model, "_orig_mod", None)))

    def loss(self, model: nn.Module, forget_batch, retain_batch=None, original: nn.Module | None = None
             ) -> torch.Tensor:
        """Scalar loss of one step: the method's loss plus the retain anchor, if any. ``original`` is the
        frozen model before unlearning (NPO, SCRUB, KL terms and the anchors use it); it is kept between calls,
        and made from ``model`` at the first call when not given. The weight anchor holds the trainable parameters
        of the model it was taken from and their values then (see :meth:`bind`)."""
        self.bind(model, original=original)
        total = self.method_loss(model, forget_batch, retain_batch)
        if self.anchor == "outputs" and retain_batch is not None:
            ref = self.reference_outputs(model, retain_batch)
            total = total + self.anchor_weight * self.task.output_kl(self.outputs(model, retain_batch), ref,
                                                                     retain_batch).mean()
        elif self.anchor == "weights":
            total = total + self.anchor_weight * _weight_anchor([(p, start) for p, start in self._initial
                                                                 if p.requires_grad])
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
                guard=None, task=None, reference=None, accelerator=None):
        """As :meth:`Strategy.unlearn`. ``accelerator`` (an ``accelerate.Accelerator``; None: one process) runs
        the loop data-parallel: ``model`` is the plain model, passed with a fresh optimizer through
        ``accelerator.prepare`` (together, as FSDP2 requires); ``forget`` / ``retain`` are loaders already
        prepared by the same accelerator (each rank draws its shard of every global batch); backward goes through
        ``accelerator.backward``, so the replicas step on the gradient averaged over the ranks. The reference
        reads the plain model, the guard (``guard`` must be built with ``agree=agree_on(accelerator)`` under more
        than one process, else it is refused; one is made so when not given) stops and restores every rank
        together, ``on_step`` receives the loss averaged over the ranks, and ``on_step`` / ``on_epoch`` run with
        the model's own forward (not mixed precision's autocast wrapper). On return the accelerator holds what it
        held before (:func:`released`) and the model has its own forward back. Changes ``model`` in place."""
        if self.needs_retain and retain is None:
            raise InvalidInputError(f"{type(self).__name__} needs retain data")
        if accelerator is not None:
            _check_accelerator(self, accelerator, guard)
        self.bind(model, task if task is not None else infer_task(model), reference, original, new_run=True)
        if self.needs_reference:
            self.reference(model)  # made now, before any step, if the caller gave none
        if not any(p.requires_grad for p in model.parameters()):
            raise InvalidInputError("the model has no trainable parameters (every requires_grad is False)")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        self._accelerator = accelerator
        self._forward = _ForwardPatch(model)
        scope = released(accelerator) if accelerator is not None else contextlib.nullcontext()
        try:
            with scope:
                return self._run(model, forget, retain, epochs, on_step, on_epoch, guard)
        finally:
            self._forward.undo()  # accelerate's mixed-precision forward leaves with the prepared model
            self._accelerator = None
            for p, flag in flags:  # a strategy may freeze parameters for its run (RMU's train_layers)
                p.requires_grad_(flag)
            model.train(was_training)

    def _run(self, model, forget, retain, epochs, on_step, on_epoch, guard):
        self.prepare(model, forget, retain)
        opt = self.make_optimizer([p for p in model.parameters() if p.requires_grad])
        accelerator = self._accelerator
        guard = guard or TrainingGuard(model, agree=agree_on(accelerator) if accelerator is not None else None)
        trained, opt = self._data_parallel(model, opt, guard)  # (model, opt) as they are in one process
        retain_iter = _cycle(retain) if retain is not None else None
        device = model_device(model)
        trained.train()
        log = {"steps": 0, "stopped": None}
        try:
            for epoch in range(epochs):
                for forget_batch in self.forget_batches(forget, epoch):
                    forget_batch = to_device(forget_batch, device)
                    retain_batch = to_device(next(retain_iter), device) if retain_iter is not None else None
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss(trained, forget_batch, retain_batch)
                    logged = self.step(trained, loss, opt, guard)
                    log["steps"] += 1
                    guard.check(loss.detach())
                    if on_step is not None:
                        with self._forward.unpatched():  # the caller's evaluations: the forward of one process
                            on_step({"epoch": epoch, "step": log["steps"], "loss": logged})
                self.end_epoch(trained, epoch, retain, opt, guard, log)
                if on_epoch is not None:
                    with self._forward.unpatched():
                        on_epoch(epoch)
        except GuardTripped as exc:
            log["stopped"] = str(exc)
        finally:
            if retain_iter is not None:
                retain_iter.close()
        return log

    def _data_parallel(self, model: nn.Module, opt: torch.optim.Optimizer, guard: TrainingGuard):
        """Under an accelerator: the model and its optimizer as ``accelerator.prepare`` returns them (DDP wraps
        the model; FSDP2 shards its parameters in place, so the guard and the weight anchor take them again)."""
        accelerator = self._accelerator
        if accelerator is None:
            return model, opt
        trained, opt = accelerator.prepare(model, opt)
        self._forward.take()
        guard.track(model)
        if self.anchor == "weights":
            self.bind(trained, new_run=True)  # the anchor's tensors as the prepared model holds them
        return trained, opt

    def step(self, model: nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer, guard: TrainingGuard
             ) -> float:
        """Backward and one optimizer step (a non-finite loss trips the guard before anything moves). Returns the
        loss to log: this batch's, averaged over the ranks under an accelerator."""
        value = guard.check_loss(loss)
        if not loss.requires_grad:
            raise InvalidInputError(f"{type(self).__name__}'s loss does not depend on any trainable parameter "
                                    "(is the model frozen, or does a loss detach its output?)")
        accelerator = self._accelerator
        if accelerator is None:
            loss.backward()
        else:
            accelerator.backward(loss)  # DDP averages the gradients over the ranks during backward
        if self.max_grad_norm is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            if accelerator is None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            else:  # the norm of the whole gradient, over every shard under FSDP
                accelerator.clip_grad_norm_(params, self.max_grad_norm)
        self.before_step(model)
        opt.step()
        self.after_step(model)
        return value

    def prepare(self, model: nn.Module, forget, retain) -> None:
        """Work before the first step (SalUn's mask)."""

    def forget_batches(self, forget, epoch: int):
        return forget

    def end_epoch(self, model, epoch, retain, opt, guard, log) -> None:
        """Work after each epoch's forget pass (SCRUB's min-steps)."""


def _check_accelerator(strategy: GradientStrategy, accelerator, guard: TrainingGuard | None = None) -> None:
    """Refuse, before any work, a strategy, a guard or an accelerator setting the data-parallel loop cannot
    honour."""
    name = getattr(strategy, "name", type(strategy).__name__)
    if not strategy.runs_data_parallel():
        raise InvalidInputError(f"strategy {name!r} does not run data-parallel (accelerator=): "
                                f"{strategy.serial_reason}; run it in one process (accelerator=None)")
    steps = getattr(accelerator, "gradient_accumulation_steps", 1)
    if steps != 1:
        raise InvalidInputError(f"accelerator: gradient_accumulation_steps is {steps}, but the strategy steps on "
                                "every global batch; set it to 1 and choose the batch size instead")
    if getattr(accelerator, "num_processes", 1) > 1 and guard is not None and guard.agree is None:
        raise InvalidInputError("guard: under more than one process the guard must agree across the ranks (one "
                                "rank's NaN would stop that rank only, and the others would wait for it forever); "
                                "build it with TrainingGuard(model, agree=agree_on(accelerator)), or pass none")
    kind = getattr(getattr(accelerator, "distributed_type", None), "name", None)
    if kind == "FSDP" and getattr(accelerator, "mixed_precision", "no") == "fp16" and \
            strategy.max_grad_norm is not None:
        # accelerate's FSDP clip_grad_norm_ unscales the fp16 gradients, then falls back to unscaling them again
        # when the parameters are not one prepared model's full list (a LoRA adapter, a frozen part), which the
        # GradScaler refuses: clipping is not reliable there
        raise InvalidInputError("max_grad_norm under FSDP with mixed_precision fp16: accelerate may unscale the "
                                "gradients twice when clipping a subset of the parameters; use bf16, or "
                                "max_grad_norm=None")


def _anchored(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The weight anchor's pairs: each trainable parameter of ``model`` and a copy of its value now. The parameters
    are held themselves, not looked up by name at each step: after a forward FSDP2 leaves unsharded stand-ins in
    some modules (the root's, accelerate's embedding and head unit) until the backward, while the sharded
    parameters that the optimizer steps stay the same objects; a DDP wrapper's names gain a ``module.`` prefix, its
    parameters stay the model's."""
    return [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]


def _weight_anchor(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum ||theta - theta_start||^2`` over ``pairs``. A sharded parameter (FSDP2's DTensor) is differentiated
    through this rank's shard only, so each element's gradient ``2 (theta - theta_start)`` arises once, on the rank
    that holds it, as in one process (FSDP's own averaging covers only what flows through the unsharded
    parameters); its value is the whole tensor's (one all-reduce), so every rank's loss is one process's."""
    plain = [(p, start) for p, start in pairs if not is_sharded(p)]
    sharded = [(p, start) for p, start in pairs if is_sharded(p)]
    total = weight_anchor_loss([p for p, _ in plain], [start for _, start in plain])
    if not sharded:
        return total
    local = weight_anchor_loss([local_part(p) for p, _ in sharded], [local_part(start) for _, start in sharded])
    with torch.no_grad():  # the sum over every shard: a DTensor sum is partial per rank until full_tensor()
        whole = functools.reduce(operator.add, [((p - start) ** 2).sum() for p, start in sharded]).full_tensor()
    return total + local + (whole.to(local.dtype) - local.detach())


@contextlib.contextmanager
def released(accelerator):
    """Leave ``accelerator`` holding what it held before the block: the models, optimizers and data loaders that
    ``accelerator.prepare`` registered inside it are dropped (by identity; what the caller prepared stays), so a
    run's DDP wrapper and optimizer state are not kept alive by the caller's Accelerator; and the gradient state's
    data-loader references are put back (a loop left early, or the endless retain cycle, never ends its loader,
    which would leave ``gradient_state.in_dataloader`` true and break the caller's ``gather_for_metrics``)."""
    held = {name: {id(o) for o in getattr(accelerator, name)} for name in _REGISTRIES}
    state = accelerator.gradient_state
    loaders = state.dataloader_references
    try:
        yield accelerator
    finally:
        for name, before in held.items():
            registry_list = getattr(accelerator, name)
            registry_list[:] = [o for o in registry_list if id(o) in before]
        state.dataloader_references = loaders


# where accelerate.Accelerator keeps what prepare() returned
_REGISTRIES = ("_models", "_optimizers", "_dataloaders")


class _ForwardPatch:
    """accelerate's mixed precision (``prepare`` with ``mixed_precision="bf16"``/``"fp16"``) sets ``forward`` and
    ``_original_forward`` as instance attributes of the model it prepares: an autocast wrapper that would outlive
    the run. This records them before ``prepare`` (:meth:`take` after it), puts the model's own back for the
    caller's evaluations (:meth:`unpatched`, so every metric of a run is computed in the same precision) and for
    good at the end (:meth:`undo`)."""

    NAMES = ("forward", "_original_forward")

    def __init__(self, model: nn.Module):
        self.model = model
        self.before = self._attributes()
        self.after = self.before

    def _attributes(self) -> dict:
        return {n: vars(self.model)[n] for n in self.NAMES if n in vars(self.model)}

    def _set(self, attributes: dict) -> None:
        for n in self.NAMES:
            if n in attributes:
                vars(self.model)[n] = attributes[n]
            else:
                vars(self.model).pop(n, None)

    def take(self) -> None:
        """Record the attributes as ``prepare`` left them."""
        self.after = self._attributes()

    @contextlib.contextmanager
    def unpatched(self):
        if self.after is self.before:  # nothing was prepared (one process): nothing to swap
            yield
            return
        self._set(self.before)
        try:
            yield
        finally:
            self._set(self.after)

    def undo(self) -> None:
        if self.after is not self.before:
            self._set(self.before)


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
