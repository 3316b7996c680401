"""Issue 9's defect classes, each as a hostile user would hit it: bad settings from Python and from YAML, bad
labels, frozen models, detached losses, NaN logits, out_dir mistakes, a previous run, truncated caches; and a
property-based test over the config loader (every generated config is either accepted with the values it says or
refused with an ErasusError naming a key)."""
import json
import math
import warnings

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Subset, TensorDataset

import erasus.ops
from erasus import ErasusUnlearner, errors
from erasus.cli import main, read_config
from erasus.settings import ClassificationConfig, UnlearnerSettings, validate
from erasus.strategies.gradient import GradDiff


def small(seed=0, classes=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))
    x, y = torch.randn(80, 6), torch.randint(0, classes, (80,))
    return model, TensorDataset(x, y)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------- settings from Python
@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs must be greater than 0, got 0"),
    ({"epochs": -3}, "epochs must be greater than 0, got -3"),
    ({"epochs": 2.0}, "epochs must be an integer, got 2.0"),
    ({"epochs": True}, "epochs must be an integer, got True"),
    ({"batch_size": 0}, "batch_size must be greater than 0"),
    ({"prune_ratio": True}, "prune_ratio must be a number, got True"),
    ({"prune_ratio": 1.5}, "prune_ratio must be at most 1"),
    ({"prune_ratio": float("nan")}, "prune_ratio must be a finite number"),
    ({"eval_every": 0}, "eval_every must be greater than 0"),
    ({"retain_batch_size": "8"}, "retain_batch_size must be an integer, got '8'"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"copy": "yes"}, "copy must be true or false, got 'yes'"),
    ({"out_dir": ""}, "out_dir must name a folder"),
    ({"out_dir": 3}, "out_dir must be a string or must be a Path, got 3"),
    ({"strategy_params": [("lr", 1)]}, "strategy_params must be a mapping"),
    ({"strategy": 42}, r"strategy must be a registered name \[.*\] or a Strategy, got int"),
    ({"selector": 3.0}, r"selector must be a registered name \[.*\], a Selector or None, got float"),
    ({"strategy_params": {"betta": 0.1}}, r"strategy 'npo' takes no parameter 'betta'; its parameters are \[.*'beta'"),
    ({"selector": "kcenter", "selector_params": {"metrik": "l2"}},
     r"selector 'kcenter' takes no parameter 'metrik'; its parameters are \[.*'metric'"),
])
def test_every_bad_setting_is_an_error_naming_it(kwargs, match):
    model, _ = small()
    with pytest.raises(errors.InvalidInputError, match=match):
        ErasusUnlearner(model, **kwargs)


def test_fit_epochs_override_is_checked_like_the_setting():
    model, data = small()
    before = state(model)
    with pytest.raises(errors.InvalidInputError, match="epochs must be greater than 0"):
        ErasusUnlearner(model, strategy="ga", selector=None, prune_ratio=1.0).fit(
            Subset(data, range(8)), Subset(data, range(8, 80)), epochs=0)
    assert same(model, before)


@pytest.mark.parametrize("label, match", [
    (7, r"labels must lie in \[0, 2\] for a model with 3 outputs, got values in \[0, 7\]"),
    (-1, r"labels must lie in \[0, 2\] for a model with 3 outputs, got values in \[-1, 2\]"),
])
def test_bad_labels_are_refused_before_the_model_moves(label, match):
    model, data = small()
    y = data.tensors[1].clone()
    y[70] = label
    data = TensorDataset(data.tensors[0], y)
    before = state(model)
    with pytest.raises(errors.InvalidInputError, match=match):
        ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=5, batch_size=8).fit(
            Subset(data, range(8)), Subset(data, range(8, 80)))
    assert same(model, before)


@pytest.mark.parametrize("labels, match", [
    (lambda y: y.float(), r"labels must be a 1-D integer tensor of class indices, got dtype torch.float32"),
    (lambda y: torch.stack([y, y], dim=1), r"labels must be a 1-D integer tensor .* shape \(\d+, 2\)"),
])
def test_float_and_2d_labels_are_refused(labels, match):
    model, data = small()
    data = TensorDataset(data.tensors[0], labels(data.tensors[1]))
    with pytest.raises(errors.InvalidInputError, match=match):
        ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1).fit(
            Subset(data, range(8)), Subset(data, range(8, 80)))


def test_a_frozen_model_is_refused_by_name():
    model, data = small()
    model.requires_grad_(False)
    with pytest.raises(errors.InvalidInputError, match="no trainable parameters"):
        ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1).fit(
            Subset(data, range(8)), Subset(data, range(8, 80)))


