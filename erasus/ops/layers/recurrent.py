"""``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` as they are (no replacement module): every weight of a recurrent layer is a
linear map applied at each step, so its per-sample gradient is that of a linear layer over the steps,
``sum_t delta_t a_t^T``, with ``a_t`` what the map read at step t (the layer input, the previous hidden state, or
for an LSTM with ``proj_size`` the cell output) and ``delta_t`` the gradient at what it produced. torch's fused
kernels keep neither, so the rule re-runs the recurrence step by step in plain torch ops (the module's
equations, with the module's weights, not changed) from the captured inputs and initial state, backpropagates
the captured output gradients through it once for the whole batch, and hands each map's ``(a, delta)`` to the
linear kernels. Exact for any batch, ``batch_first`` either way, several layers, both directions, with or
without an initial state, ``proj_size``, and packed sequences (each sample's own length: padded steps leave the
state alone, as packing means).

Refused by name: an unbatched sequence (no sample dimension), and dropout between layers in training mode
(its random mask cannot be replayed; call ``model.eval()``).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from erasus.errors import UnsupportedLayerError
from erasus.ops.layers._math import has_trainable_bias, own_trainable
from erasus.ops.layers._registry import register_layer
from erasus.ops.linear_grads import norms_unchecked, squares_unchecked


@dataclasses.dataclass
class LinearMap:
    """One weight (and its bias) of the recurrence, with what it read (B, T, d) and the gradient at what it
    produced (B, T, p), over every step of every sample; ``leaves``: the zero tensor added to its result at each
    step while the recurrence runs, whose gradients those are."""

    weight: str
    bias: str | None
    inputs: torch.Tensor
    leaves: list
    grads: torch.Tensor | None = None


def rnn_outputs(module, inputs, output):
    """(output, h_n[, c_n]): the output batch-first or time-major as the module says (a PackedSequence's data
    has no sample dimension), the final states with the samples in dimension 1."""
    out, hidden = output
    if isinstance(out, PackedSequence):
        first = (out.data, None)
    elif out.dim() == 3:
        first = (out, 0 if module.batch_first else 1)
    else:
        raise UnsupportedLayerError(f"{type(module).__name__} called on an unbatched sequence of shape "
                                    f"{tuple(inputs[0].shape)}: per-sample gradients need a batch dimension")
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    return (first,) + tuple((h, 1) for h in states)


def rnn_norms(module, inputs, grad, backend):
    parts = []  # the layer is trainable, so at least one weight or bias is
    for m in linear_maps(module, inputs, grad):
        res = norms_unchecked(m.inputs, m.grads, backend=backend, with_bias=has_trainable_bias(module, m.bias),
                              out_dtype=torch.float64)
        parts += own_trainable(module, _by_name(m, res)).values()
    return torch.stack(parts).sum(0)


def rnn_fisher(module, inputs, grad, backend):
    values: dict[str, torch.Tensor] = {}
    for m in linear_maps(module, inputs, grad):
        res = squares_unchecked(m.inputs, m.grads, backend, with_bias=has_trainable_bias(module, m.bias))
        values.update(own_trainable(module, _by_name(m, res)))
    return values


def _by_name(m: LinearMap, res) -> dict[str, torch.Tensor]:
    return {m.weight: res.weight} if m.bias is None else {m.weight: res.weight, m.bias: res.bias}


def linear_maps(module: nn.RNNBase, inputs: tuple, grad: tuple) -> list[LinearMap]:
    """Re-run the recurrence on the captured inputs and backpropagate the captured output gradients through
    it: every weight's (inputs, output gradients) over the steps. The module is not changed."""
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise UnsupportedLayerError(f"{type(module).__name__}(dropout={module.dropout}) in training mode drops "
                                    "random units between layers, a mask that cannot be replayed; call model.eval()")
    dtype = torch.promote_types(module.weight_ih_l0.dtype, torch.float32)
    seq, lengths, out_grad = _batch_first(module, inputs[0], grad[0], dtype)
    h0, c0 = _initial_state(module, inputs[1] if len(inputs) > 1 else None, seq, dtype)
    directions = 2 if module.bidirectional else 1
    maps, leaves, finals_h, finals_c = [], [], [], []
    with torch.enable_grad():
        layer_in = seq
        for layer in range(module.num_layers):
            outs = []
            for direction in range(directions):
                index = layer * directions + direction
                run = _Direction(module, layer, direction, dtype)
                out, h, c = run.forward(layer_in, h0[index], None if c0 is None else c0[index], lengths)
                outs.append(out)
                finals_h.append(h)
                finals_c.append(c)
                maps += run.maps
                leaves += run.leaves
            layer_in = torch.cat(outs, dim=2)
        terms = [] if out_grad is None else [(layer_in * out_grad).sum()]
        for finals, state_grad in zip((finals_h, finals_c), grad[1:]):
            if state_grad is not None:
                terms.append((torch.stack(finals) * state_grad.to(dtype)).sum())
        deltas = torch.autograd.grad(sum(terms), leaves, allow_unused=True) if terms else [None] * len(leaves)
    found = {id(leaf): delta for leaf, delta in zip(leaves, deltas)}
    for m in maps:
        m.grads = torch.stack([torch.zeros_like(leaf) if found[id(leaf)] is None else found[id(leaf)].detach()
                               for leaf in m.leaves], dim=1)
        m.inputs, m.leaves = m.inputs.detach(), []
    return maps


