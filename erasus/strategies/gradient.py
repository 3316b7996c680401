"""Gradient-based strategies: gradient ascent, GradDiff, NPO, fine-tuning on retain, SCRUB, SalUn."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from erasus._device import model_device, to_device
from erasus.errors import InvalidInputError
from erasus.losses import distill_kl, gradient_ascent_loss, npo_loss
from erasus.strategies.base import GradientStrategy, cross_entropy


class GradientAscent(GradientStrategy, name="ga"):
    """Gradient ascent on the forget set (minimise -CE). Without a utility guard it tends to collapse the
    model; combine it with ``anchor="outputs"`` or use GradDiff / NPO."""

    def method_loss(self, model, forget_batch, retain_batch):
        return gradient_ascent_loss(model(forget_batch[0]), forget_batch[1]).mean()


class GradDiff(GradientStrategy, name="graddiff"):
    """Gradient difference: ``-CE(forget) + retain_weight * CE(retain)`` (Liu et al. 2022; NegGrad+)."""

    needs_retain = True

    def method_loss(self, model, forget_batch, retain_batch):
        forget = gradient_ascent_loss(model(forget_batch[0]), forget_batch[1]).mean()
        return forget + self.retain_weight * cross_entropy(model, retain_batch)


class NPO(GradientStrategy, name="npo"):
    """Negative Preference Optimization (Zhang et al. 2024) against the original model, plus
    ``retain_weight * CE(retain)`` when retain data is given (NPO+RT; ``retain_weight=0`` for plain NPO)."""

    def __init__(self, beta: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not beta > 0:
            raise InvalidInputError(f"beta must be positive, got {beta!r}")
        self.beta = beta

    def method_loss(self, model, forget_batch, retain_batch):
        x, y = forget_batch[0], forget_batch[1]
        with torch.no_grad():
            ref = self.original(model)(x)
        total = npo_loss(model(x), ref, y, self.beta).mean()
        if retain_batch is not None and self.retain_weight:
            total = total + self.retain_weight * cross_entropy(model, retain_batch)
        return total


class FineTune(GradientStrategy, name="finetune"):
    """Fine-tune on the retain set only ("FT"): forgetting by catastrophic interference. Steps are counted
    in forget batches, so runs with the same epochs compare at the same cost."""

    needs_retain = True

    def method_loss(self, model, forget_batch, retain_batch):
        return cross_entropy(model, retain_batch)


class SCRUB(GradientStrategy, name="scrub"):
    """SCRUB (Kurmanji et al. 2023), written from the paper: the student (the model) starts at the teacher
    (the original). Each epoch: while ``epoch < max_steps``, one pass over the forget set maximising
    ``KL(teacher || student)`` (max-steps); then one pass over the retain set minimising
    ``gamma * CE + alpha * KL`` (min-steps). ``temperature`` as DistillKL (4). The KL's gradient is zero
    while student and teacher agree, so the first max-steps move little; the default lr (5e-3) is the one
    that forgets on the digits demo."""

    needs_retain = True

    def __init__(self, alpha: float = 0.5, gamma: float = 1.0, max_steps: int = 3, temperature: float = 4.0,
                 **kwargs):
        kwargs.setdefault("lr", 5e-3)
        super().__init__(**kwargs)
        self.alpha, self.gamma, self.max_steps, self.temperature = alpha, gamma, max_steps, temperature

    def forget_batches(self, forget, epoch):
        return forget if epoch < self.max_steps else []

    def method_loss(self, model, forget_batch, retain_batch):
        x = forget_batch[0]
        with torch.no_grad():
            teacher = self.original(model)(x)
        return -distill_kl(model(x), teacher, self.temperature).mean()

    def end_epoch(self, model, epoch, retain, opt, guard, log):
        device = model_device(model)
        for batch in retain:
            x, y = to_device(batch, device)[:2]
            with torch.no_grad():
                teacher = self.original(model)(x)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = self.gamma * F.cross_entropy(out, y) + self.alpha * distill_kl(out, teacher, self.temperature).mean()
            loss.backward()
            opt.step()
            log["steps"] += 1
            guard.check(loss.detach())


class SalUn(GradientStrategy, name="salun"):
    """SalUn (Fan et al. 2024), written from the paper: a saliency mask keeps the ``mask_ratio`` fraction of
    weights with the largest ``|sum of forget-set gradients of -CE|`` (global top fraction); training is
    random-label relabelling of the forget set plus CE on retain, with gradients masked. Masked-out weights
    are put back to their original values after every step, so momentum, weight decay and Adam moments never
    move them (the public code's leak before its PR #33)."""

    needs_retain = True

    def __init__(self, mask_ratio: float = 0.5, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 0 < mask_ratio <= 1:
            raise InvalidInputError(f"mask_ratio must be in (0, 1], got {mask_ratio!r}")
        self.mask_ratio, self.seed = mask_ratio, seed
        self.masks: dict[str, torch.Tensor] = {}

    def prepare(self, model, forget, retain):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = model.training
        model.eval()
        device = model_device(model)
        for batch in forget:
            x, y = to_device(batch, device)[:2]
            grads = torch.autograd.grad(-F.cross_entropy(model(x), y), list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n] += g
        model.train(was_training)
        flat = torch.cat([s.abs().flatten() for s in sums.values()])
        keep = max(1, int(round(self.mask_ratio * flat.numel())))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[torch.topk(flat, keep).indices] = True  # exactly `keep` weights, ties or not
        self.masks, offset = {}, 0
        for n, s in sums.items():
            self.masks[n] = chosen[offset : offset + s.numel()].reshape(s.shape)
            offset += s.numel()
        self._held = {n: p.detach().clone() for n, p in params.items()}
        self._params = params
        self._generator = torch.Generator().manual_seed(self.seed)

    def method_loss(self, model, forget_batch, retain_batch):
        x, y = forget_batch[0], forget_batch[1]
        logits = model(x)
        random_labels = torch.randint(logits.shape[-1], y.shape, generator=self._generator).to(y.device)
        return F.cross_entropy(logits, random_labels) + self.retain_weight * cross_entropy(model, retain_batch)

    def before_step(self, model):
        for n, p in self._params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    def after_step(self, model):
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(torch.where(self.masks[n], p, self._held[n]))

