"""ErasusUnlearner under Hugging Face accelerate on 2 CPU processes (gloo) against one process on the same global
batch and seed: the same unlearned weights, one report, and a NaN on one rank stopping both.

The 2 ranks are started once (torch.multiprocessing with the environment that accelerate reads, and a file
rendezvous: no port to collide on) and run three jobs: ``erasus unlearn --config ... --accelerate`` (the script
entry; a full GPT-2 fine-tune), a LoRA run through the API, and a run where rank 1's loss turns NaN.

Tolerance: the runs use SGD (momentum 0.9), so a weight's difference is the learning rate times the float32
rounding of its gradient, which 2 ranks sum in another order (two half-batch means averaged by DDP instead of
one mean; other matmul shapes): measured at most 2e-8 over 4 steps at lr 0.05. ``TOL`` = 1e-6 leaves 50x room
and is 1e-4 of how far the weights moved. (Adam is no fair test: it divides each gradient element by its own
magnitude, so an element whose gradient is float noise moves by up to lr either way.)
"""
import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("accelerate")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

WORLD = 2
TOL = 1e-6
BATCH = 4  # the global batch: 2 samples per rank
STRATEGY = {"lr": 0.05, "optimizer": "sgd"}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
NAN_STEP = 3  # of 4: 2 epochs of 8 forget samples
PADDED = 6  # a forget set whose last global batch accelerate pads with 2 repeats


# ------------------------------------------------------------------------------------------------ the scenario

def _records():
    from erasus.data.tofu import tofu_splits

    return tofu_splits(6, 0.34, seed=0, per_author=4)  # forget 8, retain 16, holdout 8: multiples of BATCH


def _tokenizer():
    from erasus.data.tofu import tofu_tokenizer

    return tofu_tokenizer(6, 0)


def _sets(tokenizer):
    from erasus.data.text import QADataset

    return {split: QADataset(records, tokenizer, max_length=64) for split, records in _records().items()}


def _model(tokenizer):
    from erasus.data.lm_models import tiny_causal_lm

    # GPT-2, 2 layers, width 64, dropout 0 (the ranks must compute the same function)
    return tiny_causal_lm("gpt2", len(tokenizer), seed=0, n_layer=2, hidden=64, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _graddiff(out_dir, *, lora=None, accelerator=None):
    """(unlearner, data sets) of the runs here and in test_accelerate_fsdp.py: GradDiff on a copy of the tiny model
    (2 epochs of 2 global batches), cheap metrics; with LoRA, also the weight anchor (its names and tensors must be
    taken from the wrapped model under DDP). ``unlearner.strategy`` is the strategy the run uses."""
    from erasus import ErasusUnlearner
    from erasus.strategies import get_strategy
    from erasus.tasks.causal_lm import CausalLM

    tokenizer = _tokenizer()
    anchor = {"anchor": "weights", "anchor_weight": 10.0} if lora else {}
    unlearner = ErasusUnlearner(_model(tokenizer), strategy=get_strategy("graddiff", **STRATEGY, **anchor),
                                selector=None, epochs=2, batch_size=BATCH, copy=True,
                                task=CausalLM(generation=False, mias=("loss",)), lora=lora, out_dir=out_dir,
                                accelerator=accelerator)
    return unlearner, _sets(tokenizer)


def _fit(out_dir, *, lora=None, accelerator=None, nan_on_rank=None, forget_size=None):
    """:func:`_graddiff`'s run on the whole forget set, or on its first ``forget_size`` samples."""
    unlearner, sets = _graddiff(out_dir, lora=lora, accelerator=accelerator)
    if nan_on_rank is not None:
        _nan_at(unlearner.strategy, NAN_STEP, nan_on_rank)
    forget = sets["forget"] if forget_size is None else Subset(sets["forget"], range(forget_size))
    return unlearner.fit(forget, sets["retain"], test=sets["holdout"])


def _nan_at(strategy, step, rank):
    """Make the strategy's loss NaN at its ``step``-th call on process ``rank`` (rank 0 in one process)."""
    calls = {"n": 0}
    method_loss = strategy.method_loss

    def poisoned(model, forget_batch, retain_batch):
        calls["n"] += 1
        loss = method_loss(model, forget_batch, retain_batch)
        here = dist.get_rank() if dist.is_initialized() else 0
        return loss * float("nan") if calls["n"] == step and here == rank else loss

    strategy.method_loss = poisoned


def _trained(model) -> dict:
    """The weights a run trains (the adapter's only, with LoRA), as contiguous CPU tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _write_cli_inputs(folder):
    """A saved tiny GPT-2 and tokenizer, the records as JSON lines, and a config for 1 and for 2 processes."""
    import yaml

    tokenizer = _tokenizer()
    _model(tokenizer).save_pretrained(folder / "model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "model")
    for split, records in _records().items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("one", "two"):
        config = {"task": "causal_lm", "model": str(folder / "model"), "strategy": "graddiff",
                  "strategy_params": STRATEGY, "selector": None, "epochs": 2, "batch_size": BATCH, "seed": 0,
                  "data": {s: str(folder / f"{s}.jsonl") for s in ("forget", "retain", "holdout")},
                  "out_dir": str(folder / f"cli_{name}")}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))


# ------------------------------------------------------------------------------------------- the 2 processes

def _rank_main(rank, init_method, folder, jobs=None):
    """One rank: accelerate's environment, a gloo group, then ``jobs(rank, folder)`` (default: this module's)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import erasus.distributed  # noqa: F401  (before init_process_group: see erasus/_process_group_guard.py)

    # a rank left waiting would raise after 2 minutes instead of gloo's 30
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        (jobs or _rank_jobs)(rank, folder)
    finally:
        dist.destroy_process_group()


