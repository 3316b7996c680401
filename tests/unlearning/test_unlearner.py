import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset, TensorDataset

from erasus import ErasusUnlearner, errors
from erasus.strategies import GradDiff, TrainingGuard


def small():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(80, 6), torch.randint(0, 3, (80,))
    return model, TensorDataset(x, y)


def test_in_place_by_default_and_copy_leaves_the_model_alone():
    model, data = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forget, retain = Subset(data, range(10)), Subset(data, range(10, 80))
    new, _ = ErasusUnlearner(model, strategy="graddiff", selector="kcenter", prune_ratio=0.5, copy=True,
                             epochs=2).fit(forget, retain)
    assert new is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same, _ = ErasusUnlearner(model, strategy="graddiff", selector="kcenter", prune_ratio=0.5, epochs=2
                              ).fit(forget, retain)
    assert same is model and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_coreset_size_cost_and_remainder_are_reported():
    model, data = small()
    forget, retain = Subset(data, range(20)), Subset(data, range(20, 80))
    _, report = ErasusUnlearner(model, strategy="npo", selector="herding", prune_ratio=0.25, epochs=3, batch_size=4,
                                copy=True).fit(forget, retain)
    assert report["coreset_size"] == 5 and report["forget_size"] == 20
    assert report["forget_sample_passes"] == 15  # 5 samples x 3 epochs
    assert "UA_unselected" in report["metrics"]
    assert len(report["curves"]["forget"]) == 3


def test_report_folder_holds_json_markdown_plots_and_safetensors(tmp_path):
    model, data = small()
    forget, retain = (data.tensors[0][:10], data.tensors[1][:10]), DataLoader(Subset(data, range(10, 80)))
    gen = torch.Generator().manual_seed(1)
    test = TensorDataset(torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen))
    out = tmp_path / "run"
    _, report = ErasusUnlearner(model, strategy="graddiff", selector="random", prune_ratio=0.5, copy=True,
                                out_dir=out).fit(forget, retain, test=test, retrained=model)
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "loss.png", "accuracy.png",
                                               "model.safetensors"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"]["TA"] == pytest.approx(report["metrics"]["TA"]) and "avg_gap" in saved
    assert "| unlearned |" in (out / "report.md").read_text()
    assert set(load_file(str(out / "model.safetensors"))) == set(dict(model.named_parameters()))


class NaNAtStep(GradDiff):
    """GradDiff whose loss turns NaN at one step (as a diverging run would)."""

    def __init__(self, bad_step, **kw):
        super().__init__(**kw)
        self.bad_step, self.calls = bad_step, 0

    def method_loss(self, model, fb, rb):
        self.calls += 1
        loss = super().method_loss(model, fb, rb)
        return loss * float("nan") if self.calls == self.bad_step else loss


def test_nan_mid_run_restores_the_last_good_state_bit_for_bit():
    model, data = small()
    forget, retain = Subset(data, range(16)), Subset(data, range(16, 80))
    states = {}
    strategy = NaNAtStep(bad_step=5, lr=1e-2)
    guard = TrainingGuard(model, snapshot_every=1)
    log = strategy.unlearn(model, DataLoader(forget, batch_size=2), DataLoader(retain, batch_size=2), epochs=3,
                           guard=guard, on_step=lambda info: states.__setitem__(
                               info["step"], {k: v.clone() for k, v in model.state_dict().items()}))
    assert log["stopped"] == "loss is nan" and log["steps"] == 4
    assert guard.events == [{"step": 5, "reason": "loss is nan", "restored_to_step": 4}]
    assert all(torch.equal(states[4][k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exploding_weights_are_caught_and_reported():
    model, data = small()
    forget, retain = Subset(data, range(16)), Subset(data, range(16, 80))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = ErasusUnlearner(model, strategy="ga", selector=None, prune_ratio=1.0, epochs=50, batch_size=4,
                                strategy_params={"lr": 10.0, "optimizer": "sgd"}, copy=True).fit(forget, retain)
    # lr = 10 gradient ascent: the weights' norm passes 100x its start within a few steps, before any NaN
    stopped = report["guard"]["stopped"]
    ratio = re.fullmatch(r"weights exploded \(norm [0-9.e+]+, (\d+)x the original\)", stopped or "")
    assert ratio is not None and int(ratio.group(1)) > 100, stopped
    (event,) = report["guard"]["events"]
    assert event["reason"] == stopped and event["restored_to_step"] == event["step"] - 1  # snapshot_every = 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m, d: ErasusUnlearner(m).fit(Subset(d, range(10)), Subset(d, range(5, 80))),
         errors.InvalidInputError, "overlap in 5 samples"),
        (lambda m, d: ErasusUnlearner(m).fit((d.tensors[0][:10], d.tensors[1][:10]), (d.tensors[0], d.tensors[1])),
         errors.InvalidInputError, "share 10 identical input rows"),
        (lambda m, d: ErasusUnlearner(m).fit(Subset(d, []), Subset(d, range(5, 80))), errors.EmptyInputError,
         "forget set is empty"),
        (lambda m, d: ErasusUnlearner(m).fit(Subset(d, range(5)), Subset(d, [])), errors.EmptyInputError,
         "retain set is empty"),
        (lambda m, d: ErasusUnlearner(m).fit((d.tensors[0][:5], d.tensors[1][:4]), Subset(d, range(5, 80))),
         errors.InvalidInputError, "different lengths"),
        (lambda m, d: ErasusUnlearner(m).fit([1, 2, 3], Subset(d, range(5, 80))), errors.InvalidInputError,
         "forget must be a Dataset"),
        (lambda m, d: ErasusUnlearner(m, prune_ratio=0.0), errors.InvalidInputError, "prune_ratio"),
        (lambda m, d: ErasusUnlearner(m, strategy="retrain"), errors.InvalidInputError, "unknown strategy"),
        (lambda m, d: ErasusUnlearner("model"), errors.InvalidInputError, "torch.nn.Module"),
        (lambda m, d: ErasusUnlearner(m, strategy="npo", strategy_params={"beta": 0}), errors.InvalidInputError,
         "beta must be positive"),
        (lambda m, d: ErasusUnlearner(m, strategy="graddiff", strategy_params={"anchor": "logits"}),
         errors.InvalidInputError, "anchor must be one of"),
    ],
)
def test_bad_input_gets_a_clear_error(make, error, match):
    model, data = small()
    with pytest.raises(error, match=match):
        make(model, data)


def test_guard_accepts_a_model_that_starts_at_zero():
    model = torch.nn.Linear(6, 3)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    _, data = small()
    _, report = ErasusUnlearner(model, strategy="graddiff", selector=None, prune_ratio=1.0, epochs=1,
                                copy=True).fit(Subset(data, range(10)), Subset(data, range(10, 80)))
    assert report["guard"]["stopped"] is None


def test_salun_mask_keeps_exactly_the_requested_share_even_with_tied_saliencies():
    from erasus.strategies import SalUn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = torch.randn(40, 8)
    x[:, 4:] = 0.0  # half the inputs are always zero: their weights get exactly zero saliency
    y = torch.randint(0, 3, (40,))
    strategy = SalUn(mask_ratio=0.3)
    strategy.prepare(model, DataLoader(TensorDataset(x, y), batch_size=8), None)
    total = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in strategy.masks.values()) == round(0.3 * total)
