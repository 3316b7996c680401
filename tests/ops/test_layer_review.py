"""Regressions from the review of the per-sample layer rules (RNN / MHA / bare parameters, commit 08cf5ad): one
plan per layer (a subclass on the fallback keeps neither its parent's output reader nor loses its subtree), a
user's rule takes every part from its own class, the fallback calls a layer as it was called (keyword arguments
by name, nested per-sample tensors split, outputs checked per sample), bare parameters warn and batch their
backward once, float64 models reach the torch kernels, nn.MultiheadAttention runs through the linear kernels.

Results are compared with the definition (one autograd call per sample on a float64 copy, tests/ops/oracles.py).
"""
import warnings

import pytest
import torch
from torch import nn

import erasus.ops
from erasus import errors
from erasus.ops import _backend
from oracles import fisher_loop, squared_norms_loop


def randomise_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def ce(model, batch):
    return nn.functional.cross_entropy(model(*batch[:-1]), batch[-1], reduction="none")


def measured(model, loss_fn, batch, **kwargs):
    """(squared norms, Fisher, messages of the SlowPathWarnings) of both ops."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", erasus.ops.SlowPathWarning)
        norms = erasus.ops.grad_norms(model, loss_fn, batch, squared=True, **kwargs)
        fisher = erasus.ops.fisher_diagonal(model, [batch], loss_fn=loss_fn, **kwargs)
    return norms, fisher, [str(w.message) for w in caught if issubclass(w.category, erasus.ops.SlowPathWarning)]


def assert_exact(model, loss_fn, batch, norms, fisher, rtol=1e-4):
    torch.testing.assert_close(norms.double(), squared_norms_loop(model, loss_fn, batch), rtol=rtol, atol=1e-7)
    want = fisher_loop(model, loss_fn, batch)
    assert set(fisher) == set(want)
    for name in want:
        torch.testing.assert_close(fisher[name].double(), want[name], rtol=rtol, atol=1e-8, msg=name)


# --- 1. subclasses overriding forward take the fallback, with the subtree but not the rule's layout ----------

class ScaledAttention(nn.MultiheadAttention):
    def forward(self, query, key, value, **kwargs):
        out, weights = super().forward(query, key, value, **kwargs)
        return out * 2.0, weights


class ScaledGRU(nn.GRU):
    def forward(self, x, h=None):
        out, h = super().forward(x, h)
        return out * 2.0, h


class AttentionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = ScaledAttention(6, 2, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(1))


class RecurrentModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = ScaledGRU(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out.mean(1))


@pytest.mark.parametrize("make, shape", [(AttentionModel, (4, 3, 6)), (RecurrentModel, (4, 5, 3))],
                         ids=["mha-subclass", "gru-subclass"])
def test_subclasses_overriding_forward_are_exact_on_the_fallback(make, shape):
    model = randomise_(make(), seed=1)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g))
    with pytest.raises(errors.UnsupportedLayerError, match="overrides its forward"):
        erasus.ops.grad_norms(model, ce, batch)
    norms, fisher, slow = measured(model, ce, batch, fallback=True)
    assert_exact(model, ce, batch, norms, fisher)
    layer = "attn" if make is AttentionModel else "rnn"
    assert len(slow) == 2 and all(f"layers ['{layer}']" in message for message in slow)
    if make is AttentionModel:  # its forward reads out_proj without calling it: measured with the subtree
        assert "attn.out_proj.weight" in fisher and float(fisher["attn.out_proj.weight"].abs().sum()) > 0


# --- 2. a user's subclass with its own rule takes every part from its own class -----------------------------

class SequenceOnlyGRU(nn.GRU):
    """Returns the output sequence only: the parent's (output, h_n) reader does not apply."""

    def forward(self, x):
        return super().forward(x)[0]


got_grads = []


@erasus.ops.register_norm_sampler(SequenceOnlyGRU)
def sequence_only_norms(module, inputs, grad, backend):
    got_grads.append(grad)
    return grad.double().square().flatten(1).sum(1)


def test_a_subclass_with_its_own_rule_does_not_inherit_the_parents_parts():
    model = nn.Sequential(SequenceOnlyGRU(3, 4, batch_first=True), nn.Flatten(), nn.Linear(20, 3)).eval()
    batch = (torch.randn(3, 5, 3), torch.randint(0, 3, (3,)))
    got_grads.clear()
    erasus.ops.grad_norms(model, ce, batch)
    assert len(got_grads) == 1 and isinstance(got_grads[0], torch.Tensor) and got_grads[0].shape == (3, 5, 4)
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer 0 .*SequenceOnlyGRU.* no fisher part"):
        erasus.ops.fisher_diagonal(model, [batch], loss_fn=ce)