def _rank_jobs(rank, folder):
    from accelerate import Accelerator

    import erasus.cli
    import erasus.report

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD and accelerator.process_index == rank
    writes = []
    write_report = erasus.report.write_report

    def counted(report, out_dir):
        writes.append(str(out_dir))
        return write_report(report, out_dir)

    erasus.report.write_report = counted
    weight_writes = _count_weight_writes()
    assert erasus.cli.main(["unlearn", "--config", str(folder / "two.yaml"), "--accelerate"]) == 0
    model, report = _fit(folder / "lora_two", lora=LORA, accelerator=accelerator)
    save_file(_trained(model), str(folder / f"lora_rank{rank}.safetensors"))
    nan_model, nan_report = _fit(folder / "nan_two", accelerator=accelerator, nan_on_rank=1)
    save_file(_trained(nan_model), str(folder / f"nan_rank{rank}.safetensors"))
    _, padded_report = _fit(None, accelerator=accelerator, forget_size=PADDED)
    summary = {"writes": writes, "weight_writes": weight_writes, "lora_steps": report["steps"],
               "processes": report["processes"], "nan_guard": nan_report["guard"], "nan_steps": nan_report["steps"],
               "nan_losses": nan_report["curves"]["loss"], "wrapped": type(model).__name__,
               "padded_passes": padded_report["forget_sample_passes"], "padded_steps": padded_report["steps"],
               "held": [len(accelerator._models), len(accelerator._optimizers), len(accelerator._dataloaders),
                        accelerator.gradient_state.in_dataloader],
               "refused": _refusals(accelerator)}
    (folder / f"rank{rank}.json").write_text(json.dumps(summary))


def _count_weight_writes() -> list[str]:
    """The out_dirs this process writes the unlearned weights to (its calls of ErasusUnlearner._write)."""
    from erasus.unlearner import ErasusUnlearner

    calls, write = [], ErasusUnlearner._write

    def counted(self, model, report):
        calls.append(str(self.out_dir))
        return write(self, model, report)

    ErasusUnlearner._write = counted
    return calls


