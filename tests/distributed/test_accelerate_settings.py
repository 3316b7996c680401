"""What ErasusUnlearner(accelerator=...) refuses, and what it leaves behind, checked in one process: one-process
Accelerators (``Accelerator(cpu=True)``) where accelerate itself matters, stand-in objects where only the decision
does (several processes, FSDP, fp16 on a GPU). The 2-process runs are in test_accelerate.py."""
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

from erasus import ErasusUnlearner  # noqa: E402
from erasus.errors import BackendUnavailableError, InvalidInputError  # noqa: E402
from erasus.strategies import STRATEGIES, GradientStrategy, TrainingGuard, get_strategy  # noqa: E402
from erasus.strategies.base import _check_accelerator  # noqa: E402
from erasus.unlearner import CountingLoader  # noqa: E402

DATA_PARALLEL = {"ga", "graddiff", "npo", "simnpo", "finetune", "scrub"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included): each test starts and ends without it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _classifier_data(n_forget=8, n_retain=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_forget + n_retain, 4, generator=g), torch.randint(0, 2, (n_forget + n_retain,), generator=g)
    return (x[:n_forget], y[:n_forget]), (x[n_forget:], y[n_forget:])


def _classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def _stand_in(kind="MULTI_CPU", processes=2, mixed_precision="no", **extra):
    """What _check_accelerator reads of an Accelerator."""
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), num_processes=processes,
                           gradient_accumulation_steps=1, mixed_precision=mixed_precision, **extra)


# ------------------------------------------------------------------------------------ 1. data parallelism opt-in

def test_only_strategies_whose_loss_is_a_mean_of_per_sample_terms_run_data_parallel():
    gradient = {name for name, cls in STRATEGIES.items() if issubclass(cls, GradientStrategy)}
    assert {name for name in gradient if STRATEGIES[name].runs_data_parallel()} == DATA_PARALLEL
    # a new gradient strategy runs in one process until its class opts in
    class Custom(GradientStrategy, name="custom_test_strategy"):
        def method_loss(self, model, forget_batch, retain_batch):
            return self.nll(model, forget_batch)
    try:
        assert not Custom.runs_data_parallel()
    finally:
        STRATEGIES.pop("custom_test_strategy")


@pytest.mark.parametrize("name", ["contrastive_unlearning", "modality_decoupling"])
def test_clip_strategies_are_refused_for_their_in_batch_negatives(name):
    with pytest.raises(InvalidInputError, match=f"strategy '{name}' does not run data-parallel.*in-batch negatives"):
        _check_accelerator(get_strategy(name), _stand_in())


def test_the_unlearner_refuses_a_strategy_with_per_rank_state_and_says_why():
    with pytest.raises(InvalidInputError, match="strategy 'salun' does not run data-parallel.*per-rank state"):
        ErasusUnlearner(_classifier(), strategy="salun", selector=None, accelerator=Accelerator(cpu=True))


# ------------------------------------------------------------------------- 2. loader settings that break the loop

@pytest.mark.parametrize("setting, value", [("even_batches", False), ("use_seedable_sampler", True),
                                            ("dispatch_batches", True)])
def test_loader_settings_that_break_the_loop_are_refused_before_any_work(setting, value):
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(**{setting: value}))
    with pytest.raises(InvalidInputError, match=f"accelerator: {setting}={value}"):
        ErasusUnlearner(_classifier(), strategy="graddiff", selector=None, batch_size=4, accelerator=accelerator)


# ----------------------------------------------------------------------------- 3. the padded last global batch

class _Shard:
    """A rank's share of an accelerate loader: ``batches`` batches of ``local`` samples (the last one padded)."""

    def __init__(self, batches, local):
        self.batches, self.local = batches, local

    def __iter__(self):
        return iter([(torch.zeros(self.local, 4), torch.zeros(self.local, dtype=torch.long))] * self.batches)

    def __len__(self):
        return self.batches


@pytest.mark.parametrize("size, batches, want", [(8, 2, 8), (6, 2, 6), (5, 2, 5), (1, 1, 1)])
def test_the_sample_count_leaves_out_accelerates_padding(size, batches, want):
    """Global batch 4 on 2 ranks (2 per rank): every rank counts the real samples of each global batch."""
    from erasus.tasks import infer_task

    loader = CountingLoader(_Shard(batches, 2), infer_task(_classifier()), padded_to=(4, size))
    for _ in range(2):  # two passes (epochs)
        assert len(list(loader)) == batches
    assert loader.samples == 2 * want
    stopped = CountingLoader(_Shard(batches, 2), infer_task(_classifier()), padded_to=(4, size))
    next(iter(stopped))  # a run stopped after its first step
    assert stopped.samples == min(4, size)


# ------------------------------------------------------------------------- 4. what fit leaves in the Accelerator