# --- 3, 4. the fallback calls the layer as it was called, splits nested samples, checks its outputs ---------

class Custom(nn.Module):
    """No rule; a positional-or-keyword mask, a keyword-only scale, and a list of extras."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x, mask=None, extras=(), *, scale=1.0):
        y = x @ self.w
        if mask is not None:
            y = y + mask
        for extra in extras:
            y = y + extra
        return y * scale


class Calls(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.inp, self.c, self.head, self.call = nn.Linear(4, 4), Custom(), nn.Linear(4, 3), call

    def forward(self, x, e):
        return self.head(torch.tanh(self.call(self.c, self.inp(x), e)))


CALLS = {
    "keyword-only": lambda c, x, e: c(x, scale=3.0),
    "input-by-keyword": lambda c, x, e: c(x=x, scale=3.0),
    "mask-by-keyword": lambda c, x, e: c(x, mask=torch.full((4,), 0.5)),
    "nested-per-sample": lambda c, x, e: c(x, None, [e], scale=0.5),
    "nested-in-keyword": lambda c, x, e: c(x, extras=(e, e)),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_the_fallback_calls_the_layer_as_it_was_called(call):
    model = randomise_(Calls(call), seed=3)
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
    norms, fisher, slow = measured(model, ce, batch, fallback=True)
    assert_exact(model, ce, batch, norms, fisher)
    assert all("layers ['c']" in message for message in slow) and len(slow) == 2


class TimeMajorContext(nn.Module):
    """No rule; reads a context that holds the samples in dimension 1 (T, B, d), which the fallback cannot split."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x, context):
        return x @ self.w + context.mean(0)


class WithContext(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.head = TimeMajorContext(), nn.Linear(4, 3)

    def forward(self, x, context):
        return self.head(self.c(x, context))


def test_the_fallback_refuses_a_layer_whose_output_does_not_come_out_per_sample():
    model = randomise_(WithContext(), seed=5)
    batch = (torch.randn(5, 4), torch.randn(7, 5, 4), torch.randint(0, 3, (5,)))
    for op in (lambda: erasus.ops.grad_norms(model, ce, batch, fallback=True),
               lambda: erasus.ops.fisher_diagonal(model, [batch], loss_fn=ce, fallback=True)):
        with pytest.raises(errors.UnsupportedLayerError, match=r"layer c: TimeMajorContext: called on one sample, "
                                                               r"its output 0 has shape \(5, 4\), not \(1, 4\)"):
            op()


class WithTotal(nn.Module):
    """No rule; returns its output and that output's sum over the whole batch (a scalar)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.w, (x * self.w).sum()


class UsesTotal(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = WithTotal()

    def forward(self, x):
        out, total = self.c(x)
        return out.sum(1) + total


def test_the_fallback_refuses_a_scalar_output_the_loss_reaches():
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer c: WithTotal returns a scalar that the loss"):
        erasus.ops.grad_norms(UsesTotal(), lambda m, b: m(b[0]), (torch.randn(3, 4),), fallback=True)


# --- 7. nn.MultiheadAttention through the linear kernels ----------------------------------------------------

class CausalAttention(nn.Module):
    """A causal boolean mask with the is_causal hint, per-head weights reaching the loss, a padded key."""

    def __init__(self, attn):
        super().__init__()
        self.proj, self.attn, self.head = nn.Linear(4, 6), attn, nn.Linear(6, 3)

    def forward(self, x, padding):
        h = self.proj(x)
        h = h if self.attn.batch_first else h.transpose(0, 1)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        out, weights = self.attn(h, h, h, key_padding_mask=padding, attn_mask=causal, is_causal=True,
                                 average_attn_weights=False)
        out = out if self.attn.batch_first else out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(1)) + weights[:, :, -1].square().sum(dim=(1, 2)).unsqueeze(-1)


@pytest.mark.parametrize("make", [lambda: nn.MultiheadAttention(6, 3, batch_first=True, add_bias_kv=True),
                                  lambda: nn.MultiheadAttention(6, 2, add_zero_attn=True)],
                         ids=["batch-first-bias-kv", "time-major-zero-attn"])
def test_multihead_attention_with_causal_masks_and_per_head_weights_matches_the_loop(make):
    model = randomise_(CausalAttention(make()), seed=10)
    g = torch.Generator().manual_seed(11)
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[torch.arange(4), torch.tensor([1, 3, 4, 2])] = True
    batch = (torch.randn(4, 5, 4, generator=g), padding, torch.randint(0, 3, (4,), generator=g))
    norms, fisher, slow = measured(model, ce, batch)
    assert_exact(model, ce, batch, norms, fisher)
    assert slow == []
    model.attn.in_proj_weight.requires_grad_(False)  # frozen parts are left out, the rest still matches
    if model.attn.bias_k is not None:
        model.attn.bias_k.requires_grad_(False)
    norms, fisher, _ = measured(model, ce, batch)
    assert_exact(model, ce, batch, norms, fisher)


# --- 5. bare parameters: warned, batched backward tried once, OOM not swallowed -----------------------------

class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(4, 6)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
        self.pos_embedding = nn.Parameter(torch.randn(1, 4, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, patches):
        x = self.patch(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(torch.tanh(x)[:, 0])


def test_bare_parameters_are_named_in_a_slow_path_warning_that_freezing_silences():
    model = randomise_(TinyViT(), seed=6)
    batch = (torch.randn(5, 3, 4), torch.randint(0, 3, (5,)))
    norms, fisher, slow = measured(model, ce, batch)
    assert_exact(model, ce, batch, norms, fisher)
    assert len(slow) == 2
    assert all("parameters ['cls_token', 'pos_embedding']" in m and "requires_grad_(False)" in m for m in slow)
    model.cls_token.requires_grad_(False)
    model.pos_embedding.requires_grad_(False)
    assert measured(model, ce, batch)[2] == []


class NumberRead(torch.autograd.Function):
    """y = x with a backward that reads a number out of its gradient, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 if float(grad.abs().max()) >= 0.0 else 0.0)


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(NumberRead.apply(x * self.gain))


