"""Issue 9, items 2 and 5: per-sample norms and Fisher are exact or refused when a parameter is used outside its
layer's forward, and they leave the model's parameters bit for bit as they were."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import erasus.ops
from erasus import errors
from test_fisher import assert_fisher_close, loop_fisher
from test_model_grad_norms import ce, loop_norms


class LinearByHand(nn.Module):
    """The head's weight used a second time, through F.linear, in a custom forward."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + F.linear(h, self.head.weight)


class HandTiedHead(nn.Module):
    """A language-model head tied by hand: logits = h @ E^T, with no module for the head."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix = nn.Embedding(10, 5), nn.Linear(5, 5)

    def forward(self, ids):
        return (torch.tanh(self.mix(self.emb(ids))) @ self.emb.weight.T).mean(1)


class WeightOnly(nn.Module):
    """The layer is never called; its parameters are."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(x, self.layer.weight, self.layer.bias)


class ReadsAnotherLayer(nn.Module):
    """A parameter of one layer feeds the input of another."""

    def __init__(self):
        super().__init__()
        self.gate, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.gate(x)) * self.gate.weight.sum(0))


class SharedByHand(nn.Module):
    """Two linear layers holding one weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.b(torch.tanh(self.a(x))))


class AutocastReuse(nn.Module):
    """Under autocast, the weight's low-precision copy is cached by the layer's call and reused outside it."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.layer(x)
            return (h + F.linear(h, self.layer.weight)).float()[:, :3]


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


def penalised(model, batch):
    return ce(model, batch) + 1e-3 * model[0].weight.square().sum()


def classes(n=5):
    return torch.randint(0, 3, (n,))


MISUSES = [
    ("F.linear(h, head.weight)", LinearByHand(), ce, (torch.randn(5, 4), classes()), "head.weight"),
    ("h @ emb.weight.T", HandTiedHead(), ce, (torch.randint(0, 10, (5, 7)), classes()), "emb.weight"),
    ("the layer is never called", WeightOnly(), ce, (torch.randn(5, 4), classes()), "layer."),
    ("a weight feeds another layer", ReadsAnotherLayer(), ce, (torch.randn(5, 4), classes()), "gate.weight"),
    ("a penalty on the weights", nn.Sequential(nn.Linear(4, 3)), penalised, (torch.randn(5, 4), classes()),
     "0.weight"),
    ("reused autocast copy", AutocastReuse(), ce, (torch.randn(5, 4), classes()), "layer.weight"),
]


@pytest.mark.parametrize("what, model, loss_fn, batch, param", MISUSES, ids=[m[0] for m in MISUSES])
@pytest.mark.parametrize("op", ["grad_norms", "fisher"])
def test_a_parameter_used_outside_its_layer_is_refused_by_name(what, model, loss_fn, batch, param, op):
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(errors.UnsupportedLayerError, match=f"parameter {param}") as info:
        if op == "grad_norms":
            erasus.ops.grad_norms(model, loss_fn, batch)
        else:
            erasus.ops.fisher_diagonal(model, [batch], loss_fn=loss_fn)
    assert "used" in str(info.value) and "<-" in str(info.value)  # says how: the autograd path to it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_batch_squared_fisher_stays_exact_for_those_models():
    """The batch-squared mode takes whole-batch gradients from autograd, so any use is fine there."""
    torch.manual_seed(0)  # fixed data, whatever ran before
    model, batch = LinearByHand(), (torch.randn(5, 4), classes())
    assert_fisher_close(erasus.ops.fisher_diagonal(model, [batch], loss_fn=ce, mode="batch_squared"),
                        loop_fisher(model, ce, [batch], mode="batch_squared"))


def test_weights_shared_between_two_linear_layers_are_refused():
    torch.manual_seed(0)  # fixed data, whatever ran before
    model = SharedByHand()
    batch = (torch.randn(5, 4), classes())
    with pytest.raises(errors.UnsupportedLayerError, match="share a parameter"):
        erasus.ops.grad_norms(model, ce, batch)
    with pytest.raises(errors.InvalidInputError, match="tied weights"):
        erasus.ops.fisher_diagonal(model, [batch], loss_fn=ce)