def _refusals(accelerator) -> list[str]:
    """The messages of the settings a 2-process run refuses before any work."""
    from erasus import ErasusUnlearner
    from erasus.errors import InvalidInputError

    model, messages = _model(_tokenizer()), []
    for settings in ({"batch_size": 3}, {"batch_size": 4, "retain_batch_size": 5}):
        with pytest.raises(InvalidInputError) as caught:
            ErasusUnlearner(model, strategy="graddiff", selector=None, accelerator=accelerator, **settings)
        messages.append(str(caught.value))
    accelerator.gradient_accumulation_steps = 2
    try:
        with pytest.raises(InvalidInputError) as caught:
            ErasusUnlearner(model, strategy="graddiff", selector=None, batch_size=4, accelerator=accelerator)
        messages.append(str(caught.value))
    finally:
        accelerator.gradient_accumulation_steps = 1
    return messages


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The folder where both ranks left their results (runs once for the module)."""
    folder = tmp_path_factory.mktemp("accelerate")
    _write_cli_inputs(folder)
    mp.spawn(_rank_main, args=(f"file://{folder / 'rendezvous'}", folder), nprocs=WORLD, join=True)
    return folder


def _rank(folder, rank) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def _assert_close(got: dict, want: dict, start: dict | None = None, moved_at_least: float = 1e4 * TOL):
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= TOL, f"largest weight difference {worst:.3g} > {TOL}"
    if start is not None:  # the tolerance is tight against how far unlearning moved the weights
        moved = max(float((want[k] - start[k]).abs().max()) for k in want)
        assert moved > moved_at_least, f"the weights barely moved ({moved:.3g}): the comparison would prove nothing"


def _lora_start() -> dict:
    """The adapter as fit() initialises it (seeded by the run's seed, 0) before any step."""
    from erasus.tasks.lora import apply_lora, lora_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _trained(apply_lora(_model(_tokenizer()), lora_config(LORA)))


# ---------------------------------------------------------------------------------------------------- tests

def test_cli_on_two_processes_writes_the_weights_of_one_process(two_ranks):
    """`erasus unlearn --config ... --accelerate` on 2 ranks vs `erasus unlearn --config ...` in one process: the
    full fine-tune's weights agree within TOL, and the one report says it ran on 2 processes."""
    import erasus.cli

    assert erasus.cli.main(["unlearn", "--config", str(two_ranks / "one.yaml")]) == 0
    one, two = two_ranks / "cli_one", two_ranks / "cli_two"
    start = _model(_tokenizer()).state_dict()  # every name, tied ones included
    _assert_close(load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors")), start)
    report_one, report_two = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert report_two["processes"] == {"count": 2, "distributed_type": "MULTI_CPU", "global_batch": BATCH,
                                       "per_rank_batch": BATCH // 2}
    assert "processes" not in report_one
    assert report_two["steps"] == report_one["steps"] == 4
    assert report_two["forget_sample_passes"] == report_one["forget_sample_passes"] == 16
    # the loss logged per step is the global batch's (the mean of the ranks' halves)
    torch.testing.assert_close(report_two["curves"]["loss"], report_one["curves"]["loss"], rtol=0, atol=1e-5)


def test_lora_on_two_processes_trains_the_adapter_of_one_process(two_ranks):
    model, report = _fit(None, lora=LORA)
    want = _trained(model)
    assert want and all("lora_" in name for name in want)
    start = _lora_start()
    for rank in range(WORLD):  # the adapter moves ~1e-3 in 4 steps (B starts at zero): 1000x TOL
        _assert_close(load_file(str(two_ranks / f"lora_rank{rank}.safetensors")), want, start,
                      moved_at_least=500 * TOL)
    assert _rank(two_ranks, 0)["lora_steps"] == report["steps"] == 4
    assert _rank(two_ranks, 0)["wrapped"] == _rank(two_ranks, 1)["wrapped"] == type(model).__name__  # unwrapped
    assert (two_ranks / "lora_two" / "adapter" / "adapter_model.safetensors").exists()


def test_only_the_main_process_writes_one_report_and_the_weights(two_ranks):
    runs = sorted(str(two_ranks / d) for d in ("cli_two", "lora_two", "nan_two"))
    for key in ("writes", "weight_writes"):
        written = [_rank(two_ranks, rank)[key] for rank in range(WORLD)]
        assert written[1] == [] and sorted(written[0]) == runs, key
    for run in ("cli_two", "lora_two", "nan_two"):
        assert sorted(p.name for p in (two_ranks / run).glob("report*")) == ["report.json", "report.md"]
        weights = sorted(str(p.relative_to(two_ranks / run)) for p in (two_ranks / run).rglob("*.safetensors*"))
        assert weights == (["adapter/adapter_model.safetensors"] if run == "lora_two" else ["model.safetensors"])


def test_a_padded_last_batch_counts_real_samples_and_the_accelerator_is_left_as_it_was(two_ranks):
    """6 forget samples in global batches of 4: accelerate pads the second batch with 2 repeats, which the report
    does not count (one process draws 6 per epoch). After the four runs each rank's Accelerator holds nothing of
    them and is in no data loader."""
    for rank in range(WORLD):
        result = _rank(two_ranks, rank)
        assert result["padded_steps"] == 4 and result["padded_passes"] == 2 * PADDED
        assert result["held"] == [0, 0, 0, False]


def test_a_nan_on_one_rank_stops_and_restores_every_rank(two_ranks):
    model, report = _fit(None, nan_on_rank=0)  # the same poison in one process
    assert report["guard"]["events"] == [{"step": NAN_STEP, "reason": "loss is nan", "restored_to_step": 2}]
    for rank in range(WORLD):
        result = _rank(two_ranks, rank)
        assert result["nan_guard"]["stopped"] == "loss is nan on rank 1 of 2"
        assert result["nan_guard"]["events"] == [{"step": NAN_STEP, "reason": "loss is nan on rank 1 of 2",
                                                  "restored_to_step": 2}]
        assert result["nan_steps"] == report["steps"] == NAN_STEP - 1
        assert len(result["nan_losses"]) == NAN_STEP - 1  # nothing logged for the poisoned step
        # restored on every rank to the weights after step 2, as in one process
        _assert_close(load_file(str(two_ranks / f"nan_rank{rank}.safetensors")), _trained(model))


def test_settings_the_loop_cannot_honour_are_refused_before_any_work(two_ranks):
    from erasus import ErasusUnlearner
    from erasus.errors import InvalidInputError

    for rank in range(WORLD):
        batch, retain_batch, accumulation = _rank(two_ranks, rank)["refused"]
        assert "batch_size (3) must be a multiple of the number of processes (2)" in batch
        assert "retain_batch_size (5) must be a multiple" in retain_batch
        assert "gradient_accumulation_steps is 2" in accumulation
    model = _model(_tokenizer())
    # per-rank state built from each rank's shard (SalUn's mask) would pull the replicas apart; SSD trains nothing
    for strategy in ("salun", "ssd"):
        with pytest.raises(InvalidInputError, match=f"strategy '{strategy}' does not run data-parallel"):
            ErasusUnlearner(model, strategy=strategy, selector=None, accelerator=object())
    with pytest.raises(InvalidInputError, match="accelerator must be an accelerate.Accelerator or None, got str"):
        ErasusUnlearner(model, strategy="graddiff", selector=None, accelerator="ddp")


def test_the_shipped_launch_configs_load_as_documented():
    from importlib.resources import files

    from accelerate.commands.config.config_args import load_config_from_file

    folder = files("erasus.integrations") / "accelerate_configs"
    configs = {name: load_config_from_file(str(folder / f"{name}.yaml")) for name in ("ddp_cpu", "ddp", "fsdp")}
    # ddp_cpu names accelerate's torchrun launcher (its MULTI_CPU type needs mpirun) and the CPU
    assert configs["ddp_cpu"].distributed_type.name == "MULTI_GPU" and configs["ddp_cpu"].use_cpu
    assert configs["ddp"].distributed_type.name == "MULTI_GPU" and not configs["ddp"].use_cpu
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type.name == "FSDP" and not fsdp.use_cpu
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert all(config.num_processes == 2 and config.num_machines == 1 for config in configs.values())


def test_the_guard_decides_on_what_every_rank_found():
    """The guard's decision logic with a stand-in for the all-gather: this process is rank 0 of 2, and rank 1
    reports its own findings (under FSDP each rank checks its own shards, so they can differ)."""
    from erasus.strategies import GuardTripped, TrainingGuard
    from erasus.strategies.guard import _WEIGHT

    rank1 = {"code": 0.0, "loss_offset": 2.0}

    def agree(row):
        theirs = row.clone()
        theirs[0], theirs[1] = rank1["code"], row[1] + rank1["loss_offset"]
        return torch.stack([row, theirs])

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = TrainingGuard(model, agree=agree)
    assert guard.check_loss(torch.tensor(1.0)) == 2.0  # the mean of the ranks' losses
    guard.check(torch.tensor(1.0))  # nothing wrong anywhere: a new snapshot
    with torch.no_grad():
        model.weight.add_(1.0)  # a step that rank 0 finds fine...
    rank1["code"] = _WEIGHT  # ...and rank 1 finds a NaN in its weights
    with pytest.raises(GuardTripped, match="a weight became NaN or infinite on rank 1 of 2"):
        guard.check(torch.tensor(1.0))
    for name, p in model.named_parameters():  # rank 0 restored too, bit for bit
        assert torch.equal(p, start[name])
    assert guard.events == [{"step": 2, "reason": "a weight became NaN or infinite on rank 1 of 2",
                             "restored_to_step": 1}]
