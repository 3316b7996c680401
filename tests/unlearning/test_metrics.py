import math

import numpy as np
import pytest
import torch

from erasus.metrics import average_gap, final_score, forget_score, logit_scaled_confidence, mia_efficacy
from erasus.metrics.neurips import example_epsilon


class FixedConfidence(torch.nn.Module):
    """A 'model' whose true-class probability is the first input feature."""

    def forward(self, x):
        p = x[:, 0].clamp(1e-4, 1 - 1e-4)
        return torch.stack([torch.log(p), torch.log(1 - p)], dim=1)


def data(confidences):
    x = torch.tensor(confidences, dtype=torch.float32)[:, None]
    return torch.utils.data.TensorDataset(x, torch.zeros(len(confidences), dtype=torch.long))


def test_mia_efficacy_calls_low_confidence_forget_samples_non_members():
    model = FixedConfidence()
    retain, test = data([0.99] * 50 + [0.98] * 50), data([0.6] * 50 + [0.5] * 50)
    assert mia_efficacy(model, retain, test, data([0.55] * 10)) == 1.0
    assert mia_efficacy(model, retain, test, data([0.985] * 10)) == 0.0
    assert mia_efficacy(model, retain, test, data([0.55] * 5 + [0.985] * 5)) == 0.5


def test_logit_scaled_confidence_is_the_log_odds_of_the_true_class():
    logits = torch.log(torch.tensor([[0.8, 0.15, 0.05]]))
    assert float(logit_scaled_confidence(logits, torch.tensor([0]))) == pytest.approx(math.log(0.8 / 0.2))


def test_neurips_epsilon_peakiness_cap_and_separation():
    rng = np.random.default_rng(0)
    assert example_epsilon(np.full(16, 2.0), rng.normal(0, 1, 16)) == 50.0  # a point mass cannot be scored
    separated = example_epsilon(rng.normal(0, 1, 16), rng.normal(10, 1, 16))
    assert separated == 50.0  # FPR = FNR = 0: infinite, clipped
    same = example_epsilon(rng.normal(0, 1, 64), rng.normal(0, 1, 64))
    assert 0 < same < 2.0


def test_neurips_forget_score_buckets_and_extremes():
    # N = 10 models; each column is one forget example: unlearned signals 0..9, retrained ones shifted by
    # 0, 1, 5 and 100. Worked out by hand (delta = 1e-5, positive = the retrained side, threshold t):
    # - shift 0: the two samples are equal, FPR + FNR = 1 at every threshold, so epsilon = 0 (bucket 0, scores 1);
    # - shift 1: best at t in (1, 2]: FPR = 8/10, FNR = 1/10, epsilon = ln((1 - delta - 0.8) / 0.1) = 0.6931
    #   (bucket 1, scores 1/2);
    # - shift 5: best at t in (5, 6]: FPR = 4/10, FNR = 1/10, epsilon = ln((1 - delta - 0.4) / 0.1) = 1.7917
    #   (bucket 3, scores 1/8);
    # - shift 100: both error rates reach 0: infinite, capped at 50, beyond the 2 ceil(ln 9) = 6 buckets: 0.
    unlearned = np.tile(np.arange(10.0)[:, None], (1, 4))
    retrained = unlearned + np.array([0.0, 1.0, 5.0, 100.0])
    got = forget_score(unlearned, retrained)
    assert got["epsilons"] == pytest.approx([0.0, 0.6930971793099037, 1.791742802422498, 50.0], abs=1e-9)
    assert got["F"] == pytest.approx((1 + 0.5 + 0.125 + 0) / 4)
    assert final_score(0.5, 0.9, 1.0, 0.8, 1.0) == pytest.approx(0.36)


def test_average_gap_is_the_mean_absolute_difference():
    assert average_gap({"UA": 0.1, "RA": 0.9, "TA": 0.8, "MIA": 0.2},
                       {"UA": 0.2, "RA": 1.0, "TA": 0.9, "MIA": 0.0}) == pytest.approx(0.125)
