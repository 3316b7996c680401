"""The NeurIPS 2023 Machine Unlearning Challenge forget-quality score, a per-example attack.

Written from the organisers' definition (google-deepmind/unlearning_evaluation, metric.py): for each forget
example, the logit-scaled confidences of N unlearned models are compared with those of N retrained models; the
best single- or double-threshold test gives FPR/FNR and an (epsilon, delta = 1e-5) estimate; epsilons are
bucketed in 0.5-wide bins scored 2^-(bin-1), and the forget score F is their mean. The final score multiplies F
by the retain and test accuracy ratios (unlearned over retrained).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from erasus.errors import InvalidInputError

DELTA = 1e-5
EPS_CAP = 50.0
STEPS_PER_UNIT = 100


def logit_scaled_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p_y - log sum_{j != y} p_j`` (LiRA's signal), as ``z_y - logsumexp_{j != y} z_j``, which does not
    saturate for confident models (computing ``log(1 - p_y)`` would, beyond a margin of about 37)."""
    z = logits.double()
    labels = labels.long()[:, None]
    z_y = z.gather(1, labels).squeeze(1)
    others = z.scatter(1, labels, float("-inf"))
    return z_y - torch.logsumexp(others, dim=1)


def _epsilons(fpr: np.ndarray, fnr: np.ndarray) -> np.ndarray:
    """Per threshold: inf when both error rates are 0, NaN (discarded) when exactly one is, else
    ``max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR)`` clipped at 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(np.clip(1 - DELTA - fpr, 1e-300, None)) - np.log(fnr)
        e2 = np.log(np.clip(1 - DELTA - fnr, 1e-300, None)) - np.log(fpr)
        eps = np.maximum(np.maximum(e1, e2), 0.0)
    eps = np.where((fpr == 0) & (fnr == 0), np.inf, eps)
    return np.where((fpr == 0) ^ (fnr == 0), np.nan, eps)


def _grid(lo: float, hi: float) -> np.ndarray:
    return np.linspace(lo, hi, max(2, int(round((hi - lo) * STEPS_PER_UNIT)) + 1))


def example_epsilon(unlearned: np.ndarray, retrained: np.ndarray) -> float:
    """Epsilon of one example from its N unlearned and N retrained signals, clipped to [0, 50]."""
    u, r = np.asarray(unlearned, float), np.asarray(retrained, float)
    pos, neg = (u, r) if np.median(u) >= np.median(r) else (r, u)
    range_pos, range_neg = np.ptp(pos), np.ptp(neg)
    small, large = min(range_pos, range_neg), max(range_pos, range_neg)
    if large == 0 or small / large < 0.01:
        return EPS_CAP  # peakiness guard: a (near) point mass cannot be scored
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    pos_s, neg_s = np.sort(pos), np.sort(neg)
    # (a) one threshold t, "positive" when the signal >= t
    t = _grid(lo, hi)
    fpr = 1 - np.searchsorted(neg_s, t, side="left") / len(neg_s)
    fnr = np.searchsorted(pos_s, t, side="left") / len(pos_s)
    candidates = [_epsilons(fpr, fnr)]
    # (b) two thresholds: the peakier set predicted inside [left, right], right - left around its range
    peaky, other = (pos_s, neg_s) if range_pos <= range_neg else (neg_s, pos_s)
    width = small
    right = _grid(lo + width - 2, hi + 2)[:, None]
    left = right - width + _grid(-2, 2)[None, :]
    inside_peaky = (np.searchsorted(peaky, right, side="right") - np.searchsorted(peaky, left, side="left"))
    inside_other = (np.searchsorted(other, right, side="right") - np.searchsorted(other, left, side="left"))
    fnr2 = 1 - np.clip(inside_peaky, 0, None) / len(peaky)
    fpr2 = np.clip(inside_other, 0, None) / len(other)
    candidates.append(_epsilons(fpr2.ravel(), fnr2.ravel()))
    eps = np.concatenate(candidates)
    if np.all(np.isnan(eps)):
        return 0.0
    return float(min(np.nanmax(eps), EPS_CAP))


def forget_score(unlearned: torch.Tensor, retrained: torch.Tensor) -> dict:
    """F from (N_models, n_examples) signal matrices of unlearned and retrained models (same N).

    Returns ``{"F": float, "epsilons": list}``. With N models the largest resolvable epsilon is about
    ln(N - 1), so buckets run from 0 to ceil(ln(N - 1)).
    """
    u, r = np.asarray(unlearned, float), np.asarray(retrained, float)
    if u.ndim != 2 or u.shape != r.shape:
        raise InvalidInputError(f"unlearned and retrained must be (N, n) of one shape, got {u.shape} and {r.shape}")
    n_models = u.shape[0]
    if n_models < 2:
        raise InvalidInputError("the score needs at least 2 models of each kind")
    eps = np.array([example_epsilon(u[:, i], r[:, i]) for i in range(u.shape[1])])
    n_buckets = 2 * int(math.ceil(math.log(max(n_models - 1, 2))))  # 0.5-wide, up to ceil(ln(N - 1))
    bucket = np.floor(eps / 0.5).astype(int)
    scores = np.where(bucket < n_buckets, 2.0 ** (-bucket.astype(float)), 0.0)
    return {"F": float(scores.mean()), "epsilons": eps.tolist()}


def final_score(f: float, ra_unlearned: float, ra_retrained: float, ta_unlearned: float, ta_retrained: float
                ) -> float:
    """The challenge's final score: ``F * (RA_U / RA_R) * (TA_U / TA_R)``."""
    return f * (ra_unlearned / ra_retrained) * (ta_unlearned / ta_retrained)
