"""Selective Pruning (strategy "selective_pruning", Pochinkov & Schoots 2024), the activation-ratio baseline of
dual_prune: its activation scores against a hand computation on a tiny GPT-2 (padding masked), the top groups'
output-projection columns masked and nothing else, a plain and a peft model, a run through ErasusUnlearner on
lm_scenario("gpt2", 0.25, preset="test", seed=0) (12 authors x 8 questions, 3 forgotten), and bad input."""
import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from erasus import ErasusUnlearner
from erasus.errors import InvalidInputError
from erasus.lm_demo import RUN
from erasus.strategies import get_strategy
from erasus.strategies.pruning import SelectivePruning, load_masks
from erasus.tasks import CausalLM
from erasus.tasks.groups import transformer_groups
from erasus.tasks.lora import apply_lora

HEADS, HEAD_DIM, INNER, LAYERS = 2, 8, 64, 2


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=LAYERS, n_embd=HEADS * HEAD_DIM, n_head=HEADS, n_inner=INNER, vocab_size=40,
                        n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def batches(seed, n_batches=2, size=3, length=7):
    """Token dicts, right-padded: sample i of a batch has length - i real tokens (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 40, (size, length), generator=gen)
        mask = torch.ones(size, length, dtype=torch.long)
        for i in range(size):
            mask[i, length - i:] = 0
        ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def projection_inputs(model, data):
    """{output projection name: [the (B, T, in) input of each batch]}, captured with the test's own hooks."""
    names = [n for n, g in transformer_groups(model).modules.items() if g.axis == "columns"]
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, inp, n=n: seen[n].append(inp[0].detach().clone())) for n in names]
    with torch.no_grad():
        for b in data:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return seen


def hand_scores(model, data):
    """Mean |activation| per group, by explicit loops over the real (attention_mask = 1) tokens."""
    seen = projection_inputs(model, data)
    groups = transformer_groups(model)
    sums = torch.zeros(groups.n_groups, dtype=torch.float64)
    columns = torch.zeros(groups.n_groups, dtype=torch.float64)
    tokens = 0
    for k, b in enumerate(data):
        for i in range(b["input_ids"].shape[0]):
            for t in range(b["input_ids"].shape[1]):
                if b["attention_mask"][i, t] == 0:
                    continue
                tokens += 1
                for name, inputs in seen.items():
                    ids = groups.modules[name].ids
                    sums.index_add_(0, ids, inputs[k][i, t].abs().double())
    for name in seen:
        ids = groups.modules[name].ids
        columns.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return (sums / columns / tokens).float()


def test_activation_scores_match_a_hand_computation_and_ignore_padding():
    model = tiny_model()
    data = batches(1)
    strategy = SelectivePruning(ratio=0.1)
    scores = strategy.activation_importance(model, data)
    groups = transformer_groups(model)
    assert scores.shape == (groups.n_groups,) == (LAYERS * (HEADS + INNER),)
    torch.testing.assert_close(scores, hand_scores(model, data), rtol=1e-5, atol=1e-7)
    # a head group averages its head_dim columns; every group is read by some output projection
    assert bool((scores > 0).all())
    # padding is masked: garbage in the padded positions (and more of them) leaves the scores unchanged
    noisy = []
    for b in data:
        ids = torch.where(b["attention_mask"] == 1, b["input_ids"], torch.full_like(b["input_ids"], 33))
        pad = torch.zeros(ids.shape[0], 3, dtype=torch.long)
        noisy.append({"input_ids": torch.cat([ids, pad + 17], 1), "attention_mask": torch.cat(
            [b["attention_mask"], pad], 1)})
    torch.testing.assert_close(strategy.activation_importance(model, noisy), scores, rtol=1e-5, atol=1e-7)
    # ... while counting them would change them
    unmasked = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["attention_mask"])} for b in noisy]
    assert not torch.allclose(strategy.activation_importance(model, unmasked), scores, rtol=1e-3)


def _expected_top(forget, retain, eps, k):
    score = forget / (retain + torch.tensor(eps, dtype=torch.float32))
    order = sorted(range(len(score)), key=lambda g: (-float(score[g]), g))  # highest first, lowest index at ties
    return sorted(order[:k])


