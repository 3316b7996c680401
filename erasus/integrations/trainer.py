"""Erasus's unlearning inside a Hugging Face ``transformers.Trainer`` loop.

* :class:`ForgetRetainDataset` pairs every forget sample with a random retain sample (OpenUnlearning's batch
  format, ``{"forget": batch, "retain": batch}``).
* :class:`UnlearningTrainer` is a ``Trainer`` whose loss is an Erasus gradient strategy's (GA, GradDiff, NPO,
  SimNPO, RMU, SalUn, fine-tuning, with any retain anchor), on a full model or a peft LoRA model (then only the
  adapter trains and the strategy's frozen reference is the same model with the adapter disabled: no copy).
* :class:`ErasusGuardCallback` (on by default in ``UnlearningTrainer``, usable in any ``Trainer``) stops training
  on a NaN/inf loss or weight, or exploding weights, and puts the weights back to the last good step bit for bit.
* :class:`ForgetMetricsCallback` logs forget / retain (/ holdout) answer NLL through the Trainer's log and can stop
  training at the first evaluation whose forget NLL reaches a target (MUSE's checkpoint rule: the retrained
  model's value).

The optimisation itself is the Trainer's: ``TrainingArguments`` give the learning rate, optimizer, schedule,
weight decay, gradient clipping, accumulation and logging. Example::

    from transformers import TrainingArguments
    from erasus.data import lm_scenario
    from erasus.integrations import ForgetMetricsCallback, ForgetRetainDataset, UnlearningTrainer
    from erasus.metrics import answer_nll

    s = lm_scenario("gpt2", preset="test")
    args = TrainingArguments(output_dir="out", max_steps=50, learning_rate=1e-3, per_device_train_batch_size=8,
                             save_strategy="no", report_to=[], use_cpu=True)
    target = float(answer_nll(s["retrained"], s["forget"]).mean())     # MUSE's rule: stop at the retrained value
    trainer = UnlearningTrainer(s["original"], args, train_dataset=ForgetRetainDataset(s["forget"], s["retain"]),
                                strategy="npo", callbacks=[ForgetMetricsCallback(s["forget"], s["retain"],
                                                                                 target=target, every=1)])
    trainer.train()             # changes s["original"] in place
    trainer.guard_events        # [] unless the guard stopped the run
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from transformers import Trainer, TrainerCallback, TrainingArguments

from erasus.errors import EmptyInputError, InvalidInputError
from erasus.metrics import lm as lm_metrics
from erasus.strategies import STRATEGIES, GradientStrategy, GuardTripped, Strategy, TrainingGuard, get_strategy
from erasus.strategies.guard import agree_on
from erasus.tasks import infer_task
from erasus.tasks.base import root_dataset

# Strategy settings that a Trainer owns: the strategy's value would be silently ignored, so it is refused.
TRAINER_OWNED_PARAMS = {"lr": "learning_rate", "optimizer": "optim", "weight_decay": "weight_decay",
                        "max_grad_norm": "max_grad_norm"}
# GradientStrategy methods that, when a strategy overrides them, mean it runs a loop of its own (SCRUB's
# alternating max/min passes) rather than one loss per forget batch.
_OWN_LOOP_METHODS = ("forget_batches", "end_epoch", "step")


# ------------------------------------------------------------------------------------------------------- data
class ForgetRetainDataset(Dataset):
    """The forget set, each sample paired with a retain sample: OpenUnlearning's ``ForgetRetainDataset``.

    The forget set is the anchor: ``len(self) == len(forget)`` and item ``i`` is
    ``{"forget": forget[i], "retain": retain[j_i]}`` with ``j_i`` drawn uniformly at random (with replacement)
    from the retain set, once, from ``seed``: the same seed gives the same pairs. Without ``retain`` (gradient
    ascent needs none) items hold ``"forget"`` only.

    ``collate(items)`` gives ``{"forget": batch, "retain": batch}``, each half collated by its own dataset's
    ``collate`` method (``erasus.data.QADataset.collate`` pads token dicts), or by torch's ``default_collate``
    when the dataset has none (a ``TensorDataset`` of a classifier's ``(inputs, labels)``). Subsets are seen
    through to the dataset that holds ``collate``.

    Raises:
        EmptyInputError: ``forget`` or ``retain`` is empty. InvalidInputError: one is not a sized Dataset, or
            ``seed`` is not an integer.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from erasus.integrations import ForgetRetainDataset
        >>> pairs = ForgetRetainDataset(TensorDataset(torch.arange(3)), TensorDataset(torch.arange(10, 15)), seed=0)
        >>> len(pairs), pairs.retain_indices
        (3, [4, 4, 3])
        >>> batch = pairs.collate([pairs[0], pairs[1]])
        >>> batch["forget"][0].tolist(), batch["retain"][0].tolist()
        ([0, 1], [14, 14])
    """

    def __init__(self, forget: Dataset, retain: Dataset | None = None, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidInputError(f"seed must be an integer, got {seed!r}")
        self.forget = _sized_dataset(forget, "forget")
        self.retain = _sized_dataset(retain, "retain") if retain is not None else None
        self.seed = seed
        self.retain_indices: list[int] | None = None
        if self.retain is not None:
            draw = torch.Generator().manual_seed(seed)
            self.retain_indices = torch.randint(len(self.retain), (len(self.forget),), generator=draw).tolist()
        self.forget_collate = _collate_of(self.forget)
        self.retain_collate = _collate_of(self.retain) if self.retain is not None else None

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} forget samples")
        item = {"forget": self.forget[i]}
        if self.retain is not None:
            item["retain"] = self.retain[self.retain_indices[i]]
        return item

    def collate(self, items: list[dict]) -> dict:
        """``{"forget": ..., "retain": ...}`` batches of ``items`` (as ``DataLoader(ds, collate_fn=ds.collate)``)."""
        if not items:
            raise EmptyInputError("items must hold at least one item to collate")
        batch = {"forget": self.forget_collate([item["forget"] for item in items])}
        if self.retain is not None:
            batch["retain"] = self.retain_collate([item["retain"] for item in items])
        return batch


def _sized_dataset(data, name: str) -> Dataset:
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) or isinstance(data, (str, bytes, Mapping)):
        raise InvalidInputError(f"{name} must be a Dataset with __len__ and __getitem__ (e.g. "
                                f"erasus.data.QADataset), got {type(data).__name__}")
    if len(data) == 0:
        raise EmptyInputError(f"{name} set is empty")
    return data


def _collate_of(dataset: Dataset):
    return getattr(root_dataset(dataset), "collate", None) or default_collate


# -------------------------------------------------------------------------------------------------- callbacks
class ErasusGuardCallback(TrainerCallback):
    """Erasus's stop-and-restore guard (:class:`erasus.strategies.TrainingGuard`) as a ``TrainerCallback``.

    After every optimizer step it checks the step's loss and the trainable weights. A NaN/inf loss or weight,
    or weights whose norm grew beyond ``max_norm_ratio`` times their norm at the start, **restore the model in
    place**: its trainable weights and buffers go back, bit for bit, to the last good snapshot (taken after
    every ``snapshot_every`` steps, and at the start), training stops (``control.should_training_stop``) and
    that step's checkpoint is skipped. ``self.events`` records each trip: ``{"global_step", "reason",
    "restored_to_global_step"}``; a ``RuntimeWarning`` says so too. The snapshot holds one copy of the
    trainable weights (for a LoRA model: the adapter only).

    The step's loss comes from :meth:`record_loss` (``UnlearningTrainer`` calls it) or, in a plain ``Trainer``,
    from ``output.loss`` of the model's training forwards (a forward hook set at train begin, removed at train
    end). When the model returns no loss (e.g. with a ``compute_loss_func``), only the weights are checked; a
    NaN loss then still shows as NaN weights after its step.

    Under more than one process (a Trainer under DDP or FSDP, ``args.world_size > 1``) every check gathers what each
    rank found (:func:`erasus.strategies.guard.agree_on`): one rank's NaN stops and restores every rank at the
    same step.

    Example (any Trainer): ``Trainer(model, args, train_dataset=ds, callbacks=[ErasusGuardCallback()])``.
    """

    def __init__(self, snapshot_every: int = 1, max_norm_ratio: float = 100.0):
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise InvalidInputError(f"snapshot_every must be a positive integer, got {snapshot_every!r}")
        if isinstance(max_norm_ratio, bool) or not isinstance(max_norm_ratio, (int, float)) or not max_norm_ratio > 1:
            raise InvalidInputError(f"max_norm_ratio must be a number > 1, got {max_norm_ratio!r}")
        self.snapshot_every, self.max_norm_ratio = snapshot_every, float(max_norm_ratio)
        self.events: list[dict] = []
        self._guard: TrainingGuard | None = None
        self._losses: list[torch.Tensor] = []
        self._hook = None

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Count ``loss`` towards the current step's (micro-batch losses of one step are averaged)."""
        self._losses.append(loss.detach().float().mean() if isinstance(loss, torch.Tensor)
                            else torch.tensor(float(loss)))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._guard = TrainingGuard(model, snapshot_every=self.snapshot_every, max_norm_ratio=self.max_norm_ratio,
                                    agree=_agree_across_processes(args))
        self._losses.clear()
        self._remove_hook()
        self._hook = model.register_forward_hook(self._capture_model_loss)

    def _capture_model_loss(self, module: nn.Module, _inputs, output) -> None:
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and module.training and torch.is_grad_enabled():
            self.record_loss(loss)

    def on_step_end(self, args, state, control, **kwargs):
        # 0.0 when no loss was seen this step: nothing to check but the weights.
        loss = torch.stack([x.cpu() for x in self._losses]).mean() if self._losses else 0.0
        self._losses.clear()
        try:
            self._guard.check(loss)
        except GuardTripped:
            event = self._guard.events[-1]
            steps_back = event["step"] - event["restored_to_step"]
            self.events.append({"global_step": state.global_step, "reason": event["reason"],
                                "restored_to_global_step": state.global_step - steps_back})
            control.should_training_stop = True
            control.should_save = False
            warnings.warn(f"erasus guard: {event['reason']} at step {state.global_step}; weights restored to step "
                          f"{state.global_step - steps_back} and training stopped", RuntimeWarning, stacklevel=2)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _agree_across_processes(args):
    """The guard's ``agree`` over the Trainer's processes (``args.world_size`` > 1: DDP, FSDP, ...), so that one
    rank's NaN stops and restores every rank at the same step instead of leaving the others waiting in the next
    gradient all-reduce; None in one process. The Trainer runs on accelerate, whose ``gather`` reads the same
    process group; a callback is not given the Trainer's Accelerator, hence this stand-in for it."""
    if getattr(args, "world_size", 1) <= 1:
        return None
    from types import SimpleNamespace

    from accelerate.utils import gather

    return agree_on(SimpleNamespace(gather=gather, device=args.device))


