"""Training-free strategies on diagonal Fisher importances: SSD and Fisher forgetting."""
from __future__ import annotations

import abc
import itertools
import math

import torch

from erasus._device import model_device, to_device
from erasus.errors import InvalidInputError
from erasus.ops import fisher_diagonal
from erasus.strategies.base import Strategy, _positive
from erasus.strategies.guard import GuardTripped, TrainingGuard
from erasus.tasks import infer_task


class TrainingFreeStrategy(Strategy):
    """A one-shot edit of the weights from importances computed in eval mode; ``epochs`` is ignored. The guard
    checks the edited weights (and restores them if the edit produced NaN or exploding values)."""

    needs_retain = True
    training_free = True

    def unlearn(self, model, forget, retain=None, *, epochs=1, original=None, on_step=None, on_epoch=None,
                guard=None, task=None, reference=None):
        if retain is None:
            raise InvalidInputError(f"{type(self).__name__} needs retain data")
        task = infer_task(model, task)
        self.check_task(task)
        if not any(p.requires_grad for p in model.parameters()):
            raise InvalidInputError("the model has no trainable parameters (every requires_grad is False)")
        device = model_device(model)

        def loss_fn(m, batch):
            batch = to_device(batch, device)
            return task.per_sample_loss(task.outputs(m, batch), batch)

        guard = guard or TrainingGuard(model)
        was_training = model.training
        model.eval()
        try:
            log = {"steps": 0, "stopped": None, **self.edit(model, forget, retain, loss_fn)}
        finally:
            model.train(was_training)
        try:
            guard.check(torch.tensor(0.0))
        except GuardTripped as exc:
            log["stopped"] = str(exc)
        return log

    @abc.abstractmethod
    def edit(self, model, forget, retain, loss_fn) -> dict:
        """Change the weights in place; return extra entries for the log. ``loss_fn(model, batch) -> (B,)``."""


REFINE_STEPS = 4  # SSD alpha="auto": bisection steps between the first grid alpha that forgets and the one before


