"""Structured groups of a transformer's weights -- attention heads and MLP channels -- discovered from its config
and module shapes, not written per architecture: anything with the config attributes GPT-2 and Llama share
(``num_attention_heads``, ``hidden_size``, optionally ``num_key_value_heads``, ``head_dim``,
``intermediate_size`` / ``n_inner``) and decoder blocks holding an attention and an MLP submodule maps.

A group is a unit pruning removes as a whole: one attention head group of a block (its query rows, the matching
key/value rows -- under grouped-query attention the key/value head a query head reads, so a group is one
key/value head with its query heads -- and the output projection's input columns), or one MLP channel (a row of
the up / gate projections and the matching column of the down projection).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
    ...                     eos_token_id=0)
    >>> model = GPT2LMHeadModel(config)
    >>> groups = transformer_groups(model)
    >>> groups.n_groups, groups.names[:2], groups.names[-1]
    (264, ['block0.head0', 'block0.head1'], 'block1.channel127')
    >>> m = groups.modules["transformer.h.0.attn.c_attn"]
    >>> m.axis, m.ids.shape, m.ids[[0, 8, 32, 64]].tolist()   # rows of the (out x in) weight: q, k, v heads
    ('rows', torch.Size([96]), [0, 1, 0, 0])
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from erasus.errors import InvalidInputError
from erasus.tasks.base import decoder_blocks, unwrap

ATTENTION_NAMES = ("attn", "attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclasses.dataclass(frozen=True)
class ModuleGroups:
    """The groups of one weight: ``axis`` ``"rows"`` (output features) or ``"columns"`` (input features) of its
    logical (out x in) matrix -- for GPT-2's Conv1D, whose weight is stored (in x out), the transpose of what is
    stored -- and ``ids`` (int64, one global group index per row or column)."""

    axis: str
    ids: torch.Tensor

    def element_ids(self, out_features: int, in_features: int) -> torch.Tensor:
        """(out, in) int64: each element's group."""
        if self.axis == "rows":
            return self.ids[:, None].expand(out_features, in_features)
        return self.ids[None, :].expand(out_features, in_features)


@dataclasses.dataclass(frozen=True)
class TransformerGroups:
    """``modules``: {module name (as ``model.named_modules()`` gives it): ModuleGroups}; ``names``: the global
    group names (``block{i}.head{j}``, ``block{i}.channel{c}``), indexed by the ids."""

    modules: dict[str, ModuleGroups]
    names: list[str]

    @property
    def n_groups(self) -> int:
        return len(self.names)


def transformer_groups(model: nn.Module) -> TransformerGroups:
    """The head and MLP-channel groups of every attention / MLP projection of a transformers causal LM (peft
    wrapped or not; a LoRA layer is mapped by its base layer's shape). Does not change the model. Raises
    InvalidInputError naming the model and what could not be mapped (no config, no decoder blocks, a projection
    whose shape matches no head or channel layout)."""
    base = unwrap(model)
    dims = _dims(base)
    _, blocks = decoder_blocks(model)
    block_of = {id(block): i for i, block in enumerate(blocks)}
    names: list[str] = []
    first_group: dict[tuple[int, str], int] = {}
    for i in range(len(blocks)):
        first_group[(i, "head")] = len(names)
        names += [f"block{i}.head{j}" for j in range(dims.kv_heads)]
        first_group[(i, "channel")] = len(names)
        names += [f"block{i}.channel{c}" for c in range(dims.intermediate)]
    modules: dict[str, ModuleGroups] = {}
    for block_name, block in ((n, m) for n, m in model.named_modules() if id(m) in block_of):
        i = block_of[id(block)]
        parts: dict[str, list[tuple[str, tuple[int, int]]]] = {"attention": [], "mlp": []}
        for name, module in block.named_modules():
            shape = _logical_shape(module)
            if shape is None or _is_adapter_part(name):
                continue
            full = f"{block_name}.{name}"
            part = _part(name)
            if part is None:
                raise InvalidInputError(f"{type(base).__name__}: cannot tell whether {full} belongs to attention or "
                                        f"the MLP (its parent is named neither {ATTENTION_NAMES} nor {MLP_NAMES})")
            parts[part].append((full, shape))
        for part, projections in parts.items():
            start = first_group[(i, "head" if part == "attention" else "channel")]
            # the last projection of each part is its output (o_proj, c_proj, down_proj): registration order is
            # what tells it from an input projection when the shapes are square
            for k, (full, shape) in enumerate(projections):
                modules[full] = _map(part, shape, dims, start, full, type(base).__name__,
                                     output=k == len(projections) - 1)
    if not modules:
        raise InvalidInputError(f"{type(base).__name__}: its decoder blocks hold no linear projection to group")
    return TransformerGroups(modules, names)