def _batch_first(module, x, out_grad, dtype):
    """(B, T, F) inputs, the per-sample lengths (None: all T) and the (B, T, D H_out) output gradients, zero
    at the padded steps of packed sequences."""
    if isinstance(x, PackedSequence):
        padded, lengths = pad_packed_sequence(PackedSequence(x.data.detach(), x.batch_sizes, x.sorted_indices,
                                                             x.unsorted_indices), batch_first=True)
        if out_grad is not None:
            out_grad, _ = pad_packed_sequence(PackedSequence(out_grad, x.batch_sizes, x.sorted_indices,
                                                             x.unsorted_indices), batch_first=True,
                                              total_length=padded.shape[1])
        return padded.to(dtype), lengths.to(padded.device), None if out_grad is None else out_grad.to(dtype)
    if not module.batch_first:
        x = x.transpose(0, 1)
        out_grad = None if out_grad is None else out_grad.transpose(0, 1)
    return x.to(dtype), None, None if out_grad is None else out_grad.to(dtype)


def _initial_state(module, hx, seq, dtype):
    """h0 (and c0 for an LSTM), (num_layers * directions, B, size): as passed, or zeros as the module uses."""
    layers = module.num_layers * (2 if module.bidirectional else 1)
    batch = seq.shape[0]
    out_size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    is_lstm = isinstance(module, nn.LSTM)
    if hx is None:
        h0 = seq.new_zeros(layers, batch, out_size)
        return h0, seq.new_zeros(layers, batch, module.hidden_size) if is_lstm else None
    if is_lstm:
        return hx[0].detach().to(dtype), hx[1].detach().to(dtype)
    return hx.detach().to(dtype), None


class _Direction:
    """One layer in one direction, step by step, with a zero leaf added to each linear map's result at each step
    so that the backward yields the gradient at it. Per-step leaves and the unbound input projection keep that
    backward O(T): indexing one (B, T, p) tensor per step would make every step's backward write all T steps."""

    def __init__(self, module, layer: int, direction: int, dtype):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        self.module, self.suffix, self.reverse = module, suffix, bool(direction)
        self.mode = module.mode  # "RNN_TANH", "RNN_RELU", "LSTM" or "GRU"
        self.w_ih, self.w_hh = (getattr(module, f"weight_{k}{suffix}").detach().to(dtype) for k in ("ih", "hh"))
        self.b_ih = getattr(module, f"bias_ih{suffix}").detach().to(dtype) if module.bias else None
        self.b_hh = getattr(module, f"bias_hh{suffix}").detach().to(dtype) if module.bias else None
        has_proj = getattr(module, "proj_size", 0) > 0
        self.w_hr = getattr(module, f"weight_hr{suffix}").detach().to(dtype) if has_proj else None
        self.maps: list[LinearMap] = []
        self.leaves: list[torch.Tensor] = []

    def _leaves(self, like: torch.Tensor, steps: int, size: int) -> list[torch.Tensor]:
        leaves = [like.new_zeros(like.shape[0], size).requires_grad_() for _ in range(steps)]
        self.leaves += leaves
        return leaves

    def forward(self, x, h, c, lengths):
        steps, gates = x.shape[1], self.w_ih.shape[0]
        at_ih, at_hh = self._leaves(x, steps, gates), self._leaves(x, steps, gates)
        at_hr = [] if self.w_hr is None else self._leaves(x, steps, self.w_hr.shape[0])
        from_input = F.linear(x, self.w_ih, self.b_ih).unbind(1)
        hidden_in, cell_out, outs = [None] * steps, [None] * steps, [None] * steps
        for t in (reversed(range(steps)) if self.reverse else range(steps)):
            hidden_in[t] = h
            from_hidden = F.linear(h, self.w_hh, self.b_hh) + at_hh[t]
            h_new, c_new = self._cell(from_input[t] + at_ih[t], from_hidden, h, c)
            if self.w_hr is not None:
                cell_out[t] = h_new
                h_new = F.linear(h_new, self.w_hr) + at_hr[t]
            if lengths is not None:  # a packed sample past its end: its state stays as it was
                valid = (t < lengths).unsqueeze(1)
                h_new = torch.where(valid, h_new, h)
                c_new = None if c is None else torch.where(valid, c_new, c)
            h, c = h_new, c_new
            outs[t] = h
        bias = (lambda k: f"bias_{k}{self.suffix}" if self.b_ih is not None else None)
        self.maps = [LinearMap(f"weight_ih{self.suffix}", bias("ih"), x, at_ih),
                     LinearMap(f"weight_hh{self.suffix}", bias("hh"), torch.stack(hidden_in, 1), at_hh)]
        if self.w_hr is not None:
            self.maps.append(LinearMap(f"weight_hr{self.suffix}", None, torch.stack(cell_out, 1), at_hr))
        return torch.stack(outs, 1), h, c

    def _cell(self, from_input, from_hidden, h, c):
        """torch's equations (the nn.RNN / nn.LSTM / nn.GRU docs); the LSTM returns o * tanh(c) before any
        projection."""
        if self.mode == "LSTM":
            i, f, g, o = (from_input + from_hidden).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c_new), c_new
        if self.mode == "GRU":
            r_i, z_i, n_i = from_input.chunk(3, dim=1)
            r_h, z_h, n_h = from_hidden.chunk(3, dim=1)
            r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
            n = torch.tanh(n_i + r * n_h)
            return (1 - z) * n + z * h, None
        pre = from_input + from_hidden
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None


register_layer(nn.RNN, nn.LSTM, nn.GRU, norms=rnn_norms, fisher=rnn_fisher, outputs=rnn_outputs)
