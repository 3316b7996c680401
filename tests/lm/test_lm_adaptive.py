"""The verified adaptive coreset on a causal LM: the whole forget set's answer NLL is checked forward-only after
each round (per sample: ``CausalLM.per_sample_forget``), and the still-remembered authors' questions are added."""
import pytest
import torch

from erasus import ErasusUnlearner
from erasus.lm_demo import RUN
from erasus.tasks import CausalLM


@pytest.fixture(scope="module")
def scenario(erasus_cache):
    from erasus.data.lm_models import lm_scenario

    return lm_scenario("gpt2", 0.25, preset="test", seed=0)


def test_per_sample_forget_is_the_answer_nll_whose_mean_is_the_curve(scenario):
    task = CausalLM(generation=False, mias=())
    values = task.per_sample_forget(scenario["original"], scenario["forget"])
    assert values.shape == (len(scenario["forget"]),)
    curve = task.curve(scenario["original"], scenario["forget"], scenario["retain"])["forget"]
    assert float(values.mean()) == pytest.approx(curve, rel=1e-6)


def test_adaptive_coreset_on_an_lm_grows_until_the_forget_nll_reaches_the_retrained_model(scenario):
    s = scenario
    run = {k: v for k, v in RUN.items() if k != "stop_at_target"}
    _, report = ErasusUnlearner(s["original"], strategy="graddiff", selector="kcenter", prune_ratio=0.25,
                                strategy_params={"lr": 3e-4, "retain_weight": 5.0}, copy=True, seed=0,
                                task=CausalLM(generation=False, mias=()), adaptive=True, max_rounds=4,
                                stop_at_target=True, **run).fit(s["forget"], s["retain"], test=s["holdout"],
                                                                retrained=s["retrained"])
    rounds = report["adaptive"]["rounds"]
    target = report["verdict"]["target"]["value"]
    assert report["verdict"]["target"]["source"] == "retrained model on the forget set"
    # each round's check is the whole forget set's NLL; it stops at the first round that reaches the target
    assert [r["verified"] for r in rounds] == [r["forget"] >= target for r in rounds]
    assert rounds[-1]["verified"] or len(rounds) == 4
    assert all(not r["verified"] for r in rounds[:-1])
    assert report["adaptive"]["verified"] == report["verdict"]["reached"]
    assert rounds[0]["coreset_size"] == report["coreset_size"] if len(rounds) == 1 else \
        rounds[-1]["coreset_size"] == report["coreset_size"] > rounds[0]["coreset_size"]
    assert report["adaptive"]["forward_scoring_passes"] == len(rounds) * len(s["forget"])
    assert torch.isfinite(torch.tensor(report["metrics"]["forget_nll"]))
