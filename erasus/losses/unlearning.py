"""Unlearning losses on classifier logits. All are per sample, shape (B,); the caller reduces."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-CE: minimising it raises the loss on the forget samples (Thudi et al.; the "GA" baseline)."""
    return -F.cross_entropy(logits.float(), labels, reduction="none")


def npo_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024): ``(2/beta) log(1 + (pi/pi_ref)^beta)``, i.e.
    ``(2/beta) softplus(beta (log pi(y|x) - log pi_ref(y|x)))``. Bounded below by 0, so, unlike gradient
    ascent, its gradient vanishes once the forget sample's likelihood has dropped below the reference's."""
    logp = -F.cross_entropy(logits.float(), labels, reduction="none")
    ref_logp = -F.cross_entropy(ref_logits.float(), labels, reduction="none")
    return 2.0 / beta * F.softplus(beta * (logp - ref_logp))


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` per sample, as SCRUB's DistillKL (Hinton et al.)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1) * t * t


def output_anchor_loss(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Retain anchor on outputs: ``KL(p_original || p_model)`` per sample, holding predictions on retain data
    near the original model's."""
    return distill_kl(logits, ref_logits, temperature=1.0)


def weight_anchor_loss(params: list[torch.Tensor], ref_params: list[torch.Tensor]) -> torch.Tensor:
    """Retain anchor on weights: ``sum ||theta - theta_original||^2`` (a scalar: it does not depend on samples)."""
    return sum(((p - r) ** 2).sum() for p, r in zip(params, ref_params))


def npo_from_logprobs(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """NPO on sequence log-probabilities (any family): ``(2/beta) softplus(beta (log pi - log pi_ref))``."""
    return 2.0 / beta * F.softplus(beta * (logp.float() - ref_logp.float()))


def simnpo_loss(mean_logp: torch.Tensor, beta: float = 4.5, margin: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised:
    ``-(2/beta) log sigmoid(-beta * mean_logp - margin) = (2/beta) softplus(beta * mean_logp + margin)``, with
    ``mean_logp = log pi(y|x) / |y|``. ``margin`` is the paper's gamma (OpenUnlearning's ``delta`` times beta)."""
    return 2.0 / beta * F.softplus(beta * mean_logp.float() + margin)
