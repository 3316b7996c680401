"""Layer rules through the public API: a user's own layer, nn.RMSNorm, Conv1d, and the layers that are refused.

Every model-level result is compared with the definition (one autograd call per sample on a float64 copy of
the model, tests/ops/oracles.py), never with another erasus code path.
"""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import erasus.ops
from erasus import errors
from oracles import fisher_loop, squared_norms_loop

BACKEND = "cpp" if erasus.ops.backends()["cpp"]["available"] else "reference"


def ce_of_flat_output(model, batch):
    """Per-sample cross-entropy of the model's output flattened per sample (sequences, conv feature maps)."""
    return nn.functional.cross_entropy(model(batch[0]).flatten(1), batch[1], reduction="none")


def classification_batch(shape, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)


def randomise_(model, seed):
    """Generic weights (norm layers start at exactly 1 and 0, which would hide a missing term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def assert_matches_the_loop(model, loss_fn, batch, rtol=1e-4):
    norms = erasus.ops.grad_norms(model, loss_fn, batch, squared=True, backend=BACKEND)
    torch.testing.assert_close(norms.double(), squared_norms_loop(model, loss_fn, batch), rtol=rtol, atol=1e-7)
    fisher = erasus.ops.fisher_diagonal(model, [batch], loss_fn=loss_fn, backend=BACKEND)
    want = fisher_loop(model, loss_fn, batch)
    assert set(fisher) == set(want)
    for name in want:
        torch.testing.assert_close(fisher[name].double(), want[name], rtol=rtol, atol=1e-8, msg=name)


# --- a user's own layer -------------------------------------------------------------------------------------

class GainShift(nn.Module):
    """``y = x * gain + shift`` over the last dimension: a layer type erasus knows nothing about. The parameter
    names are not weight/bias on purpose (the Fisher is keyed by the names the user's function returns)."""

    def __init__(self, features):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x):
        return x * self.gain + self.shift


def gain_shift_per_sample(inputs, grad):
    """Per-sample gradients of gain and shift: each sums x * g and g over the sample's positions."""
    x = inputs[0].reshape(grad.shape[0], -1, grad.shape[-1]).double()
    g = grad.reshape(grad.shape[0], -1, grad.shape[-1]).double()
    return (x * g).sum(1), g.sum(1)


@erasus.ops.register_norm_sampler(GainShift)
def gain_shift_norms(module, inputs, grad, backend):
    gain, shift = gain_shift_per_sample(inputs, grad)
    return gain.square().sum(1) + shift.square().sum(1)


@erasus.ops.register_fisher_sampler(GainShift)
def gain_shift_fisher(module, inputs, grad, backend):
    gain, shift = gain_shift_per_sample(inputs, grad)
    return {"gain": gain.square().sum(0).float(), "shift": shift.square().sum(0).float()}


class UnknownGain(nn.Module):
    """The same layer, never registered."""

    def __init__(self, features):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x * self.gain


def sequence_model(middle):
    return randomise_(nn.Sequential(OrderedDict(proj=nn.Linear(5, 6), gate=middle, act=nn.Tanh(),
                                                head=nn.Linear(6, 3))), seed=1)


def mean_over_positions_ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]).mean(1), batch[1], reduction="none")


def test_a_registered_user_layer_gives_exact_norms_and_fisher():
    model = sequence_model(GainShift(6))
    batch = classification_batch((5, 4, 5))
    assert_matches_the_loop(model, mean_over_positions_ce, batch)
    fisher = erasus.ops.fisher_diagonal(model, [batch], loss_fn=mean_over_positions_ce, backend=BACKEND)
    assert {"gate.gain", "gate.shift"} <= set(fisher)


def test_an_unregistered_user_layer_is_refused_by_name():
    model = sequence_model(UnknownGain(6))
    batch = classification_batch((5, 4, 5))
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer gate of type .*UnknownGain"):
        erasus.ops.grad_norms(model, mean_over_positions_ce, batch, backend=BACKEND)
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer gate of type .*UnknownGain"):
        erasus.ops.fisher_diagonal(model, [batch], loss_fn=mean_over_positions_ce, backend=BACKEND)
    model.gate.requires_grad_(False)  # frozen, it needs no rule: the rest is measured
    norms = erasus.ops.grad_norms(model, mean_over_positions_ce, batch, squared=True, backend=BACKEND)
    torch.testing.assert_close(norms.double(), squared_norms_loop(model, mean_over_positions_ce, batch),
                               rtol=1e-4, atol=1e-7)


class NormsOnlyGain(UnknownGain):
    """A user layer registered for the per-sample norms only."""

    def forward(self, x):  # its own forward: it cannot borrow a rule registered for a parent class
        return x * self.gain


@erasus.ops.register_norm_sampler(NormsOnlyGain)
def norms_only_gain_norms(module, inputs, grad, backend):
    gain, _ = gain_shift_per_sample(inputs, grad)
    return gain.square().sum(1)


