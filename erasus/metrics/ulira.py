"""U-LiRA: a per-example likelihood-ratio test of unlearning (Hayes, Shumailov, Triantafillou, Khalifa, Papernot,
"Inexact unlearning needs more careful evaluations to avoid a false sense of privacy", 2024), written from the
paper's design.

Population MIAs train one attacker for all examples and say "forgotten" when the forget set's confidence
distribution looks like unseen data overall. U-LiRA fits, for EACH forget example, the distribution of its
signal (LiRA's logit-scaled confidence) under shadow models that trained on it and then unlearned it, and under
shadow models retrained without it; a target model is then judged per example by the likelihood ratio of the
two Gaussians. Accuracy 0.5 on a balanced set of unlearned and retrained targets means the unlearning is
indistinguishable from retraining; higher means the examples still leak.

Cost: K shadow models of each kind (each shadow "unlearned" model is an original training run plus an
unlearning run; each retrained one a training run), plus the target models, all scored forward-only on the
forget set: with K = 8 on the digits MLP, about 16 trainings and 8 unlearning runs, a minute or two on 2 cores.
"""
from __future__ import annotations

import numpy as np
import torch

from erasus.errors import InvalidInputError

#: the smallest standard deviation a Gaussian may have (a deterministic method gives identical shadows)
MIN_STD = 1e-3


def _matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=float)
    if a.ndim != 2:
        raise InvalidInputError(f"{name} must be a (models, examples) matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InvalidInputError(f"{name} holds NaN or infinite signals")
    return a


def _log_normal(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma)  # the shared -log(sqrt(2 pi)) cancels in the ratio


def ulira(unlearned_shadows, retrained_shadows, unlearned_targets, retrained_targets, *,
          fixed_variance: bool = True) -> dict:
    """Per-example U-LiRA on signals (e.g. :func:`~erasus.metrics.logit_scaled_confidence` of each model on
    the forget set), each a (models, n_examples) matrix over the same n forget examples.

    Args:
        unlearned_shadows: (K, n) shadow models that trained on the forget set and then unlearned it.
        retrained_shadows: (K', n) shadow models retrained without it.
        unlearned_targets, retrained_targets: (T, n) and (T', n) held-out models of each kind (not among the
            shadows), the ones judged.
        fixed_variance: one standard deviation per kind shared by all examples (LiRA's choice with few
            shadows, more stable), instead of each example's own.

    Returns:
        ``{"accuracy", "auc", "tpr_at_1pct_fpr", "per_example_accuracy", "vulnerable_fraction"}``: the
        balanced accuracy of the test "likelihood ratio > 0 means unlearned" over every (target, example) pair
        (0.5 ideal), the ROC AUC of the ratio, the true-positive rate at 1% false positives, each example's
        balanced accuracy over the targets, and the fraction of examples at 0.75 or more.
    """
    shadows_u = _matrix(unlearned_shadows, "unlearned_shadows")
    shadows_r = _matrix(retrained_shadows, "retrained_shadows")
    targets_u = _matrix(unlearned_targets, "unlearned_targets")
    targets_r = _matrix(retrained_targets, "retrained_targets")
    n = shadows_u.shape[1]
    for name, a in (("retrained_shadows", shadows_r), ("unlearned_targets", targets_u),
                    ("retrained_targets", targets_r)):
        if a.shape[1] != n:
            raise InvalidInputError(f"{name} covers {a.shape[1]} examples, unlearned_shadows {n}: every matrix "
                                    "must score the same forget examples")
    if n == 0:
        raise InvalidInputError("no forget examples to test")
    if min(len(shadows_u), len(shadows_r)) < 2:
        raise InvalidInputError(f"U-LiRA needs at least 2 shadow models of each kind, got {len(shadows_u)} "
                                f"unlearned and {len(shadows_r)} retrained")
    if min(len(targets_u), len(targets_r)) < 1:
        raise InvalidInputError("U-LiRA needs at least one target model of each kind")

    mu_u, mu_r = np.median(shadows_u, axis=0), np.median(shadows_r, axis=0)
    if fixed_variance:
        sd_u = np.full(n, max(float(np.std(shadows_u - mu_u)), MIN_STD))
        sd_r = np.full(n, max(float(np.std(shadows_r - mu_r)), MIN_STD))
    else:
        sd_u = np.maximum(shadows_u.std(axis=0, ddof=1), MIN_STD)
        sd_r = np.maximum(shadows_r.std(axis=0, ddof=1), MIN_STD)

    def ratio(signals: np.ndarray) -> np.ndarray:
        return _log_normal(signals, mu_u, sd_u) - _log_normal(signals, mu_r, sd_r)

    score_u, score_r = ratio(targets_u), ratio(targets_r)  # (T, n): positive says "unlearned"
    hits_u, hits_r = score_u > 0, score_r <= 0
    per_example = 0.5 * (hits_u.mean(axis=0) + hits_r.mean(axis=0))
    scores = np.concatenate([score_u.ravel(), score_r.ravel()])
    labels = np.concatenate([np.ones(score_u.size), np.zeros(score_r.size)])
    return {"accuracy": float(0.5 * (hits_u.mean() + hits_r.mean())), "auc": _auc(scores, labels),
            "tpr_at_1pct_fpr": _tpr_at_fpr(score_u.ravel(), score_r.ravel(), 0.01),
            "per_example_accuracy": per_example.tolist(),
            "vulnerable_fraction": float((per_example >= 0.75).mean())}


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float) -> float:
    """The largest share of positives above a threshold that lets at most ``fpr`` of the negatives through."""
    allowed = int(np.floor(fpr * negative.size))
    threshold = np.sort(negative)[::-1][allowed] if allowed < negative.size else -np.inf
    return float((positive > threshold).mean())
