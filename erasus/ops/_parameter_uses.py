"""Check that every trainable parameter reaches the loss only through the forward of a layer that owns it.

The per-sample functions (norms, Fisher) see a layer's inputs and the gradient at its output, so they account
for the uses of a parameter inside that layer's own forward and for nothing else. A weight also used outside
it -- ``F.linear(h, lin.weight)`` in a custom forward, ``h @ emb.weight.T`` as a hand-tied head, a weight read
by another layer, a penalty on the weights in the loss -- would silently miss those gradient terms.

The check walks the autograd graph of the losses once (each node at most once) with the output node of every
hooked layer call as a boundary: from the losses, and from each layer's output inward, it collects the
parameters reached before the next boundary. A parameter reached from the losses without crossing a layer
output, or from the output of a layer that does not own it, is used outside its layer.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from erasus.errors import UnsupportedLayerError

_EMPTY: frozenset = frozenset()


def check_parameter_uses(losses: torch.Tensor, layer_outputs: Iterable[tuple[str, nn.Module, torch.Tensor]],
                         params: dict[int, str]) -> None:
    """Raise UnsupportedLayerError naming a parameter used outside the forward of every layer that owns it.

    ``layer_outputs``: (layer name, module, the output its forward returned) per hooked call; ``params``: id
    of each trainable parameter -> its qualified name. Owners are the modules holding the parameter directly,
    so a tied weight (a head sharing an embedding's matrix) is owned by both layers.
    """
    root = losses.grad_fn
    if root is None:
        return
    boundaries = {}
    for name, module, output in layer_outputs:
        if output.grad_fn is not None:
            owned = frozenset(id(p) for p in module.parameters(recurse=False) if id(p) in params)
            boundaries[output.grad_fn] = (name, owned)
    walk = _Reach(boundaries, params)
    stray = _EMPTY if root in boundaries else walk.inward(root)  # losses that are a layer's output: all inside
    if stray:
        pid = min(stray, key=lambda i: params[i])
        raise _misuse(params[pid], "outside the forward of any layer", walk.path(root, pid))
    for node, (name, owned) in boundaries.items():
        stray = walk.inward(node) - owned
        if stray:
            pid = min(stray, key=lambda i: params[i])
            raise _misuse(params[pid], f"on the way to the output of layer {name or '<model>'}, which does not own it",
                          walk.path(node, pid))


class _Reach:
    """Parameters reachable from a node before the next layer boundary, memoised over the graph."""

    def __init__(self, boundaries: dict, params: dict[int, str]):
        self.boundaries = boundaries
        self.params = params
        self.memo: dict = {}

    def _leaf(self, node) -> frozenset | None:
        """The answer for a node that ends a walk, or None for a node to expand."""
        if node is None or node in self.boundaries:
            return _EMPTY
        if type(node).__name__ == "AccumulateGrad":  # a leaf: .variable is the tensor it accumulates into
            return frozenset((id(node.variable),)) if id(node.variable) in self.params else _EMPTY
        return None

    def inward(self, start) -> frozenset:
        """Parameters reached from ``start``'s inputs (``start`` itself may be a boundary)."""
        return frozenset().union(*(self._below(child) for child, _ in start.next_functions))

    def _below(self, node) -> frozenset:
        leaf = self._leaf(node)
        if leaf is not None:
            return leaf
        # iterative post-order: graphs are deeper than Python's recursion limit
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if current in self.memo:
                continue
            children = [c for c, _ in current.next_functions]
            if expanded:
                found = [self._leaf(c) for c in children]
                self.memo[current] = frozenset().union(*(f if f is not None else self.memo[c]
                                                         for f, c in zip(found, children)))
                continue
            stack.append((current, True))
            stack.extend((c, False) for c in children if self._leaf(c) is None and c not in self.memo)
        return self.memo[node]

    def path(self, start, pid: int) -> list[str]:
        """Node names on one path from ``start`` to the parameter's AccumulateGrad (for the error message)."""
        trail = [type(start).__name__]
        node = start
        while True:
            for child, _ in node.next_functions:
                leaf = self._leaf(child)
                if leaf is not None and pid in leaf:
                    return trail
                if leaf is None and pid in self._below(child):
                    trail.append(type(child).__name__)
                    node = child
                    break
            else:
                return trail


def _misuse(name: str, where: str, trail: list[str]) -> UnsupportedLayerError:
    ops = " <- ".join(trail[-4:])
    return UnsupportedLayerError(
        f"parameter {name} is used {where} (autograd path: {ops} <- {name}). Per-sample gradients are computed "
        "from each layer's inputs and output gradients, so that use would be missed and the result silently "
        "wrong. Call the layer itself instead of its weight (e.g. not F.linear(h, layer.weight)), tie a weight as "
        "a module (head = nn.Linear(...); head.weight = embedding.weight), or freeze the parameter "
        "(requires_grad_(False))")
