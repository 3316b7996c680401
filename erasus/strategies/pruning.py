"""Dual-sensitivity LoRA pruning: prune the attention heads and MLP channels that matter more to the forget set
than to the retain set, scored from LoRA gradients, while a retain floor holds.

Each step makes two backward passes on a peft LoRA model: the forget answers' NLL and the retain NLL. For every
LoRA-wrapped projection that :func:`erasus.tasks.groups.transformer_groups` maps, LoRAPrune's importance
``|G_hat * (W + s B A)|`` (:func:`erasus.ops.lora_importance`) is summed per row or column, L2-normalised per
module (so every module weighs the same and the forget / retain ratio is scale-free) and added into one global
vector over the groups (``block{i}.head{j}``, ``block{i}.channel{c}``): ``I_f`` and ``I_r``, each kept as a
moving average (beta 0.9, an update with NaN / infinity skipped). Every ``prune_every`` steps a round prunes the
``round_ratio`` fraction of the not-yet-pruned groups with the highest ``S = I_f / (I_r + eps)`` (at least one
group; lowest group index first at equal scores), then measures the retain metric of ``min_retain`` forward-only;
a round that crosses the floor is undone and pruning stops. The adapters meanwhile train on
``retain_weight * retain NLL + forget_weight * forget term`` (gradient ascent by default: the recipe tested on
the tiny corpus; NPO is an option), which keeps utility and does the
part of the forgetting that pruning alone does not.

Masks are forward hooks (zeroing masked output rows, or masked input columns, of each mapped module), so a
masked row produces nothing whatever the optimiser does to its weights (momentum, weight decay).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

from erasus.errors import EmptyInputError, InvalidInputError, NonFiniteError
from erasus.losses import npo_from_logprobs
from erasus.ops.dual_sensitivity import dual_sensitivity_mask
from erasus.ops.lora_importance import LoraImportanceEMA
from erasus.strategies.base import GradientStrategy, _nonnegative, _positive
from erasus.strategies.training_free import TrainingFreeStrategy
from erasus.tasks.base import unwrap
from erasus.tasks.groups import transformer_groups
from erasus.tasks.reference import is_peft_model

FORGET_LOSSES = ("npo", "ga", "none")
#: the retain metrics a floor can be set on: name -> True when higher is better (the bound is a minimum)
RETAIN_METRICS = {"retain_qa_acc": True, "retain_rouge": True, "retain_nll": False, "retain_ppl": False}


class GroupMasks:
    """The head / channel masks of the pruning strategies: forward hooks holding 0/1 multipliers over each mapped
    module's rows or columns, and their exports. Reads ``self._groups`` (TransformerGroups), ``self._pruned``
    (bool over the groups), ``self._multipliers``, ``self._hooks`` and ``self._masks_on``, which the strategy
    sets up."""

    def _set_pruned(self, groups: torch.Tensor, value: bool) -> None:
        self._pruned[groups] = value
        for name, module_groups in self._groups.modules.items():
            kept = (~self._pruned[module_groups.ids]).to(self._multipliers[name].dtype)
            self._multipliers[name].copy_(kept.to(self._multipliers[name].device))

    def _register_hooks(self, base: nn.Module) -> None:
        for name, module_groups in self._groups.modules.items():
            module = base.get_submodule(name)
            weight = _base_weight(module)
            multiplier = torch.ones(len(module_groups.ids), dtype=weight.dtype, device=weight.device)
            self._multipliers[name] = multiplier
            if module_groups.axis == "rows":
                self._hooks.append(module.register_forward_hook(self._row_hook(multiplier)))
            else:
                self._hooks.append(module.register_forward_pre_hook(self._column_hook(multiplier)))

    def _row_hook(self, multiplier: torch.Tensor):
        def hook(module, inputs, output):
            if not self._masks_on:
                return None
            return output * multiplier.to(output.dtype)
        return hook

    def _column_hook(self, multiplier: torch.Tensor):
        def hook(module, inputs):
            if not self._masks_on:
                return None
            return (inputs[0] * multiplier.to(inputs[0].dtype), *inputs[1:])
        return hook

    @contextlib.contextmanager
    def unmasked(self):
        """The model without the masks (hooks pass through) for the duration; the masks are kept."""
        was, self._masks_on = self._masks_on, False
        try:
            yield
        finally:
            self._masks_on = was

    def remove_masks(self) -> None:
        """Take the mask hooks off the model (the masks themselves stay readable in :attr:`masks`)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """{module name (in the transformers model, without a peft prefix): bool over its rows (``"rows"``
        groups: output features) or columns (input features), True = kept}."""
        if self._groups is None:
            return {}
        return {name: (~self._pruned[g.ids]).clone() for name, g in self._groups.modules.items()}

    @property
    def mask_axes(self) -> dict[str, str]:
        """{module name: ``"rows"`` or ``"columns"``}: what each mask of :attr:`masks` runs over."""
        return {} if self._groups is None else {name: g.axis for name, g in self._groups.modules.items()}

    @property
    def pruned_groups(self) -> list[str]:
        if self._pruned is None:
            return []
        return [self._groups.names[int(g)] for g in self._pruned.nonzero().flatten()]

    def save_masks(self, path) -> Path:
        """Write :attr:`masks` as safetensors (one bool tensor per module; each axis in the metadata). Reads
        the strategy only."""
        from safetensors.torch import save_file

        if self._groups is None:
            raise InvalidInputError("save_masks: no masks yet; run unlearn first")
        path = Path(path)
        save_file({name: mask.contiguous() for name, mask in self.masks.items()}, str(path),
                  metadata={"axes": ",".join(f"{n}={a}" for n, a in self.mask_axes.items()),
                            "pruned_groups": ",".join(self.pruned_groups)})
        return path

    def apply_masks_to_weights(self, model: nn.Module, masks: dict | None = None) -> nn.Module:
        """Zero the masked rows (and their bias entries) or masked columns of the mapped projections' weights:
        the merged export of a pruned model (``peft_model.merge_and_unload()`` drops the hooks). **Mutates
        ``model``** and returns it. ``masks`` defaults to :attr:`masks` (or pass :func:`load_masks`'s)."""
        if is_peft_model(model) or any(_lora_parts(m) is not None for m in model.modules()):
            raise InvalidInputError("model: apply_masks_to_weights needs the merged model (a LoRA layer's adapter "
                                    "would add its rows back): call merge_and_unload() first")
        masks = self.masks if masks is None else masks
        axes = self.mask_axes or {name: g.axis for name, g in transformer_groups(model).modules.items()}
        with torch.no_grad():
            for name, kept in masks.items():
                module = model.get_submodule(name)
                drop = ~kept.to(module.weight.device)
                # the logical (out x in) matrix is stored (in, out) by transformers' Conv1D
                out_dim = 1 if type(module).__name__ == "Conv1D" else 0
                if axes[name] == "rows":
                    module.weight.index_fill_(out_dim, drop.nonzero().flatten(), 0)
                    if getattr(module, "bias", None) is not None:
                        module.bias[drop] = 0
                else:
                    module.weight.index_fill_(1 - out_dim, drop.nonzero().flatten(), 0)
        return model


