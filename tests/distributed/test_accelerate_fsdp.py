"""ErasusUnlearner under accelerate's FSDP2 on 2 CPU processes (gloo) against one process on the same global batch:
the same unlearned weights, gathered and written once by the main process, one report, and a NaN on one rank
stopping and restoring every rank's shards.

What this shows and what it does not: FSDP2 (``fully_shard`` as accelerate applies it: DTensor parameters sharded
over the 2 ranks in units for each GPT2Block, the tied embedding with the final norm and head, and the root;
``accelerator.get_state_dict`` gathering the full weights) running Erasus's loop over gloo on CPU processes.
accelerate itself offers FSDP on accelerators only (with ``cpu=True`` it picks MULTI_CPU, i.e. DDP), so each rank
builds ``Accelerator(cpu=True)`` and then sets the distributed type to FSDP in accelerate's shared state, with the
plugin settings of the shipped ``fsdp.yaml`` except bf16 mixed precision (float32 here, for the comparison). NCCL,
GPUs, mixed precision, CPU offload and ``accelerate launch --config_file fsdp.yaml`` did not run.

The 2 ranks are started once (torch.multiprocessing, file rendezvous, as in test_accelerate.py) and run four jobs:
a full GPT-2 fine-tune, a LoRA run (adapter and weight anchor under FSDP2), a NaN loss on rank 1 at the last step
with snapshots every 2 steps (the restore moves the shards back a step, while FSDP2 still holds unsharded copies
of the newer root, embedding and head weights), and a NaN written into rank 1's own shard of one weight after a step.

Tolerance: the same SGD setup as test_accelerate.py, with its ``TOL`` = 1e-6 and reasoning: a weight's difference
is the learning rate times the float32 rounding of its gradient, summed over the ranks in another order (FSDP2's
reduce-scatter of two half-batch gradients instead of one mean). Measured here, on every rank's gathered weights:
at most 1.5e-8 after 4 steps of the full fine-tune (the weights moved 0.13), 7.5e-9 in the NaN runs, 1.3e-9 for the
LoRA adapter (moved 1.4e-3; doubling the anchor weight moves it 1.6e-3 elsewhere): ``TOL`` leaves 67x room. The
report's metrics and curves come from the full model's forward on every rank: within ``METRIC_TOL`` = 1e-5 of one
process's, relative (measured at most 4.8e-7); the evaluation of weights not restored (FSDP2's stale unsharded
copies after a NaN loss) was off by 1.5e-2.
"""
import contextlib
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("accelerate")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_accelerate import (BATCH, LORA, TOL, WORLD, _assert_close, _graddiff, _lora_start, _model,  # noqa: E402
                             _nan_at, _rank_main, _tokenizer, _trained)

METRIC_TOL = 1e-5
POISONED = "transformer.h.0.attn.c_attn.weight"  # 64 rows: rank 1 holds rows 32-63
NAN_LOSS_STEP, NAN_LOSS_SNAPSHOTS = 4, 2  # the last of 4 steps; snapshots after steps 2 and 4
NAN_WEIGHT_STEP = 3
RUNS = ("full", "lora", "nan_loss", "nan_weight")
WRITTEN = RUNS[:3]  # the last run writes nothing: fit alone must leave the model sharded


# ------------------------------------------------------------------------------------------------ the scenario

def _fit(out_dir, *, accelerator=None, lora=None, nan_loss_on_rank=None, nan_weight_on_rank=None):
    """GradDiff on the whole forget set (2 epochs of 2 global batches), as test_accelerate.py's runs (with LoRA, the
    weight anchor), optionally with a NaN loss at step 4 (snapshots every 2 steps) or a NaN weight after step 3 on
    process ``rank`` (rank 0 in one process)."""
    unlearner, sets = _graddiff(out_dir, lora=lora, accelerator=accelerator)
    if nan_loss_on_rank is not None:
        _nan_at(unlearner.strategy, NAN_LOSS_STEP, nan_loss_on_rank)
    poison = _nan_weight_after(unlearner.strategy, NAN_WEIGHT_STEP, nan_weight_on_rank) \
        if nan_weight_on_rank is not None else contextlib.nullcontext()
    with poison:
        return unlearner.fit(sets["forget"], sets["retain"], test=sets["holdout"],
                             snapshot_every=NAN_LOSS_SNAPSHOTS if nan_loss_on_rank is not None else 1)