class DetachedLoss(GradDiff, name=None):
    """A user's strategy whose loss is cut from the graph."""

    def loss(self, model, forget_batch, retain_batch=None, original=None):
        return super().loss(model, forget_batch, retain_batch, original).detach()


def test_a_loss_that_does_not_depend_on_the_trainable_parameters_is_refused_and_nothing_moves():
    model, data = small()
    before = state(model)
    with pytest.raises(errors.ErasusError, match="loss does not depend on any trainable parameter"):
        ErasusUnlearner(model, DetachedLoss(), selector=None, prune_ratio=1.0, epochs=1).fit(
            Subset(data, range(8)), Subset(data, range(8, 80)))
    assert same(model, before) and model.training


def test_nan_logits_in_mc_fisher_are_an_error():
    model, data = small()
    with pytest.raises(errors.NonFiniteError):
        erasus.ops.fisher_diagonal(model, [data.tensors], mode="mc",
                                   logits_fn=lambda m, b: m(b[0]) * float("nan"), seed=0)


def test_fit_restores_the_train_mode_it_found():
    model, data = small()
    model.train()
    ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1).fit(
        Subset(data, range(8)), Subset(data, range(8, 80)))
    assert model.training
    model.eval()
    ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1).fit(
        Subset(data, range(8)), Subset(data, range(8, 80)))
    assert not model.training


# ----------------------------------------------------------------------------------------------- out_dir
def test_out_dir_is_checked_before_any_work_and_a_previous_run_is_kept(tmp_path):
    model, data = small()
    forget, retain = Subset(data, range(8)), Subset(data, range(8, 80))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    before = state(model)
    with pytest.raises(errors.InvalidInputError, match="is not writable"):
        ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1, out_dir=blocker / "run").fit(
            forget, retain)
    assert same(model, before)
    run = tmp_path / "run"
    ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1, out_dir=run, copy=True).fit(
        forget, retain)
    first = (run / "report.json").read_bytes()
    with pytest.raises(errors.InvalidInputError, match="holds a previous run's report; pass overwrite=True"):
        ErasusUnlearner(model, "ga", selector=None, prune_ratio=1.0, epochs=1, out_dir=run).fit(forget, retain)
    assert (run / "report.json").read_bytes() == first and same(model, before)
    ErasusUnlearner(model, "ga", selector=None, prune_ratio=1.0, epochs=1, out_dir=run, overwrite=True,
                    copy=True).fit(forget, retain)
    assert (run / "report.json").read_bytes() != first


def test_report_names_the_strategy_not_the_model_and_no_prune_ratio_without_a_selector():
    model, data = small()
    _, report = ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1, copy=True).fit(
        Subset(data, range(8)), Subset(data, range(8, 80)))
    assert report["strategy"] == "graddiff" and "\n" not in str(report["strategy_params"])
    assert "Sequential" not in str(report["strategy_params"])
    from erasus.report import markdown
    text = markdown(report)
    assert "prune_ratio" not in text and "Sequential(" not in text


def test_a_training_free_run_reports_no_epochs_and_no_forget_passes():
    model, data = small()
    _, report = ErasusUnlearner(model, "ssd", selector=None, prune_ratio=1.0, epochs=5, copy=True).fit(
        Subset(data, range(8)), Subset(data, range(8, 80)))
    from erasus.report import markdown
    text = markdown(report)
    assert "one training-free pass" in text and "5 epochs" not in text


# ------------------------------------------------------------------------------------------- YAML configs
def run_config(tmp_path, text, capsys, *extra):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    code = main(["unlearn", "--config", str(path), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("epochs: five\n", "config key epochs must be an integer, got 'five'"),
    ("epochs: 2.5\n", "config key epochs must be an integer, got 2.5"),
    ("forget_fraction: 0\nscenario: random\n", "config key forget_fraction must be greater than 0"),
    ("prune_ratio: true\n", "config key prune_ratio must be a number, got True"),
    ("out_dir: null\n", "config key out_dir must be a string, got None"),
    ("out_dir: ''\n", "config key out_dir must name a folder, got ''"),
    ("scenario: classes\n", "config key scenario must be one of 'class' or 'random', got 'classes'"),
    ("strategy: [npo]\n", "config key strategy must be a string"),
    ("task: vision\n", "task must be 'classification' or 'causal_lm', got 'vision'"),
    ("epochs: [1\n", "not valid YAML"),
    ("- a\n- b\n", "the config must be a mapping"),
    ("task: causal_lm\narch: gpt3\n", "config key arch must be one of 'gpt2' or 'llama', got 'gpt3'"),
    ("task: causal_lm\ndata: {forget: f.jsonl}\n", "config key data.retain is required"),
    ("task: causal_lm\ndata: {forget: f.jsonl, retain: r.jsonl, test: t.jsonl}\n",
     "config key 'data.test' is unknown (known: forget, holdout, retain)"),
    ("task: causal_lm\nforget_class: 3\n", "config key 'forget_class' is unknown"),
    ("strategy_params: {betta: 1e-3}\nepochs: 1\n", "betta"),
])
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, capsys, text, message):
    code, err = run_config(tmp_path, text, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "erasus-run").exists()