class DualSensitivityPruning(GroupMasks, GradientStrategy, name="dual_prune"):
    """Prune the LoRA model's head / MLP-channel groups with the highest forget-to-retain importance ratio.

    Works on a peft LoRA model (``ErasusUnlearner(..., lora=...)`` injects one). **Changes the model in place**:
    the adapters train, and forward hooks holding the masks are registered on the mapped projections (they stay
    on the model after ``unlearn``; :meth:`remove_masks` takes them off, and a failing ``unlearn`` removes them).

    Args:
        prune_every: steps between pruning rounds (the first round comes after ``prune_every`` steps of scoring,
            which also warms up the adapters: at LoRA's init B = 0 the estimate is the rank-r ``G_B A``).
        round_ratio: fraction of the not-yet-pruned groups pruned per round, in (0, 1); at least one group.
        max_pruned: pruning stops once this fraction of the scored groups is pruned, in (0, 1).
        eps: S = I_f / (I_r + eps), > 0.
        beta: the importances' moving-average factor, in [0, 1).
        min_retain: ``(metric, bound)``, the retain floor: ``"retain_qa_acc"`` / ``"retain_rouge"`` (the bound is
            a minimum) or ``"retain_nll"`` / ``"retain_ppl"`` (a maximum), measured forward-only on the retain
            set (the first ``retain_eval_size`` samples when given). None: no floor.
        retain_eval_size: how many retain samples the floor is measured on (None: all).
        forget_loss: the adapters' unlearning term: ``"ga"`` (minus the forget NLL), ``"npo"`` (against the model
            with the adapter off and no masks) or ``"none"`` (pruning alone forgets).
        forget_weight, npo_beta: its weight and NPO's beta.
        lr, optimizer, weight_decay, retain_weight, max_grad_norm, anchor, anchor_weight: as GradientStrategy.

    After a run: :attr:`masks` ({module name: bool over its rows or columns, True = kept}), :attr:`pruned_groups`
    (names), :attr:`pruning_report` (rounds, the groups each pruned, the retain metric after each, the undone
    round), :meth:`save_masks` and :meth:`apply_masks_to_weights` (a merged export).

    Example:
        >>> from erasus.strategies import get_strategy
        >>> strategy = get_strategy("dual_prune", prune_every=4, round_ratio=0.05, min_retain=("retain_nll", 1.0))
        >>> strategy.tasks, strategy.min_retain
        (('causal_lm',), ('retain_nll', 1.0))
    """

    tasks = ("causal_lm",)
    needs_retain = True

    def __init__(self, prune_every: int = 5, round_ratio: float = 0.02, max_pruned: float = 0.3,
                 eps: float = 1e-6, beta: float = 0.9, min_retain: tuple[str, float] | None = None,
                 retain_eval_size: int | None = None, forget_loss: str = "ga", forget_weight: float = 1.0,
                 npo_beta: float = 0.1, lr: float = 1e-3, retain_weight: float = 1.0, **kwargs):
        super().__init__(lr=lr, retain_weight=retain_weight, **kwargs)
        _positive_int("prune_every", prune_every)
        _open_unit("round_ratio", round_ratio)
        _open_unit("max_pruned", max_pruned)
        _positive("eps", eps)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise InvalidInputError(f"beta must be a number in [0, 1), got {beta!r}")
        if forget_loss not in FORGET_LOSSES:
            raise InvalidInputError(f"forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}")
        _nonnegative("forget_weight", forget_weight)
        _positive("npo_beta", npo_beta)
        if retain_eval_size is not None:
            _positive_int("retain_eval_size", retain_eval_size)
        self.prune_every, self.round_ratio, self.max_pruned = prune_every, float(round_ratio), float(max_pruned)
        self.eps, self.beta, self.min_retain = float(eps), float(beta), _check_min_retain(min_retain)
        self.retain_eval_size, self.forget_loss = retain_eval_size, forget_loss
        self.forget_weight, self.npo_beta = forget_weight, npo_beta
        self._reset()

    def _reset(self) -> None:
        self._groups = None            # TransformerGroups of the bound model
        self._scored: dict[str, nn.Module] = {}   # mapped LoRA modules, scored
        self._multipliers: dict[str, torch.Tensor] = {}   # module name -> float 0/1 over its rows / columns
        self._hooks: list = []
        self._pruned: torch.Tensor | None = None   # bool over the global groups
        self._scorable: torch.Tensor | None = None  # groups some LoRA module scores
        self._ema = LoraImportanceEMA(self.beta)  # keys "forget", "retain": global group vectors
        self._masks_on = True
        self._scoring = False
        self._pruning_done: str | None = None
        self._steps = 0
        self._retain_eval = None
        self.pruning_report: dict = {"rounds": [], "undone": None, "stopped": None, "skipped_updates": 0,
                                     "initial_retain_metric": None}

    # -- what the run trains on -------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return super().needs_reference or self.forget_loss == "npo"

    def reference_outputs(self, model, batch):
        with self.unmasked():  # the reference is the model before unlearning: adapter off and nothing pruned
            return super().reference_outputs(model, batch)

    def method_loss(self, model, forget_batch, retain_batch):
        if retain_batch is None:
            raise InvalidInputError("dual_prune needs a retain batch: its importance ratio and its training loss "
                                    "use retain data")
        forget_logits = self.outputs(model, forget_batch)
        forget_nll = self.nll(model, forget_batch, forget_logits)
        retain_nll = self.nll(model, retain_batch)
        if self._scoring:
            self._score(forget_nll, retain_nll)
        total = self.retain_weight * retain_nll
        if self.forget_loss == "ga" and self.forget_weight:
            total = total - self.forget_weight * forget_nll
        elif self.forget_loss == "npo" and self.forget_weight:
            ref = self.task.sequence_logprob(self.reference_outputs(model, forget_batch), forget_batch)
            logp = self.task.sequence_logprob(forget_logits, forget_batch)
            total = total + self.forget_weight * npo_from_logprobs(logp, ref, self.npo_beta).mean()
        return total

    # -- the run ----------------------------------------------------------------------------------------
    def unlearn(self, model, forget, retain=None, **kwargs):
        """As :meth:`GradientStrategy.unlearn`; the log adds ``"pruning"`` (:attr:`pruning_report`). If the run
        fails (anything but the unlearner's target-reached stop), the mask hooks are removed before re-raising."""
        from erasus.unlearner import TargetReached

        self.remove_masks()
        self._reset()
        try:
            log = super().unlearn(model, forget, retain, **kwargs)
        except TargetReached:
            self._scoring = False
            raise
        except BaseException:
            self.remove_masks()
            raise
        finally:
            self._scoring = False
        log["pruning"] = self.pruning_report
        return log

    def prepare(self, model, forget, retain):
        """Map the groups, find the LoRA modules, register the (all-kept) mask hooks and measure the retain
        metric before pruning. Registers hooks on ``model``."""
        self._groups = _map_groups(model)
        base = unwrap(model)
        for name, module_groups in self._groups.modules.items():
            module = base.get_submodule(name)
            if _lora_parts(module) is not None:
                self._scored[name] = module
        if not self._scored:
            if not any(_lora_parts(m) is not None for m in base.modules()):
                raise InvalidInputError("model: dual_prune works on a peft LoRA model and this one has no LoRA "
                                        "layers; pass lora=... to ErasusUnlearner (or a peft model)")
            raise InvalidInputError("model: none of the projections that carry head / channel groups "
                                    f"({sorted(self._groups.modules)[:4]}...) is LoRA-wrapped; target them with lora=")
        n = self._groups.n_groups
        self._pruned = torch.zeros(n, dtype=torch.bool)
        self._scorable = torch.zeros(n, dtype=torch.bool)
        for name in self._scored:
            self._scorable[self._groups.modules[name].ids] = True
        self._register_hooks(base)
        self._retain_eval = self._retain_eval_set(retain)
        if self.min_retain is not None:
            self.pruning_report["initial_retain_metric"] = self._retain_metric(model)
        self._scoring = True

    def after_step(self, model):
        self._steps += 1
        if self._pruning_done is None and self._steps % self.prune_every == 0:
            self._round(model)

    # -- scoring ----------------------------------------------------------------------------------------
    def _score(self, forget_nll: torch.Tensor, retain_nll: torch.Tensor) -> None:
        """Both group-importance vectors from separate gradients of the two NLLs (torch.autograd.grad, so the
        parameters' .grad is untouched), folded into their moving averages."""
        params = []
        for module in self._scored.values():
            parts = _lora_parts(module)
            params += [parts["A"], parts["B"]]
        for side, loss in (("forget", forget_nll), ("retain", retain_nll)):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            try:
                vector = self._group_importance(grads)
            except NonFiniteError:
                self.pruning_report["skipped_updates"] += 1
                continue
            self._ema.update(side, vector)

    @torch.no_grad()
    def _group_importance(self, grads) -> torch.Tensor:
        from erasus.ops import lora_importance

        total = torch.zeros(self._groups.n_groups, dtype=torch.float64)
        for k, (name, module) in enumerate(self._scored.items()):
            parts = _lora_parts(module)
            grad_A, grad_B = grads[2 * k], grads[2 * k + 1]
            grad_A = torch.zeros_like(parts["A"]) if grad_A is None else grad_A
            grad_B = torch.zeros_like(parts["B"]) if grad_B is None else grad_B
            module_groups = self._groups.modules[name]
            out_features, in_features = parts["B"].shape[0], parts["A"].shape[1]
            along = ("out", out_features) if module_groups.axis == "rows" else ("in", in_features)
            per_line = lora_importance(parts["weight"], parts["A"], parts["B"], grad_A, grad_B,
                                       scaling=parts["scaling"], fan_in_fan_out=parts["fan_in_fan_out"],
                                       groups=along).double().cpu()
            norm = per_line.norm()
            if norm > 0:  # LoRAPrune: each module's vector L2-normalised, so modules weigh the same
                total.index_add_(0, module_groups.ids, per_line / norm)
        return total.float()

    # -- rounds -----------------------------------------------------------------------------------------
    def _round(self, model) -> None:
        candidates = (self._scorable & ~self._pruned).nonzero().flatten()
        limit = math.floor(self.max_pruned * int(self._scorable.sum()) + 1e-9) - int(self._pruned.sum())
        if len(candidates) == 0 or limit < 1:
            self._pruning_done = "no group left" if len(candidates) == 0 else "max_pruned reached"
            self.pruning_report["stopped"] = self._pruning_done
            return
        if "forget" not in self._ema or "retain" not in self._ema:
            return  # nothing scored yet (every update skipped)
        k = min(limit, len(candidates), max(1, math.ceil(self.round_ratio * len(candidates) - 1e-9)))
        chosen = candidates[_highest_ratio(self._ema["forget"][candidates], self._ema["retain"][candidates],
                                           self.eps, k)]
        scores = self._ema["forget"][chosen] / (self._ema["retain"][chosen] + self.eps)
        self._set_pruned(chosen, True)
        entry = {"step": self._steps, "groups": [self._groups.names[int(g)] for g in chosen],
                 "scores": [float(s) for s in scores]}
        if self.min_retain is not None:
            metric, bound = self.min_retain
            value = self._retain_metric(model)
            entry["retain_metric"] = {metric: value}
            if not _holds(metric, value, bound):
                self._set_pruned(chosen, False)
                self.pruning_report["undone"] = entry
                self._pruning_done = (f"retain floor: {metric} {value:.4g} would cross {bound:.4g}; "
                                      f"round at step {self._steps} undone")
                self.pruning_report["stopped"] = self._pruning_done
                return
        self.pruning_report["rounds"].append(entry)

    def _retain_eval_set(self, retain):
        if self.min_retain is None:
            return None
        dataset = getattr(retain, "dataset", None)
        loader = getattr(retain, "loader", None)  # the unlearner's counting wrapper
        if dataset is None and loader is not None:
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise InvalidInputError("min_retain: the retain floor is measured on the retain dataset; pass retain "
                                    "as a DataLoader over a QA dataset (the unlearner does)")
        if self.retain_eval_size is not None and self.retain_eval_size < len(dataset):
            dataset = torch.utils.data.Subset(dataset, range(self.retain_eval_size))
        return dataset

    @torch.no_grad()
    def _retain_metric(self, model) -> float:
        """The floor's metric on the retain evaluation set, forward-only (eval mode, restored after)."""
        from erasus.metrics import lm

        metric = self.min_retain[0]
        if metric == "retain_nll":
            return float(lm.answer_nll(model, self._retain_eval).mean())
        if metric == "retain_ppl":
            return lm.perplexity(model, self._retain_eval)
        if metric == "retain_qa_acc":
            return lm.qa_accuracy(model, self._retain_eval)
        return lm.qa_rouge(model, self._retain_eval)