@contextlib.contextmanager
def _nan_weight_after(strategy, step, rank):
    """After the strategy's ``step``-th optimizer step, on process ``rank``, the last element of this process's part
    of ``POISONED`` becomes NaN (under FSDP2 rank 1's shard holds the rows that one process's last row ends)."""
    from erasus.strategies.guard import local_part

    calls, after_step = {"n": 0}, strategy.after_step

    def poisoned(model):
        after_step(model)
        calls["n"] += 1
        here = dist.get_rank() if dist.is_initialized() else 0
        if calls["n"] == step and here == rank:
            with torch.no_grad():
                local_part(dict(model.named_parameters())[POISONED])[-1, -1] = float("nan")

    strategy.after_step = poisoned
    try:
        yield
    finally:
        del strategy.after_step


def _gathered(model) -> dict:
    """The trained weights of a model ``fit`` returned, whole: a sharded parameter is gathered (a collective: every
    rank calls this, in the same order)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def _fsdp2_accelerator():
    """accelerate's FSDP2 on these CPU processes: ``Accelerator(cpu=True)`` picks MULTI_CPU (DDP); the distributed
    type is then set to FSDP in both of accelerate's shared states (AcceleratorState copies PartialState's each time
    it is built, which accelerate does inside ``prepare``), with fsdp.yaml's plugin settings: FSDP2, one unit per
    ``_no_split_modules`` class (GPT2Block), reshard after forward, full state dict."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False, activation_checkpointing=False)
    return accelerator


# ------------------------------------------------------------------------------------------- the 2 processes

def _rank_jobs(rank, folder):
    import erasus.report
    from erasus import ErasusUnlearner
    from erasus.errors import InvalidInputError
    from torch.distributed.fsdp import FSDPModule

    from erasus.strategies.guard import local_part

    accelerator = _fsdp2_accelerator()
    assert accelerator.is_fsdp2 and accelerator.num_processes == WORLD and accelerator.process_index == rank
    writes, write_report = [], erasus.report.write_report

    def counted(report, out_dir):
        writes.append(str(out_dir))
        return write_report(report, out_dir)

    erasus.report.write_report = counted
    settings = {"full": {}, "lora": {"lora": LORA}, "nan_loss": {"nan_loss_on_rank": 1},
                "nan_weight": {"nan_weight_on_rank": 1}}
    summary = {"writes": writes}
    for run in RUNS:
        model, report = _fit(folder / run if run in WRITTEN else None, accelerator=accelerator, **settings[run])
        save_file(_gathered(model), str(folder / f"{run}_rank{rank}.safetensors"))
        params = dict(model.named_parameters())
        summary[run] = {"report": report, "model": type(model).__name__,
                        "sharded": sorted({type(p).__name__ for p in params.values()}),
                        "local_elements": sum(local_part(p).numel() for p in params.values()),
                        "elements": sum(p.numel() for p in params.values()),
                        "units": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]}
    with pytest.raises(InvalidInputError) as refused:  # fully_shard would shard the caller's model in place
        ErasusUnlearner(_model(_tokenizer()), strategy="graddiff", selector=None, batch_size=BATCH,
                        accelerator=accelerator)
    summary["refused"] = str(refused.value)
    summary["held"] = [len(accelerator._models), len(accelerator._optimizers), len(accelerator._dataloaders),
                       accelerator.gradient_state.in_dataloader]
    (folder / f"rank{rank}.json").write_text(json.dumps(summary, default=str))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The folder where both ranks left their results (runs once for the module)."""
    folder = tmp_path_factory.mktemp("accelerate_fsdp")
    mp.spawn(_rank_main, args=(f"file://{folder / 'rendezvous'}", folder, _rank_jobs), nprocs=WORLD, join=True)
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same four runs in one process (the full fine-tune writes its weights too): run -> (model, report)."""
    folder = tmp_path_factory.mktemp("one_process")
    return {"full": _fit(folder / "full"), "lora": _fit(None, lora=LORA), "nan_loss": _fit(None, nan_loss_on_rank=0),
            "nan_weight": _fit(None, nan_weight_on_rank=0), "folder": folder}