def test_fit_leaves_the_accelerator_as_it_was(monkeypatch):
    """The caller's own prepared model stays; the run's model, optimizer and loaders go, the gradient state's
    loaders are put back (the retain cycle and an early stop leave theirs unfinished), and no Adam state stays
    alive after two fits. The run stops early (the target is reached at the first evaluation)."""
    accelerator = Accelerator(cpu=True)
    mine = accelerator.prepare(nn.Linear(2, 2))
    held = {name: list(getattr(accelerator, name)) for name in ("_models", "_optimizers", "_dataloaders")}
    loaders = accelerator.gradient_state.dataloader_references
    made = []
    make_optimizer = GradientStrategy.make_optimizer

    def recorded(self, params):
        optimizer = make_optimizer(self, params)
        made.append(weakref.ref(optimizer))
        return optimizer

    monkeypatch.setattr(GradientStrategy, "make_optimizer", recorded)
    forget, retain = _classifier_data()
    for run in range(2):
        model = _classifier()
        unlearner = ErasusUnlearner(model, strategy="graddiff", strategy_params={"optimizer": "adam"}, selector=None,
                                    epochs=2, batch_size=4, copy=True, stop_at_target=True, eval_every=1,
                                    accelerator=accelerator)
        _, report = unlearner.fit(forget, retain, retrained=model)
        assert report["early_stop"]["reached"] and report["steps"] == 1
        for name, before in held.items():
            assert [id(o) for o in getattr(accelerator, name)] == [id(o) for o in before], name
        assert accelerator._models[0] is mine
        assert accelerator.gradient_state.dataloader_references == loaders
        assert not accelerator.gradient_state.in_dataloader
        gc.collect()
        assert len(made) == run + 1 and all(ref() is None for ref in made)  # every run's Adam state is freed


# --------------------------------------------------------------------------------------- 5. mixed precision

