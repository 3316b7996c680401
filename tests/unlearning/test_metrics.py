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
    rng = np.random.default_rng(1)
    indistinguishable = forget_score(rng.normal(0, 1, (32, 40)), rng.normal(0, 1, (32, 40)))
    distinguishable = forget_score(rng.normal(0, 1, (32, 40)), rng.normal(8, 1, (32, 40)))
    assert distinguishable["F"] == 0.0
    assert indistinguishable["F"] > 0.1
    # H = 2^-(bucket): an epsilon in [0, 0.5) scores 1, [0.5, 1) 0.5, ...
    eps = np.array(indistinguishable["epsilons"])
    expected = np.where(eps < 2 * math.ceil(math.log(31)) * 0.5, 2.0 ** -np.floor(eps / 0.5), 0).mean()
    assert indistinguishable["F"] == pytest.approx(expected)
    assert final_score(0.5, 0.9, 1.0, 0.8, 1.0) == pytest.approx(0.36)


def test_average_gap_is_the_mean_absolute_difference():
    assert average_gap({"UA": 0.1, "RA": 0.9, "TA": 0.8, "MIA": 0.2},
                       {"UA": 0.2, "RA": 1.0, "TA": 0.9, "MIA": 0.0}) == pytest.approx(0.125)
