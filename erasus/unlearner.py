"""ErasusUnlearner: score and select a coreset of the forget set, unlearn it with a strategy, evaluate, report."""
from __future__ import annotations

import copy as copy_module
import inspect
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm

from erasus.errors import EmptyInputError, InvalidInputError
from erasus.metrics import accuracy, average_gap, mia_efficacy
from erasus.selectors import SELECTORS, get_selector
from erasus.strategies import STRATEGIES, TrainingGuard, frozen_copy, get_strategy


class ErasusUnlearner:
    """The one orchestrator: coreset selection -> strategy -> evaluation -> report.

    Args:
        model: a classifier ``model(x) -> logits``. **Changed in place** unless ``copy=True``, which unlearns a
            deep copy and leaves ``model`` untouched.
        strategy: a registered strategy name (``erasus.strategies.STRATEGIES``) or a Strategy instance.
        selector: a registered selector name (``erasus.selectors.SELECTORS``), a Selector instance, or None
            for the full forget set.
        prune_ratio: the fraction of the forget set kept as the coreset (the forget set is pruned to this
            ratio): 0.2 unlearns on 20% of it. 1.0 (or ``selector=None``) uses all of it. Forgetting is
            always evaluated on the whole forget set and, separately, on the part left out.
        strategy_params / selector_params: keyword arguments for the registered classes.
        epochs, batch_size, seed: the unlearning loop's passes over the coreset, batch size and shuffling seed.
        progress: show a tqdm bar of the unlearning steps.
        out_dir: if given, ``fit`` writes report.json, report.md, PNG plots and the unlearned weights
            (model.safetensors) there.

    Example:
        >>> import torch
        >>> from erasus import ErasusUnlearner
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> x, y = torch.randn(60, 4), torch.randint(0, 2, (60,))
        >>> unlearner = ErasusUnlearner(model, strategy="graddiff", selector="kcenter", prune_ratio=0.5, copy=True)
        >>> new_model, report = unlearner.fit((x[:10], y[:10]), (x[10:], y[10:]), epochs=2)
        >>> report["coreset_size"], new_model is model
        (5, False)
    """

    def __init__(self, model: nn.Module, strategy="npo", selector="kcenter", prune_ratio: float = 0.2, *,
                 strategy_params: dict | None = None, selector_params: dict | None = None, epochs: int = 5,
                 batch_size: int = 32, copy: bool = False, seed: int = 0, out_dir: str | Path | None = None,
                 progress: bool = False):
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not 0 < prune_ratio <= 1:
            raise InvalidInputError(f"prune_ratio must be in (0, 1], got {prune_ratio!r}")
        self.model = model
        self.strategy = (get_strategy(strategy, **_seeded(STRATEGIES, strategy, strategy_params, seed))
                         if isinstance(strategy, str) else strategy)
        self.selector = (get_selector(selector, **_seeded(SELECTORS, selector, selector_params, seed))
                         if isinstance(selector, str) else selector)
        self.prune_ratio, self.epochs, self.batch_size = prune_ratio, epochs, batch_size
        self.copy, self.seed, self.out_dir, self.progress = copy, seed, out_dir, progress

    def fit(self, forget, retain, *, epochs: int | None = None, test=None, retrained: nn.Module | None = None,
            snapshot_every: int = 1) -> tuple[nn.Module, dict]:
        """Unlearn ``forget`` while keeping ``retain``. Each is a Dataset, a DataLoader or an ``(inputs, labels)``
        pair of tensors. ``test`` (optional) adds TA and the MIA; ``retrained`` (a model trained on retain
        only) adds the gaps to it. Returns ``(model, report)``."""
        forget_ds, retain_ds = as_dataset(forget, "forget"), as_dataset(retain, "retain")
        check_disjoint(forget_ds, retain_ds)
        test_ds = as_dataset(test, "test") if test is not None else None
        epochs = self.epochs if epochs is None else epochs
        model = copy_module.deepcopy(self.model) if self.copy else self.model
        original = frozen_copy(model)
        started = time.perf_counter()

        n_forget = len(forget_ds)
        chosen = self._select(forget_ds, model)
        t_select = time.perf_counter() - started
        coreset = Subset(forget_ds, chosen.tolist())
        rest = Subset(forget_ds, sorted(set(range(n_forget)) - set(chosen.tolist())))

        g = torch.Generator().manual_seed(self.seed)
        forget_loader = CountingLoader(DataLoader(coreset, batch_size=self.batch_size, shuffle=True, generator=g))
        retain_loader = DataLoader(retain_ds, batch_size=self.batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(self.seed + 1))
        curves = {"step": [], "loss": [], "epoch": [], "forget_acc": [], "retain_acc": []}

        label = getattr(self.strategy, "name", type(self.strategy).__name__)
        bar = tqdm(total=epochs * len(forget_loader), desc=f"unlearning ({label})", unit="step",
                   disable=not self.progress, file=sys.stderr)

        def on_step(info):
            curves["step"].append(info["step"])
            curves["loss"].append(info["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.4g}")

        def on_epoch(epoch):
            curves["epoch"].append(epoch + 1)
            curves["forget_acc"].append(accuracy(model, forget_ds))
            curves["retain_acc"].append(accuracy(model, retain_ds))

        guard = TrainingGuard(model, snapshot_every=snapshot_every)
        t0 = time.perf_counter()
        log = self.strategy.unlearn(model, forget_loader, retain_loader, epochs=epochs, original=original,
                                    on_step=on_step, on_epoch=on_epoch, guard=guard)
        t_unlearn = time.perf_counter() - t0
        bar.close()
        model.eval()

        metrics = {"UA": 1 - accuracy(model, forget_ds), "RA": accuracy(model, retain_ds)}
        if len(rest):
            metrics["UA_unselected"] = 1 - accuracy(model, rest)
        if test_ds is not None:
            metrics["TA"] = accuracy(model, test_ds)
            metrics["MIA"] = mia_efficacy(model, retain_ds, test_ds, forget_ds)
        report = {
            "strategy": repr(self.strategy), "selector": repr(self.selector), "prune_ratio": self.prune_ratio,
            "forget_size": n_forget, "coreset_size": len(coreset), "retain_size": len(retain_ds),
            "epochs": epochs, "seed": self.seed, "in_place": not self.copy,
            "forget_sample_passes": forget_loader.samples,
            "time_select_s": t_select, "time_unlearn_s": t_unlearn, "time_total_s": time.perf_counter() - started,
            "metrics": metrics, "original": self._reference_metrics(original, forget_ds, retain_ds, test_ds),
            "guard": {"stopped": log.get("stopped"), "events": guard.events},
            "curves": curves, "log": {k: v for k, v in log.items() if k not in ("stopped",)},
        }
        if retrained is not None:
            ref = self._reference_metrics(retrained, forget_ds, retain_ds, test_ds)
            report["retrained"] = ref
            report["gap_to_retrained"] = {k: abs(metrics[k] - ref[k]) for k in ref if k in metrics}
            report["avg_gap"] = average_gap(metrics, ref)
        if self.out_dir is not None:
            from safetensors.torch import save_model

            from erasus.report import write_report

            out = write_report(report, self.out_dir)
            save_model(model, str(out / "model.safetensors"))  # safetensors, never pickle
        return model, report

    def _select(self, forget_ds: Dataset, model: nn.Module) -> torch.Tensor:
        n = len(forget_ds)
        if self.selector is None or self.prune_ratio >= 1:
            return torch.arange(n)
        k = max(1, math.ceil(self.prune_ratio * n - 1e-9))
        return self.selector.select(forget_ds, k=k, model=model).cpu()

    @staticmethod
    def _reference_metrics(model, forget_ds, retain_ds, test_ds) -> dict:
        ref = {"UA": 1 - accuracy(model, forget_ds), "RA": accuracy(model, retain_ds)}
        if test_ds is not None:
            ref["TA"] = accuracy(model, test_ds)
            ref["MIA"] = mia_efficacy(model, retain_ds, test_ds, forget_ds)
        return ref


def _seeded(registry: dict, name: str, params: dict | None, seed: int) -> dict:
    """The run's seed goes to a registered class that takes one, unless the caller set it."""
    params = dict(params or {})
    cls = registry.get(name)
    if cls is not None and "seed" in inspect.signature(cls.__init__).parameters:
        params.setdefault("seed", seed)
    return params


class CountingLoader:
    """Wraps a DataLoader and counts the samples drawn from it: the forget-side cost of a run."""

    def __init__(self, loader: DataLoader):
        self.loader, self.samples = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.samples += len(batch[1])
            yield batch

    def __len__(self):
        return len(self.loader)


def as_dataset(data, name: str) -> Dataset:
    """A Dataset from a Dataset, a DataLoader (its dataset) or an ``(inputs, labels)`` pair of tensors."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if data[0].shape[0] != data[1].shape[0]:
            raise InvalidInputError(f"{name}: inputs and labels have different lengths "
                                    f"({data[0].shape[0]} and {data[1].shape[0]})")
        data = TensorDataset(data[0], data[1])
    if not isinstance(data, Dataset):
        raise InvalidInputError(f"{name} must be a Dataset, a DataLoader or an (inputs, labels) pair of tensors, "
                                f"got {type(data).__name__}")
    if len(data) == 0:
        raise EmptyInputError(f"{name} set is empty")
    return data


def _root(ds: Dataset) -> tuple[Dataset, list[int]]:
    """The underlying dataset and the indices into it, through nested Subsets."""
    indices = list(range(len(ds)))
    while isinstance(ds, Subset):
        indices = [ds.indices[i] for i in indices]
        ds = ds.dataset
    return ds, indices


def check_disjoint(forget: Dataset, retain: Dataset) -> None:
    """Forget and retain must not share samples: the same indices of one dataset, or identical input rows."""
    f_root, f_idx = _root(forget)
    r_root, r_idx = _root(retain)
    if f_root is r_root:
        shared = set(f_idx) & set(r_idx)
        if shared:
            raise InvalidInputError(f"forget and retain overlap in {len(shared)} samples (e.g. index "
                                    f"{min(shared)}): a sample cannot be both forgotten and kept")
        return
    if isinstance(f_root, TensorDataset) and isinstance(r_root, TensorDataset):
        f_rows = f_root.tensors[0][f_idx].reshape(len(f_idx), -1)
        r_rows = r_root.tensors[0][r_idx].reshape(len(r_idx), -1)
        keys = {bytes(row.numpy().tobytes()) for row in f_rows.cpu()}
        shared = sum(bytes(row.numpy().tobytes()) in keys for row in r_rows.cpu())
        if shared:
            raise InvalidInputError(f"forget and retain share {shared} identical input rows")
