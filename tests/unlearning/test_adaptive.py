"""The verified adaptive coreset, the forgetting verdict of every run, and SSD's calibrated alpha."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from erasus import ErasusUnlearner
from erasus.errors import InvalidInputError
from erasus.metrics import accuracy
from erasus.strategies import get_strategy
from erasus.tasks import Classification
from erasus.training import train_classifier
from erasus.unlearner import ForgettingWarning

def mlp(width: int, hidden: int = 32, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@pytest.fixture(scope="module")
def clusters():
    """Forget = class 0 (60 points) and a small far cluster, class 3 (6 points); retain = classes 1 and 2. The
    retrained model has never seen classes 0 and 3: its forget accuracy is 0."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [12.0, 12.0]])
    counts = [60, 60, 60, 6]
    x = torch.cat([c + 0.7 * torch.randn(n, 2, generator=g) for c, n in zip(centres, counts)])
    y = torch.cat([torch.full((n,), label) for label, n in enumerate(counts)])
    data = TensorDataset(x, y)
    forget = Subset(data, [i for i in range(len(y)) if int(y[i]) in (0, 3)])
    retain = Subset(data, [i for i in range(len(y)) if int(y[i]) in (1, 2)])
    original = train_classifier(mlp(2), data, epochs=60, seed=0)
    retrained = train_classifier(mlp(2), retain, epochs=60, seed=0)
    assert accuracy(original, forget) > 0.95 and accuracy(retrained, forget) == 0.0
    return forget, retain, original, retrained


def run(clusters, **settings):
    forget, retain, original, retrained = clusters
    unlearner = ErasusUnlearner(original, "npo", settings.pop("selector", "herding"), prune_ratio=0.1,
                                strategy_params={"lr": 1e-2}, epochs=5, copy=True, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ForgettingWarning)
        return unlearner.fit(forget, retain, retrained=retrained)


def test_a_static_coreset_leaves_part_of_the_forget_set_remembered_and_the_verdict_says_so(clusters):
    model, report = run(clusters)
    assert report["adaptive"] is None and report["coreset_size"] == 7
    assert report["verdict"]["reached"] is False and report["verdict"]["final_forget"] > 0.5
    still = Classification().per_sample_forget(model, clusters[0])
    assert int(still.sum()) > 30  # most of the forget set is still classified correctly


@pytest.mark.parametrize("selector", ["herding", "kcenter", "random"])
def test_adaptive_grows_the_coreset_until_the_whole_forget_set_meets_the_target(clusters, selector):
    model, report = run(clusters, adaptive=True, selector=selector)
    rounds = report["adaptive"]["rounds"]
    assert report["adaptive"]["verified"] and report["verdict"]["reached"]
    # it stopped at the first round that verified, and not before: every earlier round still remembered some
    assert [r["verified"] for r in rounds] == [False] * (len(rounds) - 1) + [True]
    assert all(r["remembered"] > 0 for r in rounds[:-1]) and rounds[-1]["remembered"] == 0
    per_sample = Classification().per_sample_forget(model, clusters[0])
    assert float(per_sample.max()) == 0.0  # every forget sample, not only the coreset, is forgotten
    # grown in chunks of the first coreset's size; compute: fewer backward passes than the whole set's epochs
    sizes = [r["coreset_size"] for r in rounds]
    assert sizes[0] == 7 and all(0 < b - a <= 7 for a, b in zip(sizes, sizes[1:]))
    assert report["coreset_size"] == sizes[-1] < len(clusters[0])
    assert report["forget_sample_passes"] < 5 * len(clusters[0])
    assert report["adaptive"]["forward_scoring_passes"] == len(rounds) * len(clusters[0])
    assert report["metrics"]["RA"] > 0.95


def test_adaptive_stops_at_its_round_budget_and_says_it_is_not_verified(clusters):
    _, report = run(clusters, adaptive=True, max_rounds=1)
    assert len(report["adaptive"]["rounds"]) == 1
    assert report["adaptive"]["verified"] is False and report["verdict"]["reached"] is False


def test_adaptive_needs_a_target_and_a_per_sample_score(clusters):
    forget, retain, original, _ = clusters
    with pytest.raises(InvalidInputError, match="adaptive=True verifies the whole forget set against a target"):
        ErasusUnlearner(original, "npo", "herding", copy=True, adaptive=True).fit(forget, retain)
    with pytest.raises(InvalidInputError, match="adaptive_chunk must be greater than 0"):
        ErasusUnlearner(original, "npo", "herding", adaptive=True, adaptive_chunk=0)