class ForgetMetricsCallback(TrainerCallback):
    """Forgetting measured during training: mean answer NLL (:func:`erasus.metrics.lm.answer_nll`) on the forget,
    retain and holdout sets, logged as ``forget_nll``, ``retain_nll``, ``holdout_nll`` (with ``qa_accuracy``
    also ``forget_qa_acc`` ... from greedy generation, one generate pass per set: costly on large sets).

    Args:
        forget, retain, holdout: QA datasets (``erasus.data.QADataset`` or Subsets of one).
        target: a forget-NLL value, e.g. the retrained model's (MUSE's checkpoint rule: keep the first checkpoint
            at or past the retrained model's value). Training stops at the first evaluation whose forget NLL is
            ``>= target``; ``self.stopped_at`` records ``{"step", "epoch", "forget_nll"}``, and when the Trainer
            saves checkpoints (``save_strategy`` not ``"no"``) that step's checkpoint is saved.
        every: ``"epoch"`` (at each epoch's end) or a number of optimizer steps.
        batch_size: the metrics' batch size.

    Values go to ``self.history`` (one dict per evaluation, with ``step`` and ``epoch``) and to the Trainer's log:
    ``trainer.log`` (every ``report_to`` integration sees them) once the callback is attached to its trainer
    (``UnlearningTrainer`` attaches it; in a plain Trainer call ``callback.attach(trainer)``); unattached, they
    are appended to ``trainer.state.log_history`` only. The model is evaluated in eval mode under ``no_grad`` and
    not changed.
    """

    def __init__(self, forget: Dataset, retain: Dataset, holdout: Dataset | None = None, *,
                 target: float | None = None, every: int | str = "epoch", qa_accuracy: bool = False,
                 batch_size: int = 32):
        self.sets = {"forget": _qa_dataset(forget, "forget"), "retain": _qa_dataset(retain, "retain")}
        if holdout is not None:
            self.sets["holdout"] = _qa_dataset(holdout, "holdout")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not math.isfinite(target)):
            raise InvalidInputError(f"target must be a finite forget-NLL value or None, got {target!r}")
        if every != "epoch" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise InvalidInputError(f"every must be 'epoch' or a positive number of steps, got {every!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.target = None if target is None else float(target)
        self.every, self.qa_accuracy, self.batch_size = every, bool(qa_accuracy), batch_size
        self.history: list[dict] = []
        self.stopped_at: dict | None = None
        self._trainer: Trainer | None = None

    def attach(self, trainer: Trainer) -> "ForgetMetricsCallback":
        """Log through ``trainer.log`` from now on. Returns the callback."""
        self._trainer = trainer
        return self

    def measure(self, model: nn.Module) -> dict[str, float]:
        """The metrics of ``model`` now (the model is not changed)."""
        metrics = {f"{name}_nll": float(lm_metrics.answer_nll(model, ds, self.batch_size).mean())
                   for name, ds in self.sets.items()}
        if self.qa_accuracy:
            for name, ds in self.sets.items():
                metrics[f"{name}_qa_acc"] = lm_metrics.qa_accuracy(model, ds, self.batch_size)
        return metrics

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every != "epoch" and state.global_step % self.every == 0:
            self._evaluate(args, state, control, model)
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every == "epoch":
            self._evaluate(args, state, control, model)
        return control

    def _evaluate(self, args, state, control, model) -> None:
        metrics = self.measure(model)
        self.history.append({"step": state.global_step, "epoch": state.epoch, **metrics})
        if self._trainer is not None:
            # Trainer.log clears control.should_log: keep the Trainer's own pending log (the step's loss).
            pending = control.should_log
            self._trainer.log(dict(metrics))
            control.should_log = pending
        else:
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        if self.target is not None and self.stopped_at is None and metrics["forget_nll"] >= self.target:
            self.stopped_at = {"step": state.global_step, "epoch": state.epoch, "forget_nll": metrics["forget_nll"]}
            control.should_training_stop = True
            if args.save_strategy != "no":
                control.should_save = True


def _qa_dataset(data, name: str) -> Dataset:
    data = _sized_dataset(data, name)
    if getattr(root_dataset(data), "collate", None) is None:
        raise InvalidInputError(f"{name} must be a QA dataset with a collate method (e.g. erasus.data.QADataset) "
                                f"or a Subset of one, got {type(root_dataset(data)).__name__}")
    return data


class _StrategyStepHooks(TrainerCallback):
    """A strategy's hooks around the optimizer step: ``before_step`` after the gradients are clipped, before the
    step (SalUn masks gradients there), ``after_step`` right after it (SalUn puts masked weights back)."""

    def __init__(self, strategy: GradientStrategy):
        self.strategy = strategy

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.strategy.before_step(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.strategy.after_step(model)


# ---------------------------------------------------------------------------------------------------- trainer
class UnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is an Erasus gradient strategy's.

    Args:
        model: a causal LM (``AutoModelForCausalLM``), peft-wrapped or not, or a classifier. **Changed in place**
            by ``train()`` (for a peft model: its adapter only).
        args: ``TrainingArguments``; they rule the optimisation (``learning_rate``, ``optim``, ``weight_decay``,
            ``max_grad_norm``, schedule, accumulation, logging, saving). ``remove_unused_columns`` is turned off on
            a copy (the Trainer's column filter would drop the ``forget`` / ``retain`` halves).
        train_dataset: a :class:`ForgetRetainDataset`.
        data_collator: defaults to ``train_dataset.collate``.
        strategy: a registered gradient strategy's name (``"ga"``, ``"graddiff"``, ``"npo"``, ``"simnpo"``,
            ``"rmu"``, ``"salun"``, ``"finetune"``) or a ``GradientStrategy``. Training-free strategies (SSD,
            Fisher forgetting) and strategies with a loop of their own (SCRUB) are refused: run those with
            ``strategy.unlearn`` or ``ErasusUnlearner``.
        strategy_params: keyword arguments of the named strategy (e.g. ``{"beta": 0.1}``); the optimizer settings
            ``lr``, ``optimizer``, ``weight_decay`` and ``max_grad_norm`` belong to ``TrainingArguments`` and are
            refused here. A Strategy instance's own optimizer settings are not used.
        guard: ``True`` (an :class:`ErasusGuardCallback` with its defaults), an ``ErasusGuardCallback``, or
            ``False``.
        **kwargs: any other ``Trainer`` argument (``callbacks``, ``optimizers``, ``processing_class`` ...).
            ``eval_dataset`` is refused: Trainer evaluation does not apply to forget/retain pairs; measure
            forgetting with :class:`ForgetMetricsCallback` (attached to this trainer automatically).

    Each ``train()`` call is one unlearning run: before the Trainer's loop it binds the strategy to the model's
    task, makes the strategy's frozen reference if it needs one (for a peft model the same model under
    ``disable_adapter()``, no copy; otherwise a frozen deep copy, made once and kept for later calls) and runs
    ``strategy.prepare`` (SalUn's saliency mask, RMU's layer freezing) on the forget and retain sets; the
    ``requires_grad`` flags are put back afterwards. The strategy's ``before_step`` / ``after_step`` run around
    every optimizer step. ``guard_events`` lists the guard's trips.

    Raises:
        InvalidInputError (an ErasusError): a training-free or own-loop strategy, optimizer settings in
            ``strategy_params``, a ``train_dataset`` that is not a ForgetRetainDataset, retain data missing for a
            strategy that needs it, forget and retain sharing samples, data the model cannot take (sequences
            longer than its context, token ids outside its vocabulary), a model with nothing to train, an
            ``eval_dataset``.
    """

    # compute_loss returns a mean over the batch's samples: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None,
                 data_collator=None, train_dataset: ForgetRetainDataset | None = None, *,
                 strategy: str | Strategy, strategy_params: dict | None = None,
                 guard: bool | ErasusGuardCallback = True, **kwargs):
        if not isinstance(model, nn.Module):
            raise InvalidInputError("model must be a torch nn.Module (model_init is not supported: the strategy's "
                                    f"reference and checks need the model before training), got {type(model).__name__}")
        self.strategy = _gradient_strategy(strategy, strategy_params)
        _check_train_dataset(train_dataset, self.strategy)
        _check_model_and_data(model, train_dataset, self.strategy)
        if kwargs.get("eval_dataset") is not None or (args is not None and args.eval_strategy != "no"):
            raise InvalidInputError("eval_dataset / eval_strategy: Trainer evaluation does not apply to forget/retain "
                                    "pairs; measure forgetting with ForgetMetricsCallback(forget, retain, holdout)")
        self.guard_callback = _guard_callback(guard)
        callbacks = [_StrategyStepHooks(self.strategy)]
        if self.guard_callback is not None:
            callbacks.append(self.guard_callback)  # before the user's callbacks: they see the restored weights
        callbacks += list(kwargs.pop("callbacks", None) or [])
        super().__init__(model=model, args=_unlearning_args(args), data_collator=data_collator or train_dataset.collate,
                         train_dataset=train_dataset, callbacks=callbacks, **kwargs)
        for callback in self.callback_handler.callbacks:
            _attach(callback, self)

    @property
    def guard_events(self) -> list[dict]:
        """The guard's trips (``ErasusGuardCallback.events``); empty without a guard."""
        return [] if self.guard_callback is None else self.guard_callback.events

    def add_callback(self, callback) -> None:
        """``Trainer.add_callback``; a ForgetMetricsCallback is attached to this trainer (logs via its log)."""
        super().add_callback(callback)
        for cb in self.callback_handler.callbacks:
            _attach(cb, self)

    def train(self, *args, **kwargs):
        """The Trainer's ``train`` as one unlearning run (see the class docstring). Changes the model in place."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self._start_run(self.model)
            return super().train(*args, **kwargs)
        finally:
            for p, flag in flags:  # prepare may freeze parameters for the run (RMU's train_layers)
                p.requires_grad_(flag)

    def _start_run(self, model: nn.Module) -> None:
        strategy = self.strategy
        strategy.bind(model, new_run=True)  # one run, one weight anchor: this model as it is now
        if strategy.needs_reference:
            strategy.reference(model)  # made now, before any step: the model as it was before unlearning
        data = self.train_dataset
        batch_size = self.args.per_device_train_batch_size
        forget = DataLoader(data.forget, batch_size=batch_size, collate_fn=data.forget_collate)
        retain = (DataLoader(data.retain, batch_size=batch_size, collate_fn=data.retain_collate)
                  if data.retain is not None else None)
        strategy.prepare(model, forget, retain)
        if not any(p.requires_grad for p in model.parameters()):
            raise InvalidInputError("the model has no trainable parameters (every requires_grad is False)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The strategy's loss (``strategy.loss(model, forget_batch, retain_batch)``) on the batch's halves.

        ``num_items_in_batch`` is not used: strategy losses are means over the batch's samples (NPO and SimNPO
        compare whole-sequence log-probabilities, RMU hidden states), not sums over label tokens, so the Trainer
        averages them over accumulation steps (``loss_is_scaled_for_ga = False``). With ``return_outputs`` the
        outputs are ``None``."""
        forget_batch, retain_batch = self._halves(inputs)
        loss = self.strategy.loss(model, forget_batch, retain_batch)
        if model.training and torch.is_grad_enabled():
            if not loss.requires_grad:
                raise InvalidInputError(f"{type(self.strategy).__name__}'s loss does not depend on any trainable "
                                        "parameter (is the model frozen, or does a loss detach its output?)")
            if self.guard_callback is not None:
                self.guard_callback.record_loss(loss)
        return (loss, None) if return_outputs else loss

    def _halves(self, inputs):
        if not isinstance(inputs, Mapping) or "forget" not in inputs:
            raise InvalidInputError("inputs must be a {'forget': batch, 'retain': batch} dict (ForgetRetainDataset"
                                    f".collate gives one), got {type(inputs).__name__}"
                                    + (f" with keys {sorted(inputs)}" if isinstance(inputs, Mapping) else ""))
        retain = inputs.get("retain")
        if retain is None and self.strategy.needs_retain:
            raise InvalidInputError(f"inputs: {type(self.strategy).__name__} needs a 'retain' half in every batch")
        return inputs["forget"], retain

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate summed over the forget and retain halves (reference forwards not counted)."""
        return sum(super(UnlearningTrainer, self).floating_point_ops(half) for half in inputs.values()
                   if isinstance(half, Mapping))

    def evaluate(self, *args, **kwargs):
        raise InvalidInputError("UnlearningTrainer.evaluate: Trainer evaluation does not apply to forget/retain "
                                "pairs; measure forgetting with ForgetMetricsCallback or erasus.metrics.lm")


def _gradient_strategy(strategy, params) -> GradientStrategy:
    if params is not None and not isinstance(params, Mapping):
        raise InvalidInputError(f"strategy_params must be a dict or None, got {type(params).__name__}")
    if isinstance(strategy, str):
        owned = [k for k in (params or {}) if k in TRAINER_OWNED_PARAMS]
        if owned:
            raise InvalidInputError(f"strategy_params: {owned[0]!r} is the Trainer's in a Trainer run; set "
                                    f"TrainingArguments.{TRAINER_OWNED_PARAMS[owned[0]]} instead")
        strategy = get_strategy(strategy, **dict(params or {}))
    elif isinstance(strategy, Strategy):
        if params:
            raise InvalidInputError("strategy_params are for a strategy given by name; a Strategy instance "
                                    "already holds its parameters")
    else:
        raise InvalidInputError(f"strategy must be a registered name {sorted(STRATEGIES)} or a Strategy, got "
                                f"{type(strategy).__name__}")
    name = getattr(strategy, "name", type(strategy).__name__)
    if strategy.training_free:
        raise InvalidInputError(f"strategy {name!r} is training-free (one edit of the weights, no training steps): "
                                "run it with strategy.unlearn(model, forget, retain) or ErasusUnlearner, not in a "
                                "Trainer")
    if not isinstance(strategy, GradientStrategy):
        raise InvalidInputError(f"strategy {name!r} is not a gradient strategy; a Trainer runs only those (they "
                                "expose loss(model, forget_batch, retain_batch))")
    own_loop = [m for m in _OWN_LOOP_METHODS if getattr(type(strategy), m) is not getattr(GradientStrategy, m)]
    if own_loop:
        raise InvalidInputError(f"strategy {name!r} runs a loop of its own ({own_loop[0]}; e.g. SCRUB's alternating "
                                "max/min passes) that one loss per Trainer step cannot reproduce: run it with "
                                "strategy.unlearn or ErasusUnlearner")
    if strategy.max_grad_norm is not None:
        raise InvalidInputError(f"strategy {name!r} has max_grad_norm={strategy.max_grad_norm}: in a Trainer set "
                                "TrainingArguments.max_grad_norm instead")
    return strategy


def _check_train_dataset(train_dataset, strategy: GradientStrategy) -> None:
    if not isinstance(train_dataset, ForgetRetainDataset):
        raise InvalidInputError(f"train_dataset must be a ForgetRetainDataset(forget, retain), got "
                                f"{type(train_dataset).__name__}")
    if strategy.needs_retain and train_dataset.retain is None:
        raise InvalidInputError(f"train_dataset: {type(strategy).__name__} needs retain data; build it as "
                                "ForgetRetainDataset(forget, retain)")


def _check_model_and_data(model: nn.Module, data: ForgetRetainDataset, strategy: GradientStrategy) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidInputError("model has no trainable parameters (every requires_grad is False)")
    # The task only: binding (the weight anchor's copy) waits for train(), after the Trainer placed the model.
    task = infer_task(model)
    strategy.check_task(task)
    task.check_model(model, {"forget": data.forget, "retain": data.retain})
    if data.retain is not None:
        task.check_disjoint(data.forget, data.retain)


def _guard_callback(guard) -> ErasusGuardCallback | None:
    if isinstance(guard, ErasusGuardCallback):
        return guard
    if isinstance(guard, bool):
        return ErasusGuardCallback() if guard else None
    raise InvalidInputError(f"guard must be True, False or an ErasusGuardCallback, got {type(guard).__name__}")


def _unlearning_args(args: TrainingArguments | None) -> TrainingArguments:
    if args is None:
        args = TrainingArguments(output_dir="tmp_trainer")  # the Trainer's own default
    elif not isinstance(args, TrainingArguments):
        raise InvalidInputError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    if args.remove_unused_columns:
        # The Trainer keeps only the columns named in model.forward's signature: it would drop both halves.
        args = copy.copy(args)
        args.remove_unused_columns = False
    return args


def _attach(callback, trainer: Trainer) -> None:
    if isinstance(callback, ForgetMetricsCallback) and callback._trainer is None:
        callback.attach(trainer)