def _rank(folder, rank) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def _assert_same_evaluation(got: dict, want: dict):
    """The report's numbers that come from forward passes after the run (the metrics, the per-epoch curves) and the
    logged losses, within METRIC_TOL of one process's, relative to values of at least 1 (perplexities are ~300)."""
    assert got["metrics"].keys() == want["metrics"].keys()
    pairs = [(got["metrics"][k], v, k) for k, v in want["metrics"].items() if isinstance(v, float)]
    for curve in ("loss", "forget", "retain"):
        assert len(got["curves"][curve]) == len(want["curves"][curve])
        pairs += [(a, b, curve) for a, b in zip(got["curves"][curve], want["curves"][curve])]
    for a, b, name in pairs:
        assert abs(a - b) <= METRIC_TOL * max(1.0, abs(b)), f"{name}: {a} vs one process's {b}"


# ---------------------------------------------------------------------------------------------------- tests

def test_a_full_fine_tune_under_fsdp2_gives_the_weights_of_one_process(two_ranks, one_process):
    model, report = one_process["full"]
    want, start = _trained(model), _model(_tokenizer()).state_dict()
    for rank in range(WORLD):
        result = _rank(two_ranks, rank)["full"]
        # really sharded: every parameter a DTensor holding half of it on each rank, in FSDP units as accelerate
        # wraps them (each GPT2Block, the embedding, the final norm and the head, and the root)
        assert result["model"] == "FSDPGPT2LMHeadModel" and result["sharded"] == ["DTensor"]
        assert 2 * result["local_elements"] == result["elements"]
        assert result["units"] == ["", "transformer.wte", "transformer.h.0", "transformer.h.1", "transformer.ln_f",
                                   "lm_head"]
        _assert_close(load_file(str(two_ranks / f"full_rank{rank}.safetensors")), want, start)
        assert result["report"]["steps"] == report["steps"] == 4
        assert result["report"]["forget_sample_passes"] == report["forget_sample_passes"] == 16
        _assert_same_evaluation(result["report"], report)


def test_the_main_process_writes_the_full_weights_as_one_process_does(two_ranks, one_process):
    """model.safetensors from the gathered shards: every tensor whole, the same names as one process's file (the
    tied head once, under the same name) and the same metadata."""
    ours, theirs = two_ranks / "full" / "model.safetensors", one_process["folder"] / "full" / "model.safetensors"
    with safe_open(str(ours), "pt") as mine, safe_open(str(theirs), "pt") as reference:
        assert mine.metadata() == reference.metadata() == {"transformer.wte.weight": "lm_head.weight"}
    written, want = load_file(str(ours)), load_file(str(theirs))
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in want.items()}
    _assert_close(written, want, _model(_tokenizer()).state_dict())