def load_masks(path) -> dict[str, torch.Tensor]:
    """The masks a :meth:`GroupMasks.save_masks` file holds: {module name: bool, True = kept}."""
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------- helpers
def _highest_ratio(imp_forget: torch.Tensor, imp_retain: torch.Tensor, eps: float, k: int) -> torch.Tensor:
    """Sorted positions of the k highest ``imp_forget / (imp_retain + eps)`` (float32 scores), ties broken by
    lowest position first: :func:`erasus.ops.dual_sensitivity_mask` in ratio mode, asked for exactly k units."""
    n = len(imp_forget)
    if k >= n:
        return torch.arange(n)
    # the op prunes floor(ratio * n) units, ratio read as its decimal repr: (k + 1/2) / n floors to k exactly
    result = dual_sensitivity_mask(imp_forget.float(), imp_retain.float(), eps=eps, ratio=(k + 0.5) / n)
    return result.masks.nonzero().flatten()


def _map_groups(model: nn.Module):
    try:
        return transformer_groups(unwrap(model))
    except InvalidInputError as exc:
        raise InvalidInputError(f"model: dual_prune cannot map its heads / MLP channels: {exc}") from exc


def _lora_parts(module: nn.Module) -> dict | None:
    """The active adapter of a peft LoRA layer: base weight, A, B, scaling, fan_in_fan_out; None otherwise."""
    lora_A, lora_B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(lora_A, nn.ModuleDict) or not isinstance(lora_B, nn.ModuleDict):
        return None
    active = [a for a in getattr(module, "active_adapters", []) if a in lora_A]
    if not active:
        return None
    if len(active) > 1:
        raise InvalidInputError(f"model: {len(active)} LoRA adapters are active at once ({active}); dual_prune "
                                "scores one")
    name = active[0]
    return {"weight": _base_weight(module), "A": lora_A[name].weight, "B": lora_B[name].weight,
            "scaling": module.scaling[name], "fan_in_fan_out": bool(getattr(module, "fan_in_fan_out", False))}


