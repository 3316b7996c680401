"""U-LiRA on synthetic signals whose answer is known, and its input checks."""
import numpy as np
import pytest

from erasus.errors import InvalidInputError
from erasus.metrics import ulira


def signals(rng, shift: np.ndarray, models: int, n: int) -> np.ndarray:
    return rng.normal(size=(models, n)) + shift


@pytest.mark.parametrize("fixed_variance", [True, False])
def test_indistinguishable_models_score_about_one_half(fixed_variance):
    rng = np.random.default_rng(0)
    base = rng.normal(size=200) * 3  # examples differ a lot; both kinds share each example's distribution
    out = ulira(signals(rng, base, 16, 200), signals(rng, base, 16, 200), signals(rng, base, 8, 200),
                signals(rng, base, 8, 200), fixed_variance=fixed_variance)
    assert abs(out["accuracy"] - 0.5) < 0.05 and abs(out["auc"] - 0.5) < 0.05
    assert out["vulnerable_fraction"] < 0.2 and len(out["per_example_accuracy"]) == 200


def test_per_example_separation_is_found_where_a_population_view_sees_none():
    """Each example's unlearned signal sits 3 sd above its own retrained one, but example offsets are so spread
    that the pooled distributions of the two kinds overlap: the per-example test still separates them."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=300) * 20
    unlearned = lambda k: signals(rng, base + 3.0, k, 300)  # noqa: E731
    retrained = lambda k: signals(rng, base, k, 300)  # noqa: E731
    out = ulira(unlearned(16), retrained(16), unlearned(8), retrained(8))
    assert out["accuracy"] > 0.9 and out["auc"] > 0.95 and out["tpr_at_1pct_fpr"] > 0.3
    assert out["vulnerable_fraction"] > 0.8
    pooled_u, pooled_r = unlearned(8).ravel(), retrained(8).ravel()
    assert abs(pooled_u.mean() - pooled_r.mean()) / pooled_r.std() < 0.2  # a population attacker's view


def test_bad_inputs_are_named():
    ok = np.zeros((4, 3))
    with pytest.raises(InvalidInputError, match="retrained_shadows covers 2 examples"):
        ulira(ok, np.zeros((4, 2)), ok, ok)
    with pytest.raises(InvalidInputError, match="at least 2 shadow models"):
        ulira(np.zeros((1, 3)), ok, ok, ok)
    with pytest.raises(InvalidInputError, match="unlearned_targets must be a \\(models, examples\\) matrix"):
        ulira(ok, ok, np.zeros(3), ok)
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        ulira(ok, ok, np.full((2, 3), np.nan), ok)
