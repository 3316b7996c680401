"""ErasusUnlearner: score and select a coreset of the forget set, unlearn it with a strategy, evaluate, report.

One orchestrator for every model family: the task layer (``erasus.tasks``) knows the batch format, the loss and
the metrics of classifiers and causal LMs; the strategies, selectors, guard and reports are shared.
"""
from __future__ import annotations

import contextlib
import copy as copy_module
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from erasus.errors import InvalidInputError
from erasus.metrics import average_gap
from erasus.selectors import SELECTORS, get_selector
from erasus.settings import UnlearnerSettings, validate
from erasus.strategies import STRATEGIES, TrainingGuard, get_strategy
from erasus.strategies.guard import ModelState, agree_on
from erasus.tasks import Reference, Task, infer_task
from erasus.tasks.reference import is_peft_model


class TargetReached(Exception):
    """Raised from a callback to end the unlearning loop early: the forget metric reached its target."""


class ErasusUnlearner:
    """The one orchestrator: coreset selection -> strategy -> evaluation -> report, for any model family.

    Args:
        model: a classifier ``model(x) -> logits`` or a transformers causal LM (optionally a peft model).
            **Changed in place** unless ``copy=True``, which unlearns a deep copy and leaves ``model`` untouched.
            With ``lora``, peft injects an adapter into ``model`` (unless ``copy=True``) and only the adapter
            trains: the base weights never change, and ``fit`` returns the peft model.
        strategy: a registered strategy name (``erasus.strategies.STRATEGIES``) or a Strategy instance.
        selector: a registered selector name (``erasus.selectors.SELECTORS``), a Selector instance, or None
            for the full forget set.
        prune_ratio: the fraction of the forget set kept as the coreset (the forget set is pruned to this
            ratio): 0.2 unlearns on 20% of it. 1.0 (or ``selector=None``) uses all of it. Forgetting is
            always evaluated on the whole forget set and, separately, on the part left out.
        strategy_params / selector_params: keyword arguments for the registered classes.
        epochs, batch_size, seed: the unlearning loop's passes over the coreset, batch size and shuffling seed.
        retain_batch_size: the retain batch drawn with each forget batch (default: ``batch_size``); larger
            retain batches hold utility better at the same number of steps.
        task: the model family (``"classification"``, ``"causal_lm"`` or a Task); inferred from the model.
        lora: a ``peft.LoraConfig`` (or a dict of its fields): train only a LoRA adapter. The frozen reference
            that NPO, SCRUB and the KL terms compare with is then the same model with the adapter disabled,
            never a second copy. A model that already is a peft model trains its adapter without this.
        save_merged: with an adapter, also write the merged model (``merged/``) into ``out_dir``.
        stop_at_target: end unlearning at the first epoch (or ``eval_every`` steps) whose forget metric
            reaches the target: the retrained model's value when ``retrained`` is given, else the original
            model's value on ``test`` (the holdout set), which it never trained on.
        adaptive: the verified adaptive coreset. After unlearning the coreset, score EVERY forget sample with
            forward passes only (``task.per_sample_forget``) against the target; while the whole forget set has
            not reached it, add the samples that still look remembered (in the selector's order, at most
            ``adaptive_chunk`` per round; default: the first coreset's size) and unlearn the grown coreset
            again, for at most ``max_rounds`` rounds. Needs a target (``retrained`` or ``test`` in ``fit``).
            The report's ``adaptive`` entry lists the rounds, forget-side backward sample passes and forward
            scoring passes separately, and whether the whole set was verified.
        progress: show a tqdm bar of the unlearning steps.
        overwrite: allow ``out_dir`` to hold a previous run (refused otherwise, before any work).
        out_dir: if given, ``fit`` writes report.json, report.md, PNG plots and the unlearned weights there
            (``model.safetensors``; ``adapter/`` for a peft model), all as safetensors.
        accelerator: an ``accelerate.Accelerator`` (None: one process, as always). Every process of an
            ``accelerate launch`` / ``torchrun`` job then runs ``fit`` with the same model and data; the gradient
            strategies run data-parallel (DDP, or FSDP2), ``batch_size`` and ``retain_batch_size`` are the global
            batches (multiples of the number of processes), the guard and early stopping decide the same on every
            rank, only the main process writes ``out_dir``, and every rank gets the plain (unwrapped) model and a
            report (under FSDP2 the model stays sharded: every parameter a DTensor holding this rank's shard). The
            model is moved to ``accelerator.device`` first. Passed, not detected: the Accelerator holds the user's
            choices (mixed precision, FSDP plugin, batch splitting), and a job may use torch.distributed for
            something else. See :mod:`erasus.integrations.accelerated`.

    Every report has a ``verdict``: the whole forget set's metric before and after against the target (named:
    the retrained model's, or the original model's on the holdout set), whether it was reached and how far it
    moved; a run whose forgetting barely moved (under 10% of the way) warns with a :class:`ForgettingWarning`.

    ``fit`` is a transaction: if anything fails before it returns (an error, KeyboardInterrupt), the model is
    put back as it was before ``fit`` (weights, buffers, train/eval mode, requires_grad, no adapter left in it)
    and the exception is re-raised.

    Example:
        >>> import torch
        >>> from erasus import ErasusUnlearner
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
        >>> unlearner = ErasusUnlearner(model, strategy="graddiff", selector="kcenter", prune_ratio=0.5, copy=True)
        >>> new_model, report = unlearner.fit((x[:10], y[:10]), (x[10:], y[10:]), epochs=2)
        >>> report["coreset_size"], new_model is model
        (5, False)
    """

    def __init__(self, model: nn.Module, strategy="npo", selector="kcenter", prune_ratio: float = 0.2, *,
                 strategy_params: dict | None = None, selector_params: dict | None = None, epochs: int = 5,
                 batch_size: int = 32, copy: bool = False, seed: int = 0, out_dir: str | Path | None = None,
                 progress: bool = False, task: Task | str | None = None, lora=None, save_merged: bool = False,
                 stop_at_target: bool = False, eval_every: int | None = None, retain_batch_size: int | None = None,
                 overwrite: bool = False, adaptive: bool = False, adaptive_chunk: int | None = None,
                 max_rounds: int = 8, accelerator=None):
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        validate(UnlearnerSettings, {
            "prune_ratio": prune_ratio, "strategy_params": strategy_params, "selector_params": selector_params,
            "epochs": epochs, "batch_size": batch_size, "copy": copy, "seed": seed, "out_dir": out_dir,
            "progress": progress, "save_merged": save_merged, "stop_at_target": stop_at_target,
            "eval_every": eval_every, "retain_batch_size": retain_batch_size, "overwrite": overwrite,
            "adaptive": adaptive, "adaptive_chunk": adaptive_chunk, "max_rounds": max_rounds})
        self.retain_batch_size = retain_batch_size or batch_size
        self.model = model
        self.task = infer_task(model, task)
        self.strategy = (get_strategy(strategy, **_seeded(STRATEGIES, strategy, strategy_params, seed))
                         if isinstance(strategy, str) else strategy)
        if not hasattr(self.strategy, "unlearn"):
            raise InvalidInputError(f"strategy must be a registered name {sorted(STRATEGIES)} or a Strategy, got "
                                    f"{type(strategy).__name__}")
        self.strategy.check_task(self.task)
        self.selector = (get_selector(selector, **_seeded(SELECTORS, selector, selector_params, seed))
                         if isinstance(selector, str) else selector)
        if self.selector is not None and not hasattr(self.selector, "select"):
            raise InvalidInputError(f"selector must be a registered name {sorted(SELECTORS)}, a Selector or None, "
                                    f"got {type(selector).__name__}")
        self.lora = None
        if lora is not None:
            from erasus.tasks.lora import lora_config

            self.lora = lora_config(lora)
        self.prune_ratio, self.epochs, self.batch_size = prune_ratio, epochs, batch_size
        self.copy, self.seed, self.out_dir, self.progress = copy, seed, out_dir, progress
        self.save_merged, self.stop_at_target, self.eval_every = save_merged, stop_at_target, eval_every
        self.overwrite = overwrite
        self.adaptive, self.adaptive_chunk, self.max_rounds = adaptive, adaptive_chunk, max_rounds
        self.accelerator = accelerator
        self._processes = None if accelerator is None else self._accelerated_run(accelerator)

    def _accelerated_run(self, accelerator):
        """The run's use of ``accelerator``, checked before any work: a strategy that runs data-parallel, global
        batches that split evenly, FSDP's limits."""
        from erasus.integrations.accelerated import AcceleratedRun

        runs = getattr(self.strategy, "runs_data_parallel", None)
        if not callable(runs) or not runs():
            label = getattr(self.strategy, "name", type(self.strategy).__name__)
            reason = getattr(self.strategy, "serial_reason", "only gradient strategies run data-parallel")
            raise InvalidInputError(f"strategy {label!r} does not run data-parallel (accelerator=): {reason}; run it "
                                    "in one process (accelerator=None)")
        return AcceleratedRun(accelerator, batch_sizes={"batch_size": self.batch_size,
                                                        "retain_batch_size": self.retain_batch_size},
                              copy=self.copy, adaptive=self.adaptive, save_merged=self.save_merged)

    def fit(self, forget, retain, *, epochs: int | None = None, test=None, retrained: nn.Module | None = None,
            snapshot_every: int = 1, scenario: dict | None = None) -> tuple[nn.Module, dict]:
        """Unlearn ``forget`` while keeping ``retain``, in the task's data format (classifiers: a Dataset, a
        DataLoader or an ``(inputs, labels)`` pair of tensors; causal LMs: an ``erasus.data.QADataset`` or
        any Dataset of token dicts with a ``collate``). ``test`` (optional) is the test set of a classifier
        (adds TA and the MIA) or the holdout set of an LM (adds holdout NLL and the MIA AUCs); ``retrained``
        (a model trained on retain only) adds the gaps to it. ``scenario`` (optional, JSON-friendly facts such as
        ``{"data": "digits", "forget_class": 3}``) is recorded as ``report["scenario"]``; the report always has the
        forget fraction ``forget_size / (forget_size + retain_size)``. Returns ``(model, report)``."""
        if scenario is not None and not isinstance(scenario, dict):
            raise InvalidInputError(f"scenario must be a dict of facts about the data, got {type(scenario).__name__}")
        task = self.task
        forget_ds, retain_ds = task.as_dataset(forget, "forget"), task.as_dataset(retain, "retain")
        task.check_disjoint(forget_ds, retain_ds)
        test_ds = task.as_dataset(test, "test") if test is not None else None
        epochs = self.epochs if epochs is None else validate(UnlearnerSettings, {"epochs": epochs}).epochs
        task.check_model(self.model, {"forget": forget_ds, "retain": retain_ds, "test": test_ds})
        if retrained is not None:
            task.check_model(retrained, {})
        if self.out_dir is not None:
            _check_writable(self.out_dir)
            if not self.overwrite and (Path(self.out_dir) / "report.json").exists():
                raise InvalidInputError(f"out_dir {str(self.out_dir)!r} holds a previous run's report; pass "
                                        "overwrite=True (--overwrite) to replace it, or choose another folder")

        model = copy_module.deepcopy(self.model) if self.copy else self.model
        undo = _Undo(model)
        if self._processes is not None:
            model.to(self._processes.device)
        # under an accelerator, what the run prepares in it (loaders, model, optimizer) is released at the end
        scope = self._processes.released() if self._processes is not None else contextlib.nullcontext()
        try:
            with scope:
                model, report = self._fit(model, undo, forget_ds, retain_ds, test_ds, retrained, epochs,
                                          snapshot_every, scenario)
        except BaseException as exc:
            if not self.copy:
                remove_masks = getattr(self.strategy, "remove_masks", None)  # a pruning strategy's hooks
                if callable(remove_masks):
                    remove_masks()
                undo.restore()
                if hasattr(exc, "add_note"):
                    exc.add_note("erasus: the model was restored to its state before fit()")
            raise
        return model, report

    def _fit(self, model, undo, forget_ds, retain_ds, test_ds, retrained, epochs, snapshot_every, scenario):
        task = self.task
        started = time.perf_counter()
        ref = task.evaluate_raw(retrained, forget_ds, retain_ds, test=test_ds) if retrained is not None else None
        original_metrics = task.evaluate(model, forget_ds, retain_ds, test=test_ds, retrained=ref)
        if self.lora is not None:
            from erasus.tasks.lora import apply_lora

            with torch.random.fork_rng(devices=[]):  # the adapter's init is seeded; the global RNG is left as it was
                torch.manual_seed(self.seed)
                model = apply_lora(model, self.lora)
            undo.peft_model = model
        reference = None
        if getattr(self.strategy, "needs_reference", False):
            reference = Reference(model)
        t_original = time.perf_counter() - started

        n_forget = len(forget_ds)
        processes = self._processes
        target = self._target(task, model, retrained, forget_ds, retain_ds, test_ds)
        if processes is not None and target is not None:  # decisions compare with it: the main process's value
            target["value"] = processes.floats_from_main({"value": target["value"]})["value"]
        if self.adaptive and target is None:
            raise InvalidInputError("adaptive=True verifies the whole forget set against a target: pass retrained= "
                                    "(a model trained on retain only) or test= (a holdout set) to fit")
        original_forget = task.curve(model, forget_ds, None)["forget"]
        t0 = time.perf_counter()
        chosen = self._select(forget_ds, model)
        order = self._order(forget_ds, model, chosen) if self.adaptive else None
        if processes is not None:  # every rank unlearns the main process's coreset, whatever its selector did
            chosen = processes.from_main(chosen)
            order = processes.from_main(torch.tensor(order)).tolist() if order is not None else None
        t_select = time.perf_counter() - t0

        curves = {"step": [], "loss": [], "epoch": [], "forget": [], "retain": [], "label": task.curve_label}
        stop = {"reached": False, "at_step": None, "at_epoch": None, "target": target}
        label = getattr(self.strategy, "name", type(self.strategy).__name__)
        training_free = getattr(self.strategy, "training_free", False)
        quiet = not self.progress or (processes is not None and not processes.is_main)
        bar = tqdm(total=0, desc=f"unlearning ({label})", unit="step", disable=quiet, file=sys.stderr)
        position = {"offset": 0.0, "steps_per_epoch": 1, "samples": 0, "step_offset": 0, "steps": 0}

        def record(epoch_value):
            values = task.curve(model, forget_ds, retain_ds)
            if processes is not None:  # every rank evaluated the same sets; the main's values decide everywhere
                values = processes.floats_from_main(values)
            curves["epoch"].append(position["offset"] + epoch_value)
            curves["forget"].append(values["forget"])
            curves["retain"].append(values["retain"])
            if self.stop_at_target and target is not None and task.reached(values["forget"], target):
                stop.update(reached=True, at_step=len(curves["step"]), at_epoch=position["offset"] + epoch_value)
                raise TargetReached

        def on_step(info):
            curves["step"].append(position["step_offset"] + info["step"])
            curves["loss"].append(info["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.4g}")
            if self.eval_every and info["step"] % self.eval_every == 0:
                record(info["step"] / position["steps_per_epoch"])

        def on_epoch(epoch):
            if not self.eval_every:
                record(epoch + 1)

        guard = TrainingGuard(model, snapshot_every=snapshot_every,
                              agree=agree_on(self.accelerator) if processes is not None else None)

        def unlearn(indices: list[int]) -> dict:
            """One pass of the strategy over the coreset ``indices`` (every epoch); returns its log."""
            g = torch.Generator().manual_seed(self.seed + len(rounds))
            g_retain = torch.Generator().manual_seed(self.seed + 1 + len(rounds))
            if processes is None:
                loader = CountingLoader(task.loader(Subset(forget_ds, indices), self.batch_size, shuffle=True,
                                                    generator=g), task)
                retain_loader = task.loader(retain_ds, self.retain_batch_size, shuffle=True, generator=g_retain)
            else:  # each rank draws its share of every global batch
                loader = CountingLoader(processes.loader(task, Subset(forget_ds, indices), self.batch_size, g), task,
                                        padded_to=(self.batch_size, len(indices)))
                retain_loader = processes.loader(task, retain_ds, self.retain_batch_size, g_retain)
            parallel = {} if processes is None else {"accelerator": self.accelerator}
            position["steps_per_epoch"] = max(1, len(loader))
            if not training_free:
                bar.total += epochs * len(loader)
                bar.refresh()
            try:
                log = self.strategy.unlearn(model, loader, retain_loader, epochs=epochs, reference=reference,
                                            on_step=on_step, on_epoch=on_epoch, guard=guard, task=task, **parallel)
            except TargetReached:
                log = {"steps": len(curves["step"]), "stopped": None}
                pruning = getattr(self.strategy, "pruning_report", None)
                if pruning is not None:  # the strategy's own log did not come back: keep its pruning rounds
                    log["pruning"] = pruning
            position["samples"] += loader.samples
            position["steps"] += log.get("steps", 0)
            position["step_offset"] = curves["step"][-1] if curves["step"] else position["step_offset"]
            position["offset"] = curves["epoch"][-1] if curves["epoch"] else position["offset"] + epochs
            return log

        calibrate = getattr(self.strategy, "calibrate_to", None)
        if callable(calibrate):  # a training-free strategy that tunes itself (SSD alpha="auto") to the target
            calibrate(task, target, forget_ds, retain_ds)
        rounds: list[dict] = []
        members = chosen.tolist()
        t0 = time.perf_counter()
        log = unlearn(members)
        if self.adaptive:
            log, members = self._verify_and_grow(task, model, forget_ds, target, order, members, log, unlearn,
                                                 rounds, position)
        t_unlearn = time.perf_counter() - t0
        bar.close()
        model.train(undo.training)
        coreset = Subset(forget_ds, members)
        rest = Subset(forget_ds, sorted(set(range(n_forget)) - set(members)))

        metrics = task.evaluate(model, forget_ds, retain_ds, test=test_ds, unselected=rest, retrained=ref)
        strategy_name = getattr(self.strategy, "name", type(self.strategy).__name__)
        report = {
            "task": task.name, "strategy": strategy_name, "strategy_params": _params(self.strategy),
            "selector": None if self.selector is None or self.prune_ratio >= 1 else
            getattr(self.selector, "name", type(self.selector).__name__),
            "selector_params": _params(self.selector) if self.selector is not None else None,
            "prune_ratio": self.prune_ratio if self.selector is not None else 1.0,
            "lora": _lora_summary(model) if is_peft_model(model) else None,
            "reference": {"kind": "none" if reference is None else
                          "adapter disabled (shared weights)" if reference.shared else "frozen copy",
                          "extra_bytes": 0 if reference is None else reference.copied_bytes},
            "scenario": scenario, "forget_size": n_forget, "coreset_size": len(coreset), "retain_size": len(retain_ds),
            "forget_fraction": n_forget / (n_forget + len(retain_ds)),
            "epochs": None if training_free else epochs, "steps": position["steps"], "seed": self.seed,
            "in_place": not self.copy, "training_free": training_free,
            "forget_sample_passes": position["samples"],
            "time_select_s": t_select, "time_unlearn_s": t_unlearn, "time_original_eval_s": t_original,
            "time_total_s": time.perf_counter() - started,
            "metrics": metrics, "original": original_metrics,
            "guard": {"stopped": log.get("stopped"), "events": guard.events},
            "early_stop": stop if self.stop_at_target else None,
            "curves": curves, "log": {k: v for k, v in log.items() if k not in ("stopped",)},
            "adaptive": self._adaptive_summary(rounds, n_forget, position["samples"]) if self.adaptive else None,
            "verdict": _verdict(task, target, original_forget, task.curve(model, forget_ds, None)["forget"]),
        }
        if processes is not None:
            report["processes"] = processes.summary(self.batch_size)
        verdict = report["verdict"]
        if verdict["reached"] is False and verdict["progress"] < 0.1 and (processes is None or processes.is_main):
            warnings.warn(f"forgetting barely moved: the forget {task.curve_label} went from "
                          f"{verdict['original_forget']:.4g} to {verdict['final_forget']:.4g}, "
                          f"{100 * verdict['progress']:.0f}% of the way to the target {target['value']:.4g} "
                          f"({target['source']}); try stronger settings, or see the report's curves",
                          ForgettingWarning, stacklevel=3)
        if ref is not None:
            ref_metrics = ref[0]
            report["retrained"] = ref_metrics
            report["gap_to_retrained"] = {k: abs(metrics[k] - ref_metrics[k]) for k in ref_metrics if k in metrics}
            if any(k in metrics and k in ref_metrics for k in task.gap_keys):  # e.g. none without generation
                report["avg_gap"] = average_gap(metrics, ref_metrics, keys=task.gap_keys)
        if processes is not None:
            processes.reshard(model)  # after the last forward (the verdict's)
        if self.out_dir is not None:
            self._write_once(model, report)
        return model, report

    def _write_once(self, model, report):
        """``out_dir``'s files, written once: by this process, or under an accelerator by the main process (the
        weights of a sharded model gathered by every rank first), the others waiting until they are there."""
        processes = self._processes
        if processes is None:
            self._write(model, report)
            return
        if not processes.sharded:
            if processes.is_main:
                self._write(model, report)
        else:
            from erasus.report import write_report

            out = write_report(report, self.out_dir) if processes.is_main else Path(self.out_dir)
            processes.write_sharded(model, out, peft=is_peft_model(model))
        processes.wait()

    def _order(self, forget_ds: Dataset, model: nn.Module, chosen: torch.Tensor) -> list[int]:
        """The order in which the adaptive mode adds samples: the selector's ranking of the whole forget set
        (its greedy order, or its scores), the coreset first; index order without a selector."""
        n = len(forget_ds)
        ranking = (self.selector.select(forget_ds, k=n, model=model).cpu().tolist()
                   if self.selector is not None and n > 1 else list(range(n)))
        first = chosen.tolist()
        taken = set(first)
        return first + [i for i in ranking if i not in taken]

    def _verify_and_grow(self, task, model, forget_ds, target, order, members, log, unlearn, rounds, position):
        """The verified adaptive coreset: score the whole forget set forward-only after each round; stop when it
        reaches the target, the guard stopped the strategy, or max_rounds rounds ran; else add the still
        remembered samples (selector order, ``adaptive_chunk`` at most) and unlearn the grown coreset."""
        chunk = self.adaptive_chunk or len(members)
        while True:
            values = task.per_sample_forget(model, forget_ds)
            if self._processes is not None:  # which samples grow the coreset: the main process's scores decide
                values = self._processes.from_main(values)
            value = float(values.mean())
            remembered = [i for i, v in enumerate(values.tolist()) if not task.reached(v, target)]
            verified = bool(task.reached(value, target))
            rounds.append({"round": len(rounds) + 1, "coreset_size": len(members), "forget": value,
                           "remembered": len(remembered), "verified": verified,
                           "forget_sample_passes": position["samples"]})
            if verified or log.get("stopped") or len(rounds) >= self.max_rounds:
                return log, members
            still = set(remembered)
            taken = set(members)
            members = members + [i for i in order if i in still and i not in taken][:chunk]
            log = unlearn(members)

    def _adaptive_summary(self, rounds: list[dict], n_forget: int, backward: int) -> dict:
        return {"rounds": rounds, "verified": bool(rounds and rounds[-1]["verified"]),
                "forget_sample_passes": backward, "forward_scoring_passes": n_forget * len(rounds),
                "chunk": self.adaptive_chunk, "max_rounds": self.max_rounds}

    @staticmethod
    def _target(task, model, retrained, forget_ds, retain_ds, test_ds):
        """The forget metric that counts as forgotten: the retrained model's on the forget set, else the
        original's on data it never saw (the test / holdout set). Called before unlearning."""
        if retrained is not None:
            return {"source": "retrained model on the forget set",
                    "value": task.curve(retrained, forget_ds, None)["forget"]}
        if test_ds is not None:
            return {"source": "original model on the test/holdout set",
                    "value": task.curve(model, test_ds, None)["forget"]}
        return None

    def _write(self, model, report):
        from erasus.report import write_report

        out = write_report(report, self.out_dir)
        if is_peft_model(model):
            from erasus.tasks.lora import save_adapter, save_merged

            save_adapter(model, out / "adapter")
            if hasattr(self.strategy, "save_masks"):  # a pruning strategy: its masks, and them applied when merged
                self.strategy.save_masks(out / "masks.safetensors")
            if self.save_merged:
                save_merged(model, out / "merged", finalize=getattr(self.strategy, "apply_masks_to_weights", None))
        else:
            import os

            from safetensors.torch import save_model

            tmp = out / "model.safetensors.tmp"
            save_model(model, str(tmp))  # safetensors, never pickle; renamed into place when complete
            os.replace(tmp, out / "model.safetensors")

    def _select(self, forget_ds: Dataset, model: nn.Module) -> torch.Tensor:
        n = len(forget_ds)
        if self.selector is None or self.prune_ratio >= 1:
            return torch.arange(n)
        k = max(1, math.ceil(self.prune_ratio * n - 1e-9))
        return self.selector.select(forget_ds, k=k, model=model).cpu()


class ForgettingWarning(UserWarning):
    """A run ended with its forget metric barely moved towards the target (see ``report["verdict"]``)."""


def _verdict(task, target, original: float, final: float) -> dict:
    """Whether the whole forget set reached the target, and the fraction of the way it moved from the original
    model's value (1.0 when the original already met it)."""
    if target is None:
        return {"target": None, "original_forget": original, "final_forget": final, "reached": None,
                "progress": None, "note": "no reference to judge by: pass retrained= or test= to fit"}
    goal = target["value"]
    if task.reached(original, target) or goal == original:
        progress = 1.0
    else:
        progress = (final - original) / (goal - original)
    return {"target": target, "original_forget": original, "final_forget": final,
            "reached": bool(task.reached(final, target)), "progress": progress}


class _Undo:
    """What ``fit`` must put back if it fails: weights and buffers, mode, requires_grad, an injected adapter."""

    def __init__(self, model: nn.Module):
        self.model, self.training = model, model.training
        self.state = ModelState(model)
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.peft_model = None

    def restore(self) -> None:
        if self.peft_model is not None:
            from erasus.tasks.lora import remove_lora

            remove_lora(self.peft_model)
        self.state.restore()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


def _check_writable(out_dir) -> None:
    import tempfile

    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path).close()  # a file can be created (and is removed on close)
    except OSError as exc:
        raise InvalidInputError(f"out_dir {str(path)!r} is not writable: {exc}") from exc