def test_only_the_main_process_writes_one_report_saying_fsdp_on_two_processes(two_ranks):
    assert _rank(two_ranks, 1)["writes"] == []
    assert sorted(_rank(two_ranks, 0)["writes"]) == sorted(str(two_ranks / run) for run in WRITTEN)
    assert not (two_ranks / "nan_weight").exists()
    for run in WRITTEN:
        assert sorted(p.name for p in (two_ranks / run).glob("report*")) == ["report.json", "report.md"]
        weights = sorted(str(p.relative_to(two_ranks / run)) for p in (two_ranks / run).rglob("*.safetensors*"))
        assert weights == (["adapter/adapter_model.safetensors"] if run == "lora" else ["model.safetensors"])
        report = json.loads((two_ranks / run / "report.json").read_text())
        assert report["processes"] == {"count": 2, "distributed_type": "FSDP", "global_batch": BATCH,
                                       "per_rank_batch": BATCH // 2}


def test_lora_under_fsdp2_trains_the_adapter_of_one_process(two_ranks, one_process):
    """The adapter (and the weight anchor on its sharded parameters) as in one process: the gathered adapter on
    every rank and the adapter file."""
    model, report = one_process["lora"]
    want, start = _trained(model), _lora_start()
    assert want and all("lora_" in name for name in want)
    for rank in range(WORLD):
        result = _rank(two_ranks, rank)["lora"]
        assert result["model"] == "FSDPPeftModel" and result["sharded"] == ["DTensor"]
        # the adapter moves ~1e-3 in 4 steps (B starts at zero): 1000x TOL
        _assert_close(load_file(str(two_ranks / f"lora_rank{rank}.safetensors")), want, start,
                      moved_at_least=500 * TOL)
        assert result["report"]["steps"] == report["steps"] == 4
        _assert_same_evaluation(result["report"], report)
    written = load_file(str(two_ranks / "lora" / "adapter" / "adapter_model.safetensors"))
    assert len(written) == len(want)
    _assert_close({k.replace(".weight", ".default.weight"): v for k, v in written.items()}, want)


def test_a_nan_loss_on_one_rank_stops_and_restores_every_ranks_shards(two_ranks, one_process):
    """Rank 1's loss is NaN at step 4; the last snapshot is step 2's: both ranks restore their shards to step 2 (away
    from step 3's weights) and stop; every evaluation after the stop reads the restored weights."""
    model, report = one_process["nan_loss"]
    assert report["guard"]["events"] == [{"step": NAN_LOSS_STEP, "reason": "loss is nan", "restored_to_step": 2}]
    want = _trained(model)
    for rank in range(WORLD):
        result = _rank(two_ranks, rank)["nan_loss"]["report"]
        assert result["guard"]["stopped"] == "loss is nan on rank 1 of 2"
        assert result["guard"]["events"] == [{"step": NAN_LOSS_STEP, "reason": "loss is nan on rank 1 of 2",
                                              "restored_to_step": 2}]
        assert result["steps"] == report["steps"] == NAN_LOSS_STEP - 1
        _assert_close(load_file(str(two_ranks / f"nan_loss_rank{rank}.safetensors")), want)
        _assert_same_evaluation(result, report)
    written, state = load_file(str(two_ranks / "nan_loss" / "model.safetensors")), model.state_dict()
    _assert_close(written, {name: state[name] for name in written})


def test_a_nan_in_one_ranks_shard_stops_and_restores_every_ranks_shards(two_ranks, one_process):
    """A NaN written into rank 1's own shard after step 3: rank 1's guard finds it, rank 0 (whose shards are finite)
    restores its own shards too, and the gathered weights are one process's after step 2."""
    model, report = one_process["nan_weight"]
    assert report["guard"]["events"] == [{"step": NAN_WEIGHT_STEP, "reason": "a weight became NaN or infinite",
                                          "restored_to_step": 2}]
    want = _trained(model)
    for rank in range(WORLD):
        result = _rank(two_ranks, rank)["nan_weight"]["report"]
        assert result["guard"]["events"] == [{"step": NAN_WEIGHT_STEP,
                                              "reason": "a weight became NaN or infinite on rank 1 of 2",
                                              "restored_to_step": 2}]
        assert result["steps"] == report["steps"] == NAN_WEIGHT_STEP
        gathered = load_file(str(two_ranks / f"nan_weight_rank{rank}.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in gathered.values())
        _assert_close(gathered, want)
        _assert_same_evaluation(result, report)


def test_fit_returns_the_sharded_model_and_leaves_the_accelerator_as_it_was(two_ranks):
    """Every run's model comes back with every parameter a DTensor holding this rank's shard (FSDP2 keeps some
    parameters unsharded after a forward: fit frees them after its last evaluation, written weights or not); the
    Accelerator holds nothing of the runs; copy=False is refused before any work (fully_shard would shard the
    caller's model in place)."""
    for rank in range(WORLD):
        result = _rank(two_ranks, rank)
        assert [result[run]["sharded"] for run in RUNS] == [["DTensor"]] * len(RUNS)
        assert result["held"] == [0, 0, 0, False]
        assert "copy=False with FSDP" in result["refused"]