def test_verdict_of_a_run_that_forgets_and_of_one_that_does_not(clusters):
    forget, retain, original, retrained = clusters
    _, report = ErasusUnlearner(original, "npo", None, strategy_params={"lr": 1e-2}, epochs=5,
                                copy=True).fit(forget, retain, retrained=retrained)
    verdict = report["verdict"]
    assert verdict["reached"] is True and verdict["progress"] == pytest.approx(1.0, abs=0.02)
    assert verdict["target"]["source"] == "retrained model on the forget set"
    with pytest.warns(ForgettingWarning, match="forgetting barely moved"):
        _, report = ErasusUnlearner(original, "ssd", None, strategy_params={"alpha": 1000.0},
                                    copy=True).fit(forget, retain, retrained=retrained)
    assert report["verdict"]["reached"] is False and report["verdict"]["progress"] < 0.1
    _, report = ErasusUnlearner(original, "npo", None, epochs=1, copy=True).fit(forget, retain)
    assert report["verdict"]["reached"] is None and "no reference" in report["verdict"]["note"]


@pytest.fixture(scope="module")
def digits_class3():
    """The new user's setting: a 64-128-10 digits MLP, class 3 forgotten; retrained on the other classes."""
    from erasus.demo import load_digits_data, split_scenario

    train, test = load_digits_data(0)
    forget, retain = split_scenario(train, "class", forget_class=3, seed=0)
    original = train_classifier(mlp(64, 128, 10), train, epochs=30, seed=0)
    retrained = train_classifier(mlp(64, 128, 10), retain, epochs=30, seed=0)
    return forget, retain, original, retrained


def test_ssd_with_the_paper_alpha_barely_moves_and_auto_alpha_forgets(digits_class3):
    forget, retain, original, retrained = digits_class3
    with pytest.warns(ForgettingWarning):
        _, report = ErasusUnlearner(original, "ssd", None, strategy_params={"alpha": 10.0},
                                    copy=True).fit(forget, retain, retrained=retrained)
    assert report["metrics"]["UA"] < 0.1
    _, report = ErasusUnlearner(original, "ssd", None, strategy_params={"alpha": "auto"},
                                copy=True).fit(forget, retain, retrained=retrained)
    calibration = report["log"]["calibration"]
    assert report["verdict"]["reached"] and report["metrics"]["UA"] == 1.0
    assert calibration["reached"] and calibration["retain_held"] and report["metrics"]["RA"] > 0.95
    # the largest alpha on the search that forgets: every milder grid trial did not
    assert all(not t["reached"] for t in calibration["trials"] if t["alpha"] > calibration["alpha"] * 1.0001)


def test_ssd_auto_alpha_refuses_to_guess_without_a_target_and_checks_its_settings(digits_class3):
    forget, retain, original, _ = digits_class3
    with pytest.raises(InvalidInputError, match='alpha="auto"\\) needs a target'):
        ErasusUnlearner(original, "ssd", None, strategy_params={"alpha": "auto"}, copy=True).fit(forget, retain)
    with pytest.raises(InvalidInputError, match="alpha_range"):
        get_strategy("ssd", alpha="auto", alpha_range=(5.0, 1.0))
    with pytest.raises(InvalidInputError, match="trials"):
        get_strategy("ssd", alpha="auto", trials=0)


def test_a_fault_in_a_later_round_restores_the_model_bit_for_bit(clusters):
    """adaptive=True is still one transaction: an error in round 2 puts the user's model back as it was."""
    forget, retain, original, retrained = clusters
    model = copy.deepcopy(original)  # herding's first coreset leaves samples remembered: a second round runs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unlearner = ErasusUnlearner(model, "npo", "herding", prune_ratio=0.1, strategy_params={"lr": 1e-2}, epochs=5,
                                adaptive=True)
    calls = {"n": 0}
    unlearn = unlearner.strategy.unlearn

    def failing_second_round(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return unlearn(*args, **kwargs)

    unlearner.strategy.unlearn = failing_second_round
    with pytest.raises(RuntimeError, match="disk full"):
        unlearner.fit(forget, retain, retrained=retrained)
    assert calls["n"] == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