def _params(obj) -> dict:
    """An object's settings (its public attributes) as JSON-friendly values."""
    out = {}
    for k, v in vars(obj).items():
        if k.startswith("_") or k.endswith("_") or isinstance(v, (nn.Module, torch.Tensor, dict)):
            continue
        out[k] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v)
    return out


def _lora_summary(model) -> dict:
    config = model.peft_config[model.active_adapter]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = config.target_modules
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(targets) if
            isinstance(targets, (set, list, tuple)) else targets, "trainable_params": trainable,
            "total_params": total}


def _seeded(registry: dict, name: str, params: dict | None, seed: int) -> dict:
    """The run's seed goes to a registered class that takes one, unless the caller set it."""
    if params is not None and not isinstance(params, dict):
        raise InvalidInputError(f"parameters for {name!r} must be a dict, got {type(params).__name__}")
    params = dict(params or {})
    cls = registry.get(name)
    if cls is not None and "seed" in inspect.signature(cls.__init__).parameters:
        params.setdefault("seed", seed)
    return params


class CountingLoader:
    """Wraps a DataLoader and counts the samples drawn from it: the forget-side cost of a run.

    ``padded_to=(global_batch, size)``: the loader is this rank's share of an accelerate loader over ``size``
    samples, whose last global batch of a pass accelerate completes with repeats of the pass's first samples.
    Every batch then counts the real samples of its global batch (every rank steps on every global batch), so
    ``samples`` is the run's total, as one process counts it, on every rank without a collective."""

    def __init__(self, loader, task: Task, padded_to: tuple[int, int] | None = None):
        self.loader, self.task, self.samples = loader, task, 0
        self.padded_to = padded_to

    def __iter__(self):
        drawn = 0  # samples of this pass, over every rank
        for batch in self.loader:
            if self.padded_to is None:
                self.samples += self.task.batch_size_of(batch)
            else:
                global_batch, size = self.padded_to
                real = max(0, min(global_batch, size - drawn))
                drawn += global_batch
                self.samples += real
            yield batch

    def __len__(self):
        return len(self.loader)
