"""Erasus under Hugging Face ``accelerate``: what ``ErasusUnlearner(accelerator=...)`` does with the processes.

Every process runs the same script and builds the same model and data; the Accelerator (made by the script, with
what ``accelerate launch`` or ``torchrun`` put in the environment) tells them apart. Per run:

- **Strategies**: those whose loss is a mean of per-sample terms and that keep no per-rank state (``ga``,
  ``graddiff``, ``npo``, ``simnpo``, ``finetune``, ``scrub``: their classes set ``data_parallel = True``); the
  others are refused before any work, with the reason (the CLIP strategies' in-batch negatives, SalUn's mask).
- **Data**: each coreset and retain loader goes through ``accelerator.prepare``; with the default settings
  (``split_batches=False``) the loader's batch is ``batch_size / num_processes``, and accelerate hands rank r the
  r-th of every ``num_processes`` consecutive batches of the one shuffled order (Erasus's seeded generator), so a
  step covers exactly the global batch that one process with ``batch_size`` would draw (``split_batches=True``
  splits each global batch instead: the same samples). The run equals one process's (within float rounding)
  when every epoch's coreset size and the retain set's size are multiples of their global batches; otherwise
  accelerate completes the last, partial global batch with samples from the start of the epoch (its
  ``even_batches`` rule, so that every rank steps together), and that step differs from one process's. The
  report's ``forget_sample_passes`` counts the real samples only, not those repeats. Settings that would break
  the loop are refused before any work: ``even_batches=False`` (the ranks would take different numbers of
  steps and wait for each other in the guard's all-gather), ``use_seedable_sampler=True`` (the ranks would
  shuffle with accelerate's seed instead of Erasus's, in orders the one process never draws) and
  ``dispatch_batches=True`` (the main process would draw and slice every batch, which the per-rank loaders
  do not expect: a crash after the first evaluation, the other ranks left waiting).
- **Model and optimizer**: prepared together by the strategy (DDP wraps; FSDP2 shards in place); backward goes
  through ``accelerator.backward``, so every replica steps on the gradient of the whole global batch. The frozen
  reference (a LoRA model under ``disable_adapter()``, or a frozen copy made before wrapping) reads the plain
  model.
- **Guard**: one all-gather per check (:func:`erasus.strategies.guard.agree_on`): a NaN loss on any rank stops and
  restores every rank at the same step, before the gradient all-reduce.
- **Evaluation**: every rank evaluates the same full sets (no gather: simple, and safe under FSDP, whose forward
  needs every rank); the values that decide something (the target, the curve points that early stopping reads,
  the adaptive mode's per-sample scores) and the coreset indices are broadcast from the main process, so every
  rank takes the same decision even where float summation differs.
- **Report**: assembled on every rank, written (report, plots, weights) by the main process only;
  ``fit`` returns the plain model (never the DDP wrapper); under FSDP2 the model sharded in place, every parameter
  a DTensor holding this rank's shard (``p.full_tensor()``, called on every rank, gathers one).
- **The caller's Accelerator** is left as it was: what ``fit`` prepared (model, optimizer, loaders) is released
  from it, its gradient state's loaders are put back, and mixed precision's autocast ``forward`` is taken off the
  model (every metric of a run is computed with the model's own forward, in its own precision).

Launching (the configs ship in ``erasus/integrations/accelerate_configs/``; ``erasus unlearn --accelerate`` makes
the Accelerator, on the CPU when no GPU is visible)::

    accelerate launch --config_file ddp.yaml -m erasus unlearn --config lm.yaml --accelerate
    accelerate launch --config_file ddp_cpu.yaml -m erasus unlearn --config lm.yaml --accelerate   # 2 CPU ranks
    torchrun --standalone --nproc_per_node 2 -m erasus unlearn --config lm.yaml --accelerate           # same

In your own script: ``ErasusUnlearner(model, ..., accelerator=Accelerator())``. FSDP needs
``fsdp_version: 2`` (``fsdp.yaml``), ``copy=True`` (the model is sharded in place), and neither ``adaptive`` nor
``save_merged``; the weights are then gathered with ``accelerator.get_state_dict`` on every rank and written by
the main process (the file one process writes). Under FSDP2 the guard checks, copies and restores each rank's own
shards, and the weight anchor differentiates each rank's shards. FSDP2 has run on 2 CPU processes over gloo, with
accelerate's distributed type set to FSDP by hand (accelerate offers FSDP on accelerators only): the same weights
as one process (tests/distributed/test_accelerate_fsdp.py); not yet with NCCL on GPUs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

import erasus._process_group_guard  # noqa: F401  (before accelerate makes a process group: see that module)
from erasus.errors import BackendUnavailableError, InvalidInputError

# accelerate's distributed types that run the loop as plain data parallelism (replicas, or FSDP2's shards)
_DATA_PARALLEL = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                  "MULTI_HPU", "MULTI_SDAA", "MULTI_NEURON", "FSDP"}


class AcceleratedRun:
    """One unlearning run's use of an ``accelerate.Accelerator``: the loaders, the collectives that keep the ranks'
    decisions equal, and who writes. Built by :class:`erasus.ErasusUnlearner` from its ``accelerator=`` argument;
    refuses settings it cannot honour (named) before any work.

    Args:
        accelerator: an ``accelerate.Accelerator``.
        batch_sizes: ``{"batch_size": ..., "retain_batch_size": ...}``, the global batch sizes, each a multiple of
            the number of processes.
        copy, adaptive, save_merged: the unlearner's settings, checked against FSDP's limits.
    """

    def __init__(self, accelerator, *, batch_sizes: dict[str, int], copy: bool, adaptive: bool, save_merged: bool):
        try:
            from accelerate import Accelerator
        except ImportError as exc:  # accelerate is an extra
            raise BackendUnavailableError("accelerator= needs the accelerate package: pip install 'erasus[llm]'") \
                from exc
        if not isinstance(accelerator, Accelerator):
            raise InvalidInputError(f"accelerator must be an accelerate.Accelerator or None, got "
                                    f"{type(accelerator).__name__}")
        kind = accelerator.distributed_type.name if hasattr(accelerator.distributed_type, "name") else \
            str(accelerator.distributed_type)
        if kind not in _DATA_PARALLEL:
            raise InvalidInputError(f"accelerator: distributed type {kind} is not supported; use DDP (MULTI_GPU, "
                                    "MULTI_CPU) or FSDP with fsdp_version 2")
        self.sharded = kind == "FSDP"
        if self.sharded:
            _check_fsdp(accelerator, copy=copy, adaptive=adaptive, save_merged=save_merged)
        steps = accelerator.gradient_accumulation_steps
        if steps != 1:
            raise InvalidInputError(f"accelerator: gradient_accumulation_steps is {steps}, but the strategies step on "
                                    "every global batch; set it to 1 and choose batch_size instead")
        _check_data_settings(accelerator)
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.kind = kind
        for name, size in batch_sizes.items():
            if size % self.world:
                raise InvalidInputError(f"{name} ({size}) must be a multiple of the number of processes "
                                        f"({self.world}): it is the global batch, split evenly over the ranks")

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def device(self) -> torch.device:
        """This process's device: the model is moved there before anything reads it (the frozen reference copy
        included, which ``accelerator.prepare`` would not move)."""
        return self.accelerator.device

    def loader(self, task, dataset: Dataset, batch_size: int, generator: torch.Generator):
        """This rank's shuffled loader over ``dataset``, drawing its share of every global batch of ``batch_size``."""
        local = batch_size if self.accelerator.split_batches else batch_size // self.world
        return self.accelerator.prepare(task.loader(dataset, local, shuffle=True, generator=generator))

    def released(self):
        """A context in which the run prepares its loaders: on leaving it, the Accelerator holds what it held
        before (:func:`erasus.strategies.base.released`)."""
        from erasus.strategies.base import released

        return released(self.accelerator)

    def from_main(self, values: torch.Tensor) -> torch.Tensor:
        """The main process's ``values`` (any shape; the same shape on every rank), on every rank, on the CPU."""
        from accelerate.utils import broadcast

        moved = values.detach().to(self.accelerator.device).contiguous()
        return broadcast(moved, from_process=0).cpu().to(values.dtype)

    def floats_from_main(self, values: dict[str, float]) -> dict[str, float]:
        """A dict of floats (the same keys on every rank) with the main process's values."""
        keys = sorted(values)
        agreed = self.from_main(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) for k, v in zip(keys, agreed.tolist())}

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def write_sharded(self, model: nn.Module, out, *, peft: bool) -> None:
        """FSDP: gather the full weights (a collective: every rank calls it; the main process receives them, the
        others an empty dict) and let the main process write them, as ``adapter/`` (a peft model) or
        ``model.safetensors``: the file one process writes with safetensors' ``save_model`` (tied weights once,
        under the first of their names in sorted order), written to a temporary name and renamed into place when
        complete. Does not change ``model``."""
        state = self.accelerator.get_state_dict(model)
        if peft:
            model.save_pretrained(str(out / "adapter"), state_dict=state, is_main_process=self.is_main,
                                  safe_serialization=True)
        elif self.is_main:
            import os

            from safetensors.torch import save_file

            state, metadata = _untied(state, model)
            tmp = out / "model.safetensors.tmp"
            save_file(state, str(tmp), metadata=metadata or None)
            os.replace(tmp, out / "model.safetensors")

    def reshard(self, model: nn.Module) -> None:
        """FSDP2 keeps some parameters unsharded after a forward (the root's, accelerate's embedding and head unit:
        it expects the backward next): after the run's last evaluation, free them, so that the model ``fit``
        returns holds this rank's shards only, every parameter a DTensor as ``prepare`` left it
        (``p.full_tensor()``, on every rank, gathers one). No communication; changes no value, and nothing without
        FSDP."""
        if self.sharded:
            from erasus.strategies.guard import reshard_fsdp

            reshard_fsdp(model)

    def summary(self, batch_size: int) -> dict:
        """The report's ``processes`` entry."""
        return {"count": self.world, "distributed_type": self.kind, "global_batch": batch_size,
                "per_rank_batch": batch_size // self.world}


def _untied(state: dict, model: nn.Module) -> tuple[dict, dict[str, str]]:
    """A gathered state dict as safetensors' ``save_model`` writes the model: of names that share one tensor in
    ``model`` (tied weights; the gathered copies no longer share storage, so only the model can tell), the first
    in sorted order is kept, and the metadata maps each dropped name to the kept one. Tensors made contiguous."""
    from itertools import chain

    aliases: dict[int, list[str]] = {}
    for name, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
    state, metadata = dict(state), {}
    for names in aliases.values():
        kept, *dropped = sorted(n for n in names if n in state) or [None]
        for name in dropped:
            del state[name]
            metadata[name] = kept
    return {k: v.contiguous() for k, v in state.items()}, metadata


def _check_data_settings(accelerator) -> None:
    """Refuse the data-loader settings under which the ranks would not draw the one process's batches."""
    if accelerator.even_batches is False:
        raise InvalidInputError("accelerator: even_batches=False gives the ranks different numbers of batches, so "
                                "one would wait forever for the others in the guard's all-gather; keep the default "
                                "even_batches=True")
    if accelerator.use_seedable_sampler:
        raise InvalidInputError("accelerator: use_seedable_sampler=True shuffles with accelerate's own seed in an "
                                "order no single process draws, ignoring the run's seed; keep the default False")
    if accelerator.dispatch_batches:
        raise InvalidInputError("accelerator: dispatch_batches=True makes the main process draw every batch and "
                                "send the ranks their slices, which the loop's per-rank loaders do not support; "
                                "keep the default (None or False)")


def _check_fsdp(accelerator, *, copy: bool, adaptive: bool, save_merged: bool) -> None:
    if not getattr(accelerator, "is_fsdp2", False):
        raise InvalidInputError("accelerator: FSDP needs fsdp_version: 2 (the evaluation and the reference call "
                                "the model itself, which FSDP1's wrapper does not allow)")
    if not copy:
        raise InvalidInputError("copy=False with FSDP: FSDP shards the model's parameters in place, so fit could "
                                "not put your model back if the run failed; pass copy=True")
    if adaptive:
        raise InvalidInputError("adaptive=True with FSDP: each round prepares the model again, which FSDP2 does "
                                "only once per model; run the adaptive mode with DDP or in one process")
    if save_merged:
        raise InvalidInputError("save_merged=True with FSDP: merging needs the full weights on one process; save "
                                "the adapter, then merge it in one process")
