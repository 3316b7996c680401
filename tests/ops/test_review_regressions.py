"""Regressions for defects found in review: each case failed (or was silently wrong) before its fix."""
import pytest
import torch
from torch import nn

import erasus.ops
from erasus import errors
from erasus.metrics import logit_scaled_confidence
from erasus.selectors import GradNormSelector
from oracles import herding_bruteforce, kcenter_bruteforce
from test_fisher import assert_fisher_close, loop_fisher
from test_model_grad_norms import ce, loop_norms


def test_in_place_ops_after_a_layer_do_not_corrupt_norms_or_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).eval()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, (x, y)).double(), loop_norms(model, ce, (x, y)),
                               rtol=1e-4, atol=1e-6)
    assert_fisher_close(erasus.ops.fisher_diagonal(model, [(x, y)], loss_fn=ce), loop_fisher(model, ce, [(x, y)]))


class LearnedQueryPool(nn.Module):
    """Attention pooling with one learned query, looked up once per forward (not per sample)."""

    def __init__(self):
        super().__init__()
        self.inp, self.query, self.out = nn.Linear(3, 8), nn.Embedding(1, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        q = self.query(torch.zeros(1, dtype=torch.long))
        return self.out((torch.softmax(h @ q.T, dim=1) * h).sum(1))


def test_a_layer_run_once_for_the_whole_batch_is_an_error_not_a_wrong_answer():
    torch.manual_seed(0)  # fixed data, whatever ran before
    with pytest.raises(errors.ShapeError, match="layer query: output has 1 rows"):
        erasus.ops.grad_norms(LearnedQueryPool(), ce, (torch.randn(8, 5, 3), torch.randint(0, 2, (8,))))


def test_eval_mode_batch_norm_has_per_sample_functions():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
                          nn.BatchNorm1d(3))
    model.train()
    model(torch.randn(16, 2, 5, 5))  # give the running statistics some values
    model.eval()
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, (x, y)).double(), loop_norms(model, ce, (x, y)),
                               rtol=1e-4, atol=1e-6)
    assert_fisher_close(erasus.ops.fisher_diagonal(model, [(x, y)], loss_fn=ce), loop_fisher(model, ce, [(x, y)]))
    stateless = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(errors.UnsupportedLayerError, match="running statistics"):
        erasus.ops.grad_norms(stateless, lambda m, b: m(b).sum(1), torch.randn(5, 3))


def test_embedding_scaling_gradients_by_batch_frequency_is_refused():
    torch.manual_seed(0)  # fixed data, whatever ran before
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(errors.UnsupportedLayerError, match="scale_grad_by_freq"):
        erasus.ops.grad_norms(model, ce, (torch.randint(0, 10, (4, 3)), torch.randint(0, 2, (4,))))


def test_batch_squared_fisher_works_under_no_grad():
    torch.manual_seed(0)  # fixed data, whatever ran before
    model = nn.Linear(3, 2)
    with torch.no_grad():
        got = erasus.ops.fisher_diagonal(model, [(torch.randn(4, 3), torch.randint(0, 2, (4,)))], loss_fn=ce,
                                         mode="batch_squared")
    assert got["weight"].abs().sum() > 0


def test_coreset_references_do_not_cancel_for_features_far_from_zero():
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(300, 16, generator=g) + 1000.0
    want, radius = kcenter_bruteforce(x, 8, [0])
    for backend in ("reference", "cpp"):
        got = erasus.ops.kcenter_greedy(x, 8, init=0, backend=backend)
        assert float(got.radius) == pytest.approx(radius, rel=1e-2), backend
    assert erasus.ops.herding(x, 6, backend="reference").tolist() == herding_bruteforce(x, 6)
    xd = x.double()
    nearest_mean = int(((xd - xd.mean(0)) ** 2).sum(1).argmin())
    assert int(erasus.ops.kcenter_greedy(x, 2).indices[0]) == nearest_mean


def test_logit_scaled_confidence_does_not_saturate():
    logits = torch.tensor([[0.0, 20.0], [0.0, 40.0], [0.0, 100.0]])
    torch.testing.assert_close(logit_scaled_confidence(logits, torch.tensor([1, 1, 1])),
                               torch.tensor([20.0, 40.0, 100.0], dtype=torch.float64))


def test_gradnorm_selector_scores_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 3)).train()
    data = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    first = GradNormSelector().select(data, k=10, model=model)
    assert torch.equal(first, GradNormSelector().select(data, k=10, model=model))  # no dropout noise
    assert model.training
