"""Dual-sensitivity LoRA pruning (strategy "dual_prune") on the tiny LM corpus: it forgets the forget authors to
the retrained model's band while retain QA holds its floor; a round that would cross the floor is undone; masks
hold under an optimiser with momentum and weight decay, export merged and round-trip through safetensors; bad
input is refused. Scenario: lm_scenario("gpt2", 0.25, preset="test", seed=0) (12 authors x 8 questions, 3
forgotten), LoRA r = 8 on c_attn / c_proj / c_fc, unlearning seed 0."""
import copy

import pytest
import torch

from erasus import ErasusUnlearner
from erasus.errors import ErasusError, InvalidInputError
from erasus.lm_demo import RUN, lora_config
from erasus.strategies import get_strategy
from erasus.strategies.pruning import DualSensitivityPruning, load_masks
from erasus.tasks import CausalLM
from erasus.tasks.lora import apply_lora

FORGET_NLL_BAND = (0.4, 3.0)  # as tests/lm/test_lm_unlearning.py: multiples of the retrained model's forget NLL
RETAIN_QA_FLOOR = 0.9
PARAMS = {"lr": 2e-3, "forget_loss": "ga", "retain_weight": 5.0, "prune_every": 5, "round_ratio": 0.02,
          "min_retain": ("retain_qa_acc", RETAIN_QA_FLOOR), "retain_eval_size": 24}


@pytest.fixture(scope="module")
def scenario(erasus_cache):
    from erasus.data.lm_models import lm_scenario

    return lm_scenario("gpt2", 0.25, preset="test", seed=0)


def _unlearner(s, params, **run):
    return ErasusUnlearner(s["original"], strategy="dual_prune", selector=None, prune_ratio=1.0,
                           strategy_params=params, lora=lora_config("gpt2"), copy=True, seed=0,
                           task=CausalLM(mias=()), **{**RUN, **run})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dual_prune_run")


@pytest.fixture(scope="module")
def forgetting_run(scenario, run_dir):
    s = scenario
    unlearner = _unlearner(s, PARAMS, out_dir=run_dir, save_merged=True)
    model, report = unlearner.fit(s["forget"], s["retain"], retrained=s["retrained"])
    return unlearner.strategy, model, report


def test_the_run_exports_its_masks_and_a_pruned_merged_model(forgetting_run, run_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    strategy, _, report = forgetting_run
    assert report["log"]["pruning"]["rounds"] == strategy.pruning_report["rounds"]  # kept through the early stop
    saved = load_file(str(run_dir / "masks.safetensors"))
    assert saved.keys() == strategy.masks.keys()
    assert all(torch.equal(saved[k], v) for k, v in strategy.masks.items())
    merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), local_files_only=True)
    modules = dict(merged.named_modules())
    pruned_somewhere = False
    for name, keep in strategy.masks.items():
        weight = modules[name].weight  # GPT-2 Conv1D: stored (in, out); rows of the logical (out x in) = columns
        logical = weight.T if type(modules[name]).__name__ == "Conv1D" else weight
        dropped = logical[~keep] if strategy.mask_axes[name] == "rows" else logical[:, ~keep]
        assert torch.count_nonzero(dropped) == 0, name
        pruned_somewhere |= bool((~keep).any())
    assert pruned_somewhere


def test_dual_prune_forgets_while_retain_holds_its_floor(forgetting_run, scenario):
    strategy, _, report = forgetting_run
    m, orig, retr = report["metrics"], report["original"], report["retrained"]
    context = (m, orig, retr, report["early_stop"], strategy.pruning_report["stopped"])
    assert report["guard"]["stopped"] is None and report["early_stop"]["reached"], context
    low, high = FORGET_NLL_BAND
    assert low * retr["forget_nll"] <= m["forget_nll"] <= high * retr["forget_nll"], context
    assert m["forget_qa_acc"] <= retr["forget_qa_acc"] + 0.25, context
    assert m["retain_qa_acc"] >= RETAIN_QA_FLOOR, context
    rounds = strategy.pruning_report["rounds"]
    assert rounds and strategy.pruning_report["undone"] is None
    assert all(r["retain_metric"]["retain_qa_acc"] >= RETAIN_QA_FLOOR for r in rounds)
    pruned = [g for r in rounds for g in r["groups"]]
    assert sorted(pruned) == sorted(strategy.pruned_groups) and len(set(pruned)) == len(pruned)
    assert all(len(r["groups"]) >= 1 for r in rounds)


def test_a_round_that_crosses_the_floor_is_undone(scenario):
    s = scenario
    # pruning half the groups at once costs far more than 1 point of retain QA (the original has 1.0)
    params = {**PARAMS, "forget_loss": "none", "prune_every": 1, "round_ratio": 0.5, "max_pruned": 0.9,
              "min_retain": ("retain_qa_acc", 0.99)}
    unlearner = _unlearner(s, params, epochs=1, stop_at_target=False)
    model, report = unlearner.fit(s["forget"], s["retain"])
    pr = unlearner.strategy.pruning_report
    assert pr["rounds"] == [] and pr["undone"] is not None, pr
    assert pr["undone"]["step"] == 1 and len(pr["undone"]["groups"]) >= 100
    assert pr["undone"]["retain_metric"]["retain_qa_acc"] < 0.99
    assert "retain floor" in pr["stopped"]
    # the undone round left nothing pruned, and pruning stopped for the rest of the run (3 steps)
    assert unlearner.strategy.pruned_groups == []
    assert all(bool(mask.all()) for mask in unlearner.strategy.masks.values())
    assert report["metrics"]["retain_qa_acc"] >= 0.99


