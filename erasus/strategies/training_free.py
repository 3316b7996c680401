"""Training-free strategies on diagonal Fisher importances: SSD and Fisher forgetting."""
from __future__ import annotations

import abc
import itertools

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


class SSD(TrainingFreeStrategy, name="ssd"):
    """Selective Synaptic Dampening (Foster et al. 2024), written from the paper: importances are SSD's
    squared mini-batch gradients (``fisher_diagonal(mode="batch_squared")``) on the forget set (I_f) and on
    all training data, retain plus forget (I_D). Weights with ``I_f > alpha * I_D`` are scaled by
    ``min(lam * I_D / I_f, 1)``. One pass, no training."""

    def __init__(self, alpha: float = 10.0, lam: float = 1.0):
        _positive("alpha", alpha)
        _positive("lam", lam)
        self.alpha, self.lam = alpha, lam

    def edit(self, model, forget, retain, loss_fn):
        imp_f = fisher_diagonal(model, forget, mode="batch_squared", loss_fn=loss_fn)
        imp_d = fisher_diagonal(model, itertools.chain(retain, forget), mode="batch_squared", loss_fn=loss_fn)
        dampened = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in imp_f:
                    continue
                selected = imp_f[name] > self.alpha * imp_d[name]
                factor = (self.lam * imp_d[name] / imp_f[name].clamp(min=1e-30)).clamp(max=1.0)
                p.mul_(torch.where(selected, factor, torch.ones_like(factor)).to(p.dtype))
                dampened += int(selected.sum())
        return {"dampened_weights": dampened}


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