def test_a_missing_config_file_is_exit_code_2(tmp_path, capsys):
    assert main(["unlearn", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_yaml_number_strings_are_numbers_where_a_number_is_wanted(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: '2'\nstrategy_params: {lr: 1e-3, anchor: outputs}\nprune_ratio: 5e-1\n"
                    "out_dir: '2024'\nforget_fraction: 1e-1\n")
    config = read_config(str(path))
    assert config.epochs == 2 and config.prune_ratio == 0.5 and config.forget_fraction == 0.1
    assert config.strategy_params == {"lr": 1e-3, "anchor": "outputs"} and config.out_dir == "2024"


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    out = capsys.readouterr().out
    assert all(key in out for key in ClassificationConfig.model_fields)


def test_a_previous_cli_run_is_refused_without_overwrite(tmp_path, capsys, erasus_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "strategy: ga\nselector: null\nprune_ratio: 1.0\nepochs: 1\nout_dir: run\nscenario: random\n"
    assert run_config(tmp_path, text, capsys)[0] == 0
    first = (tmp_path / "run" / "report.json").read_bytes()
    report = json.loads(first)
    assert report["scenario"] == {"data": "scikit-learn digits", "scenario": "random", "forget_fraction": 0.1}
    assert abs(report["forget_fraction"] - 0.1) < 0.01
    assert "Scenario: data scikit-learn digits, scenario random, forget_fraction 0.1; forget" in \
        (tmp_path / "run" / "report.md").read_text()
    code, err = run_config(tmp_path, text, capsys)
    assert code == 2 and "previous run" in err and (tmp_path / "run" / "report.json").read_bytes() == first
    assert run_config(tmp_path, text, capsys, "--overwrite")[0] == 0


def test_a_truncated_cache_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    from erasus.demo import cached_model, digits_mlp

    monkeypatch.setenv("ERASUS_CACHE", str(tmp_path))
    trained = []

    def train(model):
        trained.append(1)
        torch.nn.init.constant_(model[0].weight, 0.5)

    first = cached_model("probe", digits_mlp, train)
    path = tmp_path / "probe.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="could not be loaded"):
        again = cached_model("probe", digits_mlp, train)
    assert len(trained) == 2 and torch.equal(again[0].weight, first[0].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_model("probe", digits_mlp, train)
    assert len(trained) == 2


# ---------------------------------------------------------------------------------- the config loader, fuzzed
KEYS = sorted(ClassificationConfig.model_fields)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["npo", "random", "class", "kcenter", "1e-3", "five", "", "0.5", "nan", "run"]),
                   st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from(["lr", "x"]),
                                                                               st.floats(0, 1), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.dictionaries(st.sampled_from(KEYS + ["extra_key"]), VALUES, max_size=5))
def test_the_config_loader_accepts_exactly_the_valid_configs(tmp_path, config):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        loaded = read_config(str(path))
    except errors.ErasusError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ")
        assert any(key in message for key in config) or "task must be" in message
        return
    # accepted: every value given is the value loaded (numbers from number-like strings), within range
    for key, value in config.items():
        got = getattr(loaded, key)
        if isinstance(value, str) and isinstance(got, (int, float)):
            assert got == float(value)
        else:
            assert got == value
    assert loaded.epochs >= 1 and loaded.batch_size >= 1 and 0 < loaded.prune_ratio <= 1
    assert 0 < loaded.forget_fraction < 1 and 0 <= loaded.forget_class <= 9
    assert math.isfinite(loaded.prune_ratio) and loaded.out_dir.strip()
    assert validate(UnlearnerSettings, {"epochs": loaded.epochs, "prune_ratio": loaded.prune_ratio}).epochs



class Records(torch.utils.data.Dataset):
    """A user's own Dataset class (not a TensorDataset, not a Subset)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_overlap_is_found_in_custom_datasets_by_content():
    model, data = small()
    x, y = data.tensors
    retain = Records(x[10:].clone(), y[10:].clone())
    forget = Records(x[10:14].clone(), y[10:14].clone())  # a subset of retain, in other objects
    before = state(model)
    with pytest.raises(errors.InvalidInputError, match="share 4 identical"):
        ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1).fit(forget, retain)
    assert same(model, before)
    ErasusUnlearner(model, "graddiff", selector=None, prune_ratio=1.0, epochs=1, copy=True).fit(
        Records(x[:10], y[:10]), retain)