def _masked_outputs(model, strategy):
    """{module name: its output (row masks) or input (column masks) as the module sees it} on one batch."""
    seen, handles = {}, []
    base = model.get_base_model()
    for name, axis in strategy.mask_axes.items():
        module = base.get_submodule(name)
        if axis == "rows":
            handles.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: seen.__setitem__(name, out.detach())))
        else:  # registered after the mask's pre-hook: sees the masked input
            handles.append(module.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.__setitem__(name, inp[0].detach())))
    return seen, handles


def test_masks_hold_under_momentum_and_weight_decay(forgetting_run, scenario):
    strategy, model, _ = forgetting_run
    model = copy.deepcopy(model)  # the hooks travel with the deep copy (they close over the strategy's masks)
    masks = strategy.masks
    assert any(not bool(m.all()) for m in masks.values())
    batch = s_batch(scenario)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                          weight_decay=0.1)
    model.train()
    for _ in range(4):  # large steps on a loss that would use every row: the masked rows still give nothing
        opt.zero_grad()
        model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["labels"]).loss.backward()
        opt.step()
    seen, handles = _masked_outputs(model, strategy)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for h in handles:
        h.remove()
    lora_moved = 0
    for name, kept in masks.items():
        assert torch.count_nonzero(seen[name][..., ~kept]) == 0, name
        assert torch.count_nonzero(seen[name][..., kept]) > 0, name
    for n, p in model.named_parameters():
        if "lora_B" in n:
            lora_moved += int(torch.count_nonzero(p))
    assert lora_moved > 0
    # the merged export with the masks written into the weights gives the same logits without any hook
    merged = copy.deepcopy(model).merge_and_unload()
    strategy.apply_masks_to_weights(merged)
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged_logits, logits, atol=1e-4, rtol=1e-4)
    unmasked = copy.deepcopy(model).merge_and_unload()  # without the masks the logits differ
    with torch.no_grad():
        plain = unmasked(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(plain, logits, atol=1e-3)


def s_batch(s):
    return s["retain"].collate([s["retain"][i] for i in range(8)])


def test_save_masks_round_trips(forgetting_run, tmp_path):
    strategy, _, _ = forgetting_run
    path = strategy.save_masks(tmp_path / "masks.safetensors")
    loaded = load_masks(path)
    assert loaded.keys() == strategy.masks.keys()
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], v) for k, v in strategy.masks.items())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["pruned_groups"].split(",") == strategy.pruned_groups


def test_hooks_are_removed_when_the_run_fails(scenario):
    s = scenario
    model = apply_lora(copy.deepcopy(s["original"]), lora_config("gpt2"))
    strategy = DualSensitivityPruning(**{**PARAMS, "min_retain": None})
    calls = {"n": 0}

    def fail(info):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    loader = CausalLM().loader(s["forget"], 8, shuffle=False)
    retain = CausalLM().loader(s["retain"], 8, shuffle=False)
    with pytest.raises(RuntimeError, match="boom"):
        strategy.unlearn(model, loader, retain, on_step=fail)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("params, named", [
    ({"eps": 0.0}, "eps"), ({"eps": -1e-3}, "eps"), ({"round_ratio": 0.0}, "round_ratio"),
    ({"round_ratio": 1.0}, "round_ratio"), ({"max_pruned": 1.5}, "max_pruned"), ({"max_pruned": 0}, "max_pruned"),
    ({"min_retain": ("retain_bleu", 0.5)}, "retain_bleu"), ({"min_retain": "retain_nll"}, "min_retain"),
    ({"prune_every": 0}, "prune_every"), ({"forget_loss": "kl"}, "forget_loss"), ({"beta": 1.0}, "beta"),
])
def test_bad_parameters_are_refused_by_name(params, named):
    with pytest.raises(InvalidInputError, match=named):
        get_strategy("dual_prune", **params)


def test_a_model_without_lora_is_refused(scenario):
    s = scenario
    with pytest.raises(InvalidInputError, match="no LoRA layers"):
        ErasusUnlearner(s["original"], strategy="dual_prune", selector=None, prune_ratio=1.0, copy=True,
                        epochs=1, batch_size=8).fit(s["forget"], s["retain"])


def test_a_model_the_groups_cannot_map_is_refused(scenario):
    s = scenario
    model = apply_lora(copy.deepcopy(s["original"]), lora_config("gpt2"))
    model.get_base_model().config.n_head = 5  # 64 hidden does not split into 5 heads' layout
    strategy = DualSensitivityPruning(min_retain=None)
    loader = CausalLM().loader(s["forget"], 8, shuffle=False)
    with pytest.raises(ErasusError, match="model: dual_prune cannot map"):
        strategy.unlearn(model, loader, CausalLM().loader(s["retain"], 8, shuffle=False))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_the_strategy_refuses_non_lm_tasks():
    with pytest.raises(InvalidInputError, match="causal_lm"):
        ErasusUnlearner(torch.nn.Linear(4, 2), strategy="dual_prune", selector=None)