@pytest.mark.filterwarnings("ignore:forgetting barely moved")
def test_bf16_leaves_the_models_forward_and_evaluates_in_one_precision():
    """Under Accelerator(mixed_precision="bf16") the model's forward is accelerate's autocast wrapper while it
    trains; every metric (the original's, the curve's, the final one) uses the model's own fp32 forward, and the
    wrapper is gone after fit. lr 1e-30 moves no weight, so all of them must be the same number."""
    from erasus.data.lm_models import tiny_causal_lm
    from erasus.data.text import QADataset
    from erasus.data.tofu import tofu_splits, tofu_tokenizer
    from erasus.tasks.causal_lm import CausalLM

    tokenizer = tofu_tokenizer(6, 0)
    sets = {k: QADataset(r, tokenizer, max_length=64)
            for k, r in tofu_splits(6, 0.34, seed=0, per_author=4).items()}
    model = tiny_causal_lm("gpt2", len(tokenizer), seed=0, n_layer=2, hidden=64, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    assert accelerator.native_amp  # the patching path is taken
    seen = []
    unlearner = ErasusUnlearner(model, strategy="graddiff", strategy_params={"lr": 1e-30, "optimizer": "sgd"},
                                selector=None, epochs=1, batch_size=4, task=CausalLM(generation=False, mias=()),
                                accelerator=accelerator)
    loss = unlearner.strategy.loss

    def spied(trained, forget_batch, retain_batch=None, original=None):
        seen.append(vars(model).get("forward") is not None)  # autocast while it trains
        return loss(trained, forget_batch, retain_batch, original)

    unlearner.strategy.loss = spied
    returned, report = unlearner.fit(sets["forget"], sets["retain"], test=sets["holdout"])
    assert returned is model and seen and all(seen)
    assert "forward" not in vars(model) and "_original_forward" not in vars(model)
    before = report["original"]["forget_nll"]
    assert report["curves"]["forget"] == [before]
    assert report["metrics"]["forget_nll"] == report["verdict"]["final_forget"] == before


# -------------------------------------------------------------------------- 6. and 7. guards, FSDP, fp16 clipping

def test_a_guard_that_does_not_agree_across_ranks_is_refused():
    model = _classifier()
    strategy = get_strategy("ga")
    with pytest.raises(InvalidInputError, match="guard: under more than one process the guard must agree"):
        strategy.unlearn(model, [], guard=TrainingGuard(model), accelerator=_stand_in())
    _check_accelerator(strategy, _stand_in(), TrainingGuard(model, agree=lambda row: row[None]))  # agrees: fine
    _check_accelerator(strategy, _stand_in(processes=1), TrainingGuard(model))  # one process: fine


def test_fp16_gradient_clipping_under_fsdp_is_refused():
    clipped, unclipped = get_strategy("graddiff", max_grad_norm=1.0), get_strategy("graddiff")
    with pytest.raises(InvalidInputError, match="max_grad_norm under FSDP with mixed_precision fp16"):
        _check_accelerator(clipped, _stand_in("FSDP", mixed_precision="fp16"))
    _check_accelerator(clipped, _stand_in("FSDP", mixed_precision="bf16"))
    _check_accelerator(unclipped, _stand_in("FSDP", mixed_precision="fp16"))
    _check_accelerator(clipped, _stand_in("MULTI_GPU", mixed_precision="fp16"))  # DDP unscales once


@pytest.mark.parametrize("settings, message", [
    ({"is_fsdp2": False}, "FSDP needs fsdp_version: 2"),
    ({"copy": False}, "copy=False with FSDP"),
    ({"adaptive": True}, "adaptive=True with FSDP"),
    ({"save_merged": True}, "save_merged=True with FSDP")])
def test_fsdp_limits_are_refused(settings, message):
    from erasus.integrations.accelerated import _check_fsdp

    accelerator = SimpleNamespace(is_fsdp2=settings.pop("is_fsdp2", True))
    limits = {"copy": True, "adaptive": False, "save_merged": False, **settings}
    with pytest.raises(InvalidInputError, match=message):
        _check_fsdp(accelerator, **limits)
    if not settings:  # only FSDP1 was wrong
        return
    _check_fsdp(SimpleNamespace(is_fsdp2=True), copy=True, adaptive=False, save_merged=False)


# -------------------------------------------------------------------------------------------------- the rest

def test_the_sharded_weights_are_gathered_once_and_written_atomically(tmp_path):
    """FSDP's writer with a stand-in Accelerator: one get_state_dict (the collective), tied weights written once,
    under the final name only."""
    from safetensors.torch import load_file

    from erasus.integrations.accelerated import AcceleratedRun

    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied, as a causal LM's head
    calls = []

    def get_state_dict(m):
        calls.append(m)
        return m.state_dict()

    Accelerator(cpu=True)  # accelerate's logging (a warning on the tied weight) needs its state
    run = object.__new__(AcceleratedRun)
    run.accelerator = SimpleNamespace(get_state_dict=get_state_dict, is_main_process=True)
    run.write_sharded(model, tmp_path, peft=False)
    assert calls == [model]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    written = load_file(str(tmp_path / "model.safetensors"))
    assert len(written) == 1 and torch.equal(next(iter(written.values())), model[0].weight.detach())


def test_the_trainer_guard_agrees_across_the_trainers_processes(monkeypatch):
    """ErasusGuardCallback under a Trainer with 2 processes (a stand-in gather: rank 1 reports a NaN loss): the
    guard stops this rank too; in one process it gathers nothing."""
    pytest.importorskip("transformers")
    import accelerate.utils

    from erasus.integrations.trainer import ErasusGuardCallback, _agree_across_processes
    from erasus.strategies.guard import _LOSS

    assert _agree_across_processes(SimpleNamespace(world_size=1)) is None

    def gather(row):
        theirs = row.clone()
        theirs[0, 0], theirs[0, 1] = _LOSS, float("nan")
        return torch.cat([row, theirs])

    monkeypatch.setattr(accelerate.utils, "gather", gather)
    model = _classifier()
    callback = ErasusGuardCallback()
    args, state = SimpleNamespace(world_size=2, device=torch.device("cpu")), SimpleNamespace(global_step=1)
    callback.on_train_begin(args, state, SimpleNamespace(), model=model)
    callback.record_loss(torch.tensor(0.5))
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    with pytest.warns(RuntimeWarning, match="loss is nan on rank 1 of 2"):
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    assert control.should_training_stop and callback.events[0]["reason"] == "loss is nan on rank 1 of 2"


def test_a_missing_accelerate_is_reported_as_an_unavailable_backend(monkeypatch):
    import sys

    from erasus.cli import make_accelerator
    from erasus.integrations.accelerated import AcceleratedRun

    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(BackendUnavailableError, match="accelerate package"):
        make_accelerator()
    with pytest.raises(BackendUnavailableError, match="accelerate package"):
        AcceleratedRun(object(), batch_sizes={}, copy=True, adaptive=False, save_merged=False)


def test_the_weight_anchor_reaches_the_parameters_through_a_ddp_wrapper(tmp_path):
    """The Trainer binds a strategy to the plain model and then calls its loss on the DDP wrapper, whose parameter
    names gain a ``module.`` prefix: the weight anchor holds the parameters themselves, so it still applies (it
    was dropped silently when looked up by name). One process, gloo."""
    import torch.distributed as dist

    import erasus.distributed  # noqa: F401  (before init_process_group: see erasus/_process_group_guard.py)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = _classifier()
        (x, y), _ = _classifier_data()
        anchored, free = get_strategy("graddiff", anchor="weights", anchor_weight=10.0), get_strategy("graddiff")
        anchored.bind(model)
        free.bind(model)
        with torch.no_grad():
            model[0].weight.add_(0.1)  # 64 weights moved by 0.1: the anchor is 10 * 64 * 0.01
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert all(name.startswith("module.") for name, _ in wrapped.named_parameters())
        gap = anchored.loss(wrapped, (x, y), (x, y)) - free.loss(wrapped, (x, y), (x, y))
        assert float(gap) == pytest.approx(6.4, rel=1e-5)
    finally:
        dist.destroy_process_group()