@dataclasses.dataclass(frozen=True)
class _Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def _dims(model: nn.Module) -> _Dims:
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise InvalidInputError(f"{name} has no transformers config: its head and channel groups cannot be found")
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
        raise InvalidInputError(f"{name}: config has no hidden_size / num_attention_heads to find attention heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    if heads % kv_heads:
        raise InvalidInputError(f"{name}: {heads} attention heads do not divide into {kv_heads} key/value heads")
    return _Dims(hidden, heads, kv_heads, head_dim, intermediate)


def _logical_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear projection (nn.Linear, transformers' Conv1D, or a peft LoRA layer's base)."""
    layer = getattr(module, "base_layer", module)
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if type(layer).__name__ == "Conv1D" and layer.weight.dim() == 2:  # transformers' Conv1D stores (in, out)
        return layer.weight.shape[1], layer.weight.shape[0]
    return None


def _is_adapter_part(name: str) -> bool:
    """A peft LoRA layer's inner modules (its base layer and adapter factors): mapped through the wrapper."""
    return any(p == "base_layer" or p.startswith("lora_") for p in name.split("."))


def _part(name: str) -> str | None:
    parts = name.split(".")
    if any(any(key in p for key in ATTENTION_NAMES) for p in parts[:-1] or parts):
        return "attention"
    if any(any(key in p for key in MLP_NAMES) for p in parts[:-1] or parts):
        return "mlp"
    return None


def _map(part: str, shape: tuple[int, int], dims: _Dims, start: int, name: str, model: str, *,
         output: bool) -> ModuleGroups:
    out_features, in_features = shape
    q_dim, kv_dim = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    per_kv = dims.heads // dims.kv_heads
    query = torch.arange(q_dim) // dims.head_dim // per_kv  # query head -> its key/value head's group
    keyval = torch.arange(kv_dim) // dims.head_dim
    channels = torch.arange(dims.intermediate)
    if part == "attention" and output and (out_features, in_features) == (dims.hidden, q_dim):
        return ModuleGroups("columns", start + query)
    if part == "mlp" and output and (out_features, in_features) == (dims.hidden, dims.intermediate):
        return ModuleGroups("columns", start + channels)
    if part == "attention" and not output and in_features == dims.hidden:
        if out_features == q_dim:
            return ModuleGroups("rows", start + query)
        if out_features == kv_dim:
            return ModuleGroups("rows", start + keyval)
        if out_features == q_dim + 2 * kv_dim:  # fused q, k, v (GPT-2's c_attn)
            return ModuleGroups("rows", start + torch.cat([query, keyval, keyval]))
    if part == "mlp" and not output and (out_features, in_features) == (dims.intermediate, dims.hidden):
        return ModuleGroups("rows", start + channels)
    role = "output" if output else "input"
    raise InvalidInputError(f"{model}: {name} ({out_features} x {in_features}) matches no {part} {role} projection "
                            f"layout of hidden {dims.hidden}, {dims.heads} heads ({dims.kv_heads} key/value) of "
                            f"{dims.head_dim}, intermediate {dims.intermediate}")