def _base_weight(module: nn.Module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


def _check_min_retain(min_retain):
    if min_retain is None:
        return None
    if (not isinstance(min_retain, (tuple, list)) or len(min_retain) != 2 or not isinstance(min_retain[0], str)
            or isinstance(min_retain[1], bool) or not isinstance(min_retain[1], (int, float))
            or not math.isfinite(min_retain[1])):
        raise InvalidInputError(f"min_retain must be None or (metric name, finite bound), got {min_retain!r}")
    if min_retain[0] not in RETAIN_METRICS:
        raise InvalidInputError(f"min_retain: unknown retain metric {min_retain[0]!r}; one of {sorted(RETAIN_METRICS)}")
    return (min_retain[0], float(min_retain[1]))


def _holds(metric: str, value: float, bound: float) -> bool:
    return value >= bound if RETAIN_METRICS[metric] else value <= bound


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def _open_unit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InvalidInputError(f"{name} must be a number in (0, 1), got {value!r}")


# ------------------------------------------------------------------------------------- Selective Pruning
class SelectivePruning(GroupMasks, TrainingFreeStrategy, name="selective_pruning"):
    """Selective Pruning (Pochinkov & Schoots, arXiv 2403.01267), written from the paper: the baseline
    ``dual_prune`` is measured against. Training-free, one forward pass over the forget set and one over the
    retain set, no gradients.

    Each attention head group and MLP channel is scored by the mean absolute *input activation* of its columns
    of the output projections (``o_proj`` / ``c_proj`` columns per head group, ``down_proj`` / ``c_proj`` columns
    per channel: the ``"columns"`` groups of :func:`erasus.tasks.groups.transformer_groups`), averaged over the
    non-padding tokens (``attention_mask``) and over the group's columns: ``I_f`` on the forget set, ``I_r`` on
    the retain set. The top ``ratio`` fraction of the groups by ``S = I_f / (I_r + eps)``
    (:func:`erasus.ops.dual_sensitivity_mask`: ``floor(ratio * n)`` groups, lowest index first at equal scores)
    is pruned by zeroing those columns' inputs with forward pre-hooks -- dual_prune's mask hooks, shared.

    Works on a plain or a peft causal LM. **Changes the model in place**: registers the mask pre-hooks on the
    output projections (they stay after ``unlearn``; :meth:`remove_masks` takes them off; a failing ``unlearn``
    removes them); the weights are not touched (:meth:`apply_masks_to_weights` writes the masks into a merged
    model's weights).

    Args:
        ratio: fraction of the groups pruned, in (0, 1).
        eps: S = I_f / (I_r + eps), > 0 (the paper's 1e-5).

    After a run: :attr:`importances` (``{"forget", "retain"}``: float32 over the global groups), :attr:`masks`,
    :attr:`mask_axes`, :attr:`pruned_groups`, :meth:`save_masks` as dual_prune's (``"columns"`` masks only).

    Example:
        >>> from erasus.strategies import get_strategy
        >>> strategy = get_strategy("selective_pruning", ratio=0.05)
        >>> strategy.tasks, strategy.training_free, strategy.ratio
        (('causal_lm',), True, 0.05)
    """

    tasks = ("causal_lm",)

    def __init__(self, ratio: float = 0.05, eps: float = 1e-5):
        _open_unit("ratio", ratio)
        _positive("eps", eps)
        self.ratio, self.eps = float(ratio), float(eps)
        self._hooks: list = []
        self._reset()

    def _reset(self) -> None:
        self._groups = None        # TransformerGroups restricted to the output projections ("columns")
        self._pruned: torch.Tensor | None = None
        self._multipliers: dict[str, torch.Tensor] = {}
        self._masks_on = True
        self._task = None
        self.importances: dict[str, torch.Tensor] = {}

    def unlearn(self, model, forget, retain=None, *, task=None, **kwargs):
        """As :meth:`TrainingFreeStrategy.unlearn`; the log adds ``"pruned"`` (count) and ``"pruned_groups"``.
        If the run fails, the mask hooks are removed before re-raising."""
        from erasus.tasks import infer_task

        self.remove_masks()
        self._reset()
        self._task = infer_task(model, task)
        try:
            return super().unlearn(model, forget, retain, task=self._task, **kwargs)
        except BaseException:
            self.remove_masks()
            raise

    def edit(self, model, forget, retain, loss_fn) -> dict:
        """Score the groups on ``forget`` and ``retain`` (eval mode, no gradients), then register the masks of
        the top ``ratio`` fraction on ``model``."""
        self._groups = _column_groups(model)
        self._pruned = torch.zeros(self._groups.n_groups, dtype=torch.bool)
        self.importances = {"forget": self.activation_importance(model, forget),
                            "retain": self.activation_importance(model, retain)}
        # groups no output projection reads (none in a mapped transformer) keep I = 0 on both sides: S = 0
        result = dual_sensitivity_mask(self.importances["forget"], self.importances["retain"], eps=self.eps,
                                       ratio=self.ratio)
        self._register_hooks(unwrap(model))
        self._set_pruned(result.masks, True)
        return {"pruned": int(result.pruned), "pruned_groups": self.pruned_groups}

    @torch.no_grad()
    def activation_importance(self, model, batches) -> torch.Tensor:
        """float32 over the global groups: the mean |input activation| of each group's output-projection columns
        over the non-padding tokens of ``batches`` (token dicts with ``attention_mask``). Runs the model
        forward (its train / eval mode is the caller's); registers temporary hooks and removes them."""
        from erasus._device import model_device, to_device

        if self._groups is None:
            self._groups = _column_groups(model)
        groups, base, device = self._groups, unwrap(model), model_device(model)
        task = self._task or _causal_lm_task(model)
        sums = {name: torch.zeros(len(g.ids), dtype=torch.float64) for name, g in groups.modules.items()}
        state = {"mask": None, "tokens": 0}

        def collector(name):
            def hook(module, inputs):
                x = inputs[0].detach().abs().double()
                sums[name] += (x * state["mask"].unsqueeze(-1)).sum(dim=tuple(range(x.dim() - 1))).cpu()
            return hook

        handles = [base.get_submodule(name).register_forward_pre_hook(collector(name)) for name in groups.modules]
        try:
            for batch in batches:
                batch = to_device(batch, device)
                inputs = task.model_inputs(batch)
                mask = inputs.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(inputs["input_ids"])
                state["mask"] = mask.to(torch.float64)
                state["tokens"] += int(mask.sum())
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        if state["tokens"] == 0:
            raise EmptyInputError("batches: no non-padding token to measure activations on")
        totals = torch.zeros(groups.n_groups, dtype=torch.float64)
        columns = torch.zeros(groups.n_groups, dtype=torch.float64)
        for name, module_groups in groups.modules.items():
            totals.index_add_(0, module_groups.ids, sums[name])
            columns.index_add_(0, module_groups.ids, torch.ones(len(module_groups.ids), dtype=torch.float64))
        return (totals / (columns.clamp(min=1) * state["tokens"])).float()


def _column_groups(model: nn.Module):
    """transformer_groups of ``model`` restricted to the output projections (the ``"columns"`` groups)."""
    from erasus.tasks.groups import TransformerGroups

    try:
        groups = transformer_groups(unwrap(model))
    except InvalidInputError as exc:
        raise InvalidInputError(f"model: selective_pruning cannot map its heads / MLP channels: {exc}") from exc
    return TransformerGroups({n: g for n, g in groups.modules.items() if g.axis == "columns"}, groups.names)


def _causal_lm_task(model):
    from erasus.tasks import infer_task

    return infer_task(model, None)