@pytest.mark.filterwarnings("ignore::erasus.ops.SlowPathWarning")
def test_a_batched_backward_that_failed_is_not_tried_again_for_every_chunk(monkeypatch):
    real, batched_calls = torch.autograd.grad, []

    def counted(*args, **kwargs):
        batched_calls.append(bool(kwargs.get("is_grads_batched")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    model = Gain()
    batch = (torch.randn(12, 5), torch.randint(0, 3, (12,)))  # 3 chunks of 4 samples
    norms = erasus.ops.grad_norms(model, ce, batch, squared=True)
    assert batched_calls.count(True) == 1  # the failed attempt, not one per chunk
    assert batched_calls.count(False) == 12 + 1  # one backward per sample, and the batch's own
    monkeypatch.setattr(torch.autograd, "grad", real)
    torch.testing.assert_close(norms.double(), squared_norms_loop(model, ce, batch), rtol=1e-4, atol=1e-7)


def test_running_out_of_memory_in_the_batched_backward_is_not_taken_for_a_vmap_failure(monkeypatch):
    real = torch.autograd.grad

    def out_of_memory(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        erasus.ops.grad_norms(randomise_(TinyViT(), seed=7), ce, (torch.randn(3, 3, 4), torch.randint(0, 3, (3,))))


# --- 6. float64 models ------------------------------------------------------------------------------------

class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(1))


@pytest.mark.parametrize("make, shape", [(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), (6, 4)),
                                         (LSTMModel, (4, 5, 3))], ids=["linears", "lstm"])
def test_float64_models_run_on_the_torch_kernels(make, shape):
    model = randomise_(make(), seed=8).double()
    g = torch.Generator().manual_seed(9)
    batch = (torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=g))
    norms, fisher, slow = measured(model, ce, batch)
    assert_exact(model, ce, batch, norms, fisher)
    assert slow == []


def test_an_explicit_compiled_backend_refuses_float64_by_name():
    if not erasus.ops.backends()["cpp"]["available"]:
        pytest.skip("the C++ extension is not built")
    model = nn.Linear(4, 3).double()
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(errors.DTypeError, match=r"backend 'cpp' takes .*float32.* got torch.float64"):
        erasus.ops.grad_norms(model, ce, batch, backend="cpp")


def test_an_op_table_runs_reference_for_a_dtype_its_compiled_backend_does_not_take():
    seen = []
    table = _backend.OpTable("review_probe", {"reference": lambda x: seen.append("reference") or x,
                                             "cpp": lambda x: seen.append("cpp") or x})
    try:
        if not erasus.ops.backends()["cpp"]["available"]:
            pytest.skip("the C++ extension is not built")
        table.select(torch.device("cpu"), None)(torch.ones(2))
        table.select(torch.device("cpu"), None)(torch.ones(2, dtype=torch.float64))
        table.select(torch.device("cpu"), None)(torch.ones(2, dtype=torch.int64))  # not floating: no limit
        assert seen == ["cpp", "reference", "cpp"]
    finally:
        del _backend.OPS["review_probe"]