class SSD(TrainingFreeStrategy, name="ssd"):
    """Selective Synaptic Dampening (Foster et al. 2024), written from the paper: importances are SSD's
    squared mini-batch gradients (``fisher_diagonal(mode="batch_squared")``) on the forget set (I_f) and on
    all training data, retain plus forget (I_D). Weights with ``I_f > alpha * I_D`` are scaled by
    ``min(lam * I_D / I_f, 1)``. One pass, no training.

    ``alpha="auto"`` calibrates alpha instead of guessing it (the paper's alpha = 10 can leave a small model
    untouched): the LARGEST alpha (the fewest weights dampened) whose edit brings the whole forget set's metric
    to the target, searched with forward passes only on a log grid of ``trials`` values over ``alpha_range``
    (mildest first; forgetting is not monotone in alpha), refined by bisection next to the first that reaches
    it; if none does, the one closest to the target among those that keep retain. The importances are computed
    once; each trial edits from a saved copy of the weights, so calibration holds one extra copy of the
    parameters. The target comes from :class:`~erasus.ErasusUnlearner` (``retrained=`` or
    ``test=``), or from :meth:`calibrate_to` when SSD is used on its own. ``log["calibration"]`` lists the
    trials, the chosen alpha, whether it reached the target and whether the retain metric held (moved by at
    most ``retain_tolerance``)."""

    def __init__(self, alpha: float | str = 10.0, lam: float = 1.0, alpha_range: tuple = (1.0, 1000.0),
                 trials: int = 12, retain_tolerance: float = 0.05):
        if alpha != "auto":
            _positive("alpha", alpha)
        _positive("lam", lam)
        if (not isinstance(alpha_range, (tuple, list)) or len(alpha_range) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in alpha_range)
                or not 0 < alpha_range[0] < alpha_range[1] < float("inf")):
            raise InvalidInputError(f"alpha_range must be (low, high) with 0 < low < high, got {alpha_range!r}")
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise InvalidInputError(f"trials must be a positive integer, got {trials!r}")
        _positive("retain_tolerance", retain_tolerance)
        self.alpha, self.lam = alpha, lam
        self.alpha_range, self.trials, self.retain_tolerance = tuple(alpha_range), trials, retain_tolerance
        self._calibration = None

    def calibrate_to(self, task, target: dict | None, forget, retain) -> None:
        """Set what ``alpha="auto"`` calibrates against: the task, its target (``{"value": ...}`` of
        ``task.curve``'s forget metric) and the forget / retain Datasets scored forward-only."""
        self._calibration = (task, target, forget, retain)

    def edit(self, model, forget, retain, loss_fn):
        imp_f = fisher_diagonal(model, forget, mode="batch_squared", loss_fn=loss_fn)
        imp_d = fisher_diagonal(model, itertools.chain(retain, forget), mode="batch_squared", loss_fn=loss_fn)
        if self.alpha != "auto":
            return {"dampened_weights": self._dampen(model, imp_f, imp_d, self.alpha)}
        return self._calibrate(model, imp_f, imp_d)

    def _dampen(self, model, imp_f, imp_d, alpha: float) -> int:
        dampened = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in imp_f:
                    continue
                selected = imp_f[name] > alpha * imp_d[name]
                factor = (self.lam * imp_d[name] / imp_f[name].clamp(min=1e-30)).clamp(max=1.0)
                p.mul_(torch.where(selected, factor, torch.ones_like(factor)).to(p.dtype))
                dampened += int(selected.sum())
        return dampened

    def _calibrate(self, model, imp_f, imp_d) -> dict:
        if self._calibration is None or self._calibration[1] is None:
            raise InvalidInputError('SSD(alpha="auto") needs a target to calibrate against: run it through '
                                    "ErasusUnlearner with retrained= or test=, or call calibrate_to(task, target, "
                                    "forget, retain) first")
        task, target, forget, retain = self._calibration
        saved = {name: p.detach().clone() for name, p in model.named_parameters() if name in imp_f}
        before = task.curve(model, forget, retain)
        trials = []

        def trial(alpha: float) -> bool:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])
            dampened = self._dampen(model, imp_f, imp_d, alpha)
            values = task.curve(model, forget, retain)
            reached = bool(task.reached(values["forget"], target))
            trials.append({"alpha": alpha, "dampened_weights": dampened, "forget": values["forget"],
                           "retain": values["retain"], "reached": reached})
            return reached

        # SSD's forgetting is not monotone in alpha (a small alpha dampens many weights, each only mildly):
        # walk a log grid from the mildest edit down and take the first alpha that reaches the target, then
        # refine between it and the milder grid point before it
        low, high = (math.log(a) for a in self.alpha_range)
        grid = [math.exp(high - (high - low) * i / max(1, self.trials - 1)) for i in range(self.trials)]
        best, milder = None, None
        for alpha in grid:
            if trial(alpha):
                best = alpha
                break
            milder = alpha
        if best is not None and milder is not None:
            fails = milder
            for _ in range(REFINE_STEPS):
                mid = math.sqrt(best * fails)
                best, fails = (mid, fails) if trial(mid) else (best, mid)
        if best is None:  # nothing reached: the closest to the target among edits that keep retain, else overall
            held = [t for t in trials if abs(t["retain"] - before["retain"]) <= self.retain_tolerance]
            closest = min(held or trials, key=lambda t: abs(t["forget"] - target["value"]))
            best = closest["alpha"]
        last = trials[-1]
        if last["alpha"] != best:
            trial(best)
            last = trials[-1]
        return {"dampened_weights": last["dampened_weights"],
                "calibration": {"alpha": best, "reached": last["reached"], "target": target.get("value"),
                                "retain_before": before["retain"], "retain_after": last["retain"],
                                "retain_held": abs(last["retain"] - before["retain"]) <= self.retain_tolerance,
                                "trials": trials}}


class FisherForgetting(TrainingFreeStrategy, name="fisher"):
    """Fisher forgetting (Golatkar et al. 2020, the diagonal form): add Gaussian noise to each weight with
    variance ``alpha / F_r`` (capped at ``max_std**2``), where F_r is the empirical diagonal Fisher of the
    retain set: weights the retain data does not pin down are scrambled. One pass, no training."""

    def __init__(self, alpha: float = 1e-6, max_std: float = 0.05, seed: int = 0):
        _positive("alpha", alpha)
        _positive("max_std", max_std)
        self.alpha, self.max_std, self.seed = alpha, max_std, seed

    def edit(self, model, forget, retain, loss_fn):
        fisher = fisher_diagonal(model, retain, mode="empirical", loss_fn=loss_fn)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in fisher:
                    std = (self.alpha / fisher[name].clamp(min=1e-12)).sqrt().clamp(max=self.max_std)
                    noise = torch.randn(p.shape, generator=generator).to(p.device)
                    p.add_((std * noise).to(p.dtype))
        return {}