def test_a_layer_registered_for_one_op_is_refused_by_the_other():
    model = sequence_model(NormsOnlyGain(6))
    batch = classification_batch((5, 4, 5))
    norms = erasus.ops.grad_norms(model, mean_over_positions_ce, batch, squared=True, backend=BACKEND)
    torch.testing.assert_close(norms.double(), squared_norms_loop(model, mean_over_positions_ce, batch),
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer gate of type .*NormsOnlyGain"):
        erasus.ops.fisher_diagonal(model, [batch], loss_fn=mean_over_positions_ce, backend=BACKEND)


# --- torch layers with rules ------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [None, 0.5])  # a large eps: a rule that dropped it would be visibly off
def test_torch_rms_norm_matches_the_loop(eps):
    model = randomise_(nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8, eps=eps), nn.Tanh(), nn.Linear(8, 3)), seed=2)
    assert_matches_the_loop(model, mean_over_positions_ce, classification_batch((4, 3, 5), seed=2))


def test_conv1d_fisher_and_norms_match_the_loop():
    # stride, dilation and integer padding; 16 input channels take the grouped-convolution path of the norms;
    # padding="valid" is plain zero padding; the last conv has no bias.
    model = randomise_(nn.Sequential(nn.Conv1d(3, 16, 3, stride=2, padding=1, dilation=2), nn.Tanh(),
                                     nn.Conv1d(16, 4, 2, padding="valid", bias=False), nn.Tanh(),
                                     nn.Flatten(), nn.Linear(16, 3)), seed=3)
    assert_matches_the_loop(model, ce_of_flat_output, classification_batch((5, 3, 11), seed=3))


# --- convolutions and normalisations in every setting, and the refusals ---------------------------------

def model_around(make_layer, shape):
    """layer -> flatten -> linear head, with the layer under a distinctive name."""
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():
        flat = layer(torch.zeros(1, *shape[1:])).numel()
    return nn.Sequential(OrderedDict(encoder_block=layer, flat=nn.Flatten(), head=nn.Linear(flat, 3))).eval()


@pytest.mark.parametrize("make_layer, shape", [
    pytest.param(lambda: nn.Conv2d(4, 4, 3, groups=2), (3, 4, 6, 6), id="conv2d-groups"),
    pytest.param(lambda: nn.Conv1d(4, 4, 3, groups=4), (3, 4, 7), id="conv1d-depthwise"),
    pytest.param(lambda: nn.Conv2d(4, 4, 3, groups=2, dilation=2, padding=2), (3, 4, 7, 7),
                 id="conv2d-grouped-dilated"),
    pytest.param(lambda: nn.Conv2d(4, 2, 3, padding="same"), (3, 4, 6, 6), id="conv2d-same"),
    pytest.param(lambda: nn.Conv1d(4, 2, 3, padding=1, padding_mode="circular"), (3, 4, 7), id="conv1d-circular"),
    pytest.param(lambda: nn.Conv3d(2, 3, 2), (3, 2, 3, 3, 3), id="conv3d"),
    pytest.param(lambda: nn.ConvTranspose2d(2, 3, 2, stride=2), (3, 2, 3, 3), id="convtranspose2d"),
    pytest.param(lambda: nn.ConvTranspose1d(2, 3, 3), (3, 2, 5), id="convtranspose1d"),
    pytest.param(lambda: nn.GroupNorm(2, 4), (3, 4, 3, 3), id="groupnorm"),
    pytest.param(lambda: nn.InstanceNorm2d(4, affine=True), (3, 4, 3, 3), id="instancenorm2d-affine"),
])
def test_every_convolution_and_normalisation_setting_is_exact(make_layer, shape):
    """Closed forms where they exist (groups 1, zero padding; GroupNorm's affine gradients), exact per-sample
    torch.func gradients of the layer's own parameters for the rest: norms and Fisher equal the loop."""
    model, batch = randomise_(model_around(make_layer, shape), seed=6), classification_batch(shape, seed=6)
    assert_matches_the_loop(model, ce_of_flat_output, batch)


def test_embedding_bag_is_exact():
    torch.manual_seed(7)
    model = nn.Sequential(nn.EmbeddingBag(11, 4, mode="mean"), nn.Tanh(), nn.Linear(4, 3))
    ids, labels = torch.randint(0, 11, (5, 3)), torch.randint(0, 3, (5,))
    assert_matches_the_loop(model, ce_of_flat_output, (ids, labels))


@pytest.mark.parametrize("make_layer, shape", [
    pytest.param(lambda: nn.LayerNorm([4, 6]), (3, 4, 6), id="layernorm"),
    pytest.param(lambda: nn.RMSNorm([4, 6], eps=0.1), (3, 4, 6), id="rmsnorm"),
])
def test_norms_over_several_dimensions_are_exact_or_refused_by_name(make_layer, shape):
    # Normalising over (4, 6) instead of the last dim only: a rule that assumed one dim would be silently wrong.
    model, batch = randomise_(model_around(make_layer, shape), seed=5), classification_batch(shape, seed=5)
    try:
        assert_matches_the_loop(model, ce_of_flat_output, batch)
    except errors.ErasusError as exc:
        assert "encoder_block" in str(exc)


class TiedLinears(nn.Module):
    """Two linear layers sharing one weight matrix (not the supported embedding / LM-head tie)."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def test_weights_tied_between_two_linear_layers_are_refused():
    torch.manual_seed(0)
    model, batch = TiedLinears(), classification_batch((4, 6))
    with pytest.raises(errors.ErasusError, match=r"layers first and second share a parameter"):
        erasus.ops.grad_norms(model, ce_of_flat_output, batch, backend=BACKEND)
    with pytest.raises(errors.ErasusError, match=r"layer second shares a parameter"):
        erasus.ops.fisher_diagonal(model, [batch], loss_fn=ce_of_flat_output, backend=BACKEND)