def test_a_subclass_that_overrides_forward_is_refused():
    torch.manual_seed(0)  # fixed data, whatever ran before
    model = nn.Sequential(ScaledEmbedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    batch = (torch.randint(0, 10, (5, 3)), classes())
    with pytest.raises(errors.UnsupportedLayerError, match="overrides its forward"):
        erasus.ops.grad_norms(model, ce, batch)
    with pytest.raises(errors.UnsupportedLayerError, match="overrides its forward"):
        erasus.ops.fisher_diagonal(model, [batch], loss_fn=ce)


class ModuleTiedHead(nn.Module):
    """The supported way to tie: a linear head module sharing the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix = nn.Embedding(10, 5, padding_idx=0), nn.Linear(5, 5)
        self.head = nn.Linear(5, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(input=self.emb(ids)))).mean(1)  # keyword call of a layer too


class Subclassed(nn.Linear):
    """A subclass that keeps nn.Linear's forward is still an nn.Linear."""


def test_supported_uses_still_match_the_per_sample_loop():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (6, 7))
    ids[0, :3] = 0
    batch = (ids, torch.randint(0, 10, (6,)))
    model = ModuleTiedHead()
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, batch).double(), loop_norms(model, ce, batch),
                               rtol=1e-4, atol=1e-6)
    model = nn.Sequential(Subclassed(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batch = (torch.randn(6, 4), classes(6))
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, batch).double(), loop_norms(model, ce, batch),
                               rtol=1e-4, atol=1e-6)
    assert_fisher_close(erasus.ops.fisher_diagonal(model, [batch], loss_fn=ce), loop_fisher(model, ce, [batch]))
    single = nn.Linear(4, 1)  # losses that are a layer's output themselves
    x = torch.randn(5, 4)
    torch.testing.assert_close(erasus.ops.grad_norms(single, lambda m, b: m(b)[:, 0], x).double(),
                               loop_norms(single, lambda m, b: m(b)[:, 0], x), rtol=1e-4, atol=1e-6)


def max_norm_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 4, max_norm=0.5), nn.Flatten(), nn.Linear(20, 3))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # most rows are above max_norm: the forward renormalises them
    return model


@pytest.mark.parametrize("mode", ["norms", "empirical", "batch_squared", "mc"])
def test_max_norm_embeddings_are_left_bit_identical(mode):
    model = max_norm_model()
    batch = (torch.randint(0, 12, (6, 5)), classes(6))
    before = copy.deepcopy(model.state_dict())
    twin = copy.deepcopy(model)  # the loop's forward renormalises its rows, as any forward does
    if mode == "norms":
        got = erasus.ops.grad_norms(model, ce, batch)
        torch.testing.assert_close(got.double(), loop_norms(twin, ce, batch), rtol=1e-4, atol=1e-6)
    elif mode == "mc":
        erasus.ops.fisher_diagonal(model, [batch], mode="mc", logits_fn=lambda m, b: m(b[0]))
        twin(batch[0])
    else:
        got = erasus.ops.fisher_diagonal(model, [batch, batch], loss_fn=ce, mode=mode)
        assert_fisher_close(got, loop_fisher(twin, ce, [batch, batch], mode=mode))
    assert not torch.equal(twin[0].weight, before["0.weight"])  # the forward does renormalise
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class EditsItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            self.layer.weight.mul_(0.5)
        return self.layer(x)


def test_a_forward_that_edits_a_parameter_in_place_is_reported():
    torch.manual_seed(0)  # fixed data, whatever ran before
    with pytest.raises(errors.UnsupportedLayerError, match=r"changed parameters \['layer.weight'\] in place"):
        erasus.ops.grad_norms(EditsItsWeight(), ce, (torch.randn(5, 4), classes()))


@pytest.mark.parametrize("loss_fn, match", [
    (lambda m, b: ce(m, b).detach(), "do not depend on the trainable parameters"),
    (lambda m, b: ce(m, b).long(), "floating-point losses"),
])
def test_losses_that_cannot_be_differentiated_are_refused(loss_fn, match):
    torch.manual_seed(0)  # fixed data, whatever ran before
    model = nn.Sequential(nn.Linear(4, 3))
    batch = (torch.randn(5, 4), classes())
    with pytest.raises(errors.InvalidInputError, match=match):
        erasus.ops.grad_norms(model, loss_fn, batch)
    for mode in ("empirical", "batch_squared"):
        with pytest.raises(errors.InvalidInputError, match=match):
            erasus.ops.fisher_diagonal(model, [batch], loss_fn=loss_fn, mode=mode)