@pytest.mark.parametrize("use_lora", [False, True])
def test_pruning_masks_exactly_the_top_groups_columns(use_lora):
    model = tiny_model()
    if use_lora:
        model = apply_lora(model, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]})
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    forget, retain = batches(2), batches(3, n_batches=3)
    strategy = SelectivePruning(ratio=0.1)
    log = strategy.unlearn(model, forget, retain, task="causal_lm")
    base = model.get_base_model() if use_lora else model
    groups = transformer_groups(base)  # names as the strategy's masks give them: without a peft prefix
    k = math.floor(0.1 * groups.n_groups)
    imp = strategy.importances
    expected = _expected_top(imp["forget"], imp["retain"], strategy.eps, k)
    pruned_ids = [groups.names.index(g) for g in strategy.pruned_groups]
    assert log["pruned"] == k == len(pruned_ids) and sorted(pruned_ids) == expected
    assert set(strategy.mask_axes.values()) == {"columns"}   # the output projections only
    assert len(strategy.masks) == 2 * LAYERS
    for n, p in model.named_parameters():  # masks, not weight edits
        assert torch.equal(p, weights[n]), n
    # the projections now see zeros in exactly the pruned groups' columns (their inputs, after the mask hook)
    seen = projection_inputs(base, forget)
    for name in strategy.masks:
        if use_lora:
            assert type(base.get_submodule(name)).__module__.startswith("peft")
        ids = groups.modules[name].ids
        dropped = torch.isin(ids, torch.tensor(expected))
        assert torch.equal(strategy.masks[name], ~dropped)
        x = torch.cat([t.flatten(0, 1) for t in seen[name]])
        assert torch.count_nonzero(x[:, dropped]) == 0, name
        assert bool((x[:, ~dropped].abs().sum(0) > 0).all()), name
    with strategy.unmasked():  # the masks are revertible
        seen = projection_inputs(base, forget)
    assert all(bool((torch.cat([t.flatten(0, 1) for t in v]).abs().sum(0) > 0).all()) for v in seen.values())
    strategy.remove_masks()
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_the_merged_export_equals_the_masked_model(tmp_path):
    model = tiny_model()
    strategy = SelectivePruning(ratio=0.2)
    strategy.unlearn(model, batches(2), batches(3), task="causal_lm")
    probe = batches(4)[0]
    with torch.no_grad():
        masked = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    loaded = load_masks(strategy.save_masks(tmp_path / "masks.safetensors"))
    assert all(torch.equal(loaded[n], m) for n, m in strategy.masks.items())
    merged = strategy.apply_masks_to_weights(copy.deepcopy(model), loaded)
    strategy.remove_masks()
    with torch.no_grad():
        exported = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        plain = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(exported, masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, masked, atol=1e-4)


@pytest.fixture(scope="module")
def scenario(erasus_cache):
    from erasus.data.lm_models import lm_scenario

    return lm_scenario("gpt2", 0.25, preset="test", seed=0)


def test_selective_pruning_through_the_unlearner_raises_the_forget_nll(scenario):
    s = scenario
    unlearner = ErasusUnlearner(s["original"], strategy="selective_pruning", selector=None, prune_ratio=1.0,
                                strategy_params={"ratio": 0.2}, copy=True, seed=0, task=CausalLM(mias=()), **RUN)
    model, report = unlearner.fit(s["forget"], s["retain"], retrained=s["retrained"])
    m, orig, retr = report["metrics"], report["original"], report["retrained"]
    context = (m, orig, retr)
    # measured (seed 0, ratio 0.2): forget NLL 0.031 -> 0.107 (retrained 0.98), forget QA 1.0 -> 0.79, retain QA
    # 1.0 -> 0.90: activation ratios on this corpus forget some, far from the retrained model
    assert report["training_free"] and report["forget_sample_passes"] == len(s["forget"]) == 24
    assert report["guard"]["stopped"] is None
    assert m["forget_nll"] > 2 * orig["forget_nll"], context
    assert m["forget_nll"] < retr["forget_nll"], context
    assert m["forget_qa_acc"] < orig["forget_qa_acc"], context
    assert m["retain_qa_acc"] >= 0.8, context
    n_groups = transformer_groups(model).n_groups
    assert report["log"]["pruned"] == len(unlearner.strategy.pruned_groups) == math.floor(0.2 * n_groups)


@pytest.mark.parametrize("params, named", [
    ({"ratio": 0.0}, "ratio"), ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": 1.5}, "ratio"),
    ({"ratio": True}, "ratio"), ({"ratio": "0.1"}, "ratio"), ({"eps": 0.0}, "eps"), ({"eps": -1e-5}, "eps"),
])
def test_bad_parameters_are_refused_by_name(params, named):
    with pytest.raises(InvalidInputError, match=named):
        get_strategy("selective_pruning", **params)


def test_bad_models_and_data_are_refused():
    with pytest.raises(InvalidInputError, match="causal_lm"):
        ErasusUnlearner(torch.nn.Linear(4, 2), strategy="selective_pruning", selector=None)
    model = tiny_model()
    with pytest.raises(InvalidInputError, match="retain"):
        SelectivePruning().unlearn(model, batches(1), None, task="causal_lm")
    model.config.n_head = 3  # 16 hidden does not split into 3 heads' layout
    with pytest.raises(InvalidInputError, match="model: selective_pruning cannot map"):
        SelectivePruning().unlearn(model, batches(1), batches(2), task="causal_lm")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
