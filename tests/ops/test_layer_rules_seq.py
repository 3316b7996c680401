"""Per-sample norms and Fisher on sequence layers as torch ships them (nn.RNN / nn.LSTM / nn.GRU,
nn.MultiheadAttention: no replacement modules), on bare parameters a container uses in its forward (a class
token, a position embedding, CLIP's logit scale), and on diffusers' attention inside a tiny UNet2DConditionModel.

Every result is compared with the definition (one autograd call per sample on a float64 copy of the model,
tests/ops/oracles.py), never with another erasus code path; registered rules run without a SlowPathWarning.
"""
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import erasus.ops
from erasus import errors
from oracles import fisher_loop, squared_norms_loop

BACKEND = "cpp" if erasus.ops.backends()["cpp"]["available"] else "reference"


def randomise_(model, seed):
    """Generic weights, so that no term of the gradient hides behind a zero or a one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def assert_matches_the_loop(model, loss_fn, batch, rtol=1e-4, bare=()):
    """``bare``: the bare parameters expected in the SlowPathWarning (registered rules take no slow path)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", erasus.ops.SlowPathWarning)
        norms = erasus.ops.grad_norms(model, loss_fn, batch, squared=True, backend=BACKEND)
        fisher = erasus.ops.fisher_diagonal(model, [batch], loss_fn=loss_fn, backend=BACKEND)
    slow = [str(w.message) for w in caught if issubclass(w.category, erasus.ops.SlowPathWarning)]
    assert len(slow) == (2 if bare else 0), slow
    assert all(f"parameters {sorted(bare)}" in message and "freeze them" in message for message in slow), slow
    torch.testing.assert_close(norms.double(), squared_norms_loop(model, loss_fn, batch), rtol=rtol, atol=1e-7)
    want = fisher_loop(model, loss_fn, batch)
    assert set(fisher) == set(want)
    for name in want:
        torch.testing.assert_close(fisher[name].double(), want[name], rtol=rtol, atol=1e-8, msg=name)


def ce(model, batch):
    return nn.functional.cross_entropy(model(*batch[:-1]), batch[-1], reduction="none")


# --- nn.RNN / nn.LSTM / nn.GRU ---------------------------------------------------------------------------

class Recurrent(nn.Module):
    """A recurrent layer read two ways, so that the gradients reach it through its output sequence and its
    final hidden state both: logits = head(mean of the outputs) + state_head(last layer's final states)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        width = (rnn.proj_size or rnn.hidden_size) if isinstance(rnn, nn.LSTM) else rnn.hidden_size
        self.directions = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(width * self.directions, 3)
        self.state_head = nn.Linear(width * self.directions, 3)

    def forward(self, x, h0=None, c0=None):  # (h0, c0) apart: the oracle's float64 copy reaches plain tensors only
        out, hidden = self.rnn(x) if h0 is None else self.rnn(x, h0 if c0 is None else (h0, c0))
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        last = torch.cat(list(h_n[-self.directions:]), dim=-1)
        return self.head(out.mean(1 if self.rnn.batch_first else 0)) + self.state_head(last)


RNNS = {
    "rnn-tanh": lambda: nn.RNN(3, 5, batch_first=True),
    "rnn-relu-time-major-no-bias": lambda: nn.RNN(3, 4, nonlinearity="relu", bias=False),
    "lstm-2-layers-bidirectional": lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-time-major-proj": lambda: nn.LSTM(3, 5, num_layers=2, proj_size=2),
    "gru-2-layers-bidirectional-time-major": lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True),
    "gru-batch-first": lambda: nn.GRU(3, 5, batch_first=True),
}


def initial_state(rnn, batch, g):
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    if isinstance(rnn, nn.LSTM):
        return (torch.randn(layers, batch, rnn.proj_size or rnn.hidden_size, generator=g),
                torch.randn(layers, batch, rnn.hidden_size, generator=g))
    return (torch.randn(layers, batch, rnn.hidden_size, generator=g),)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "h0-passed"])
@pytest.mark.parametrize("name", list(RNNS))
def test_recurrent_layers_match_the_loop(name, with_h0):
    torch.manual_seed(0)
    model = randomise_(Recurrent(RNNS[name]()), seed=1)
    g = torch.Generator().manual_seed(2)
    batch, steps = 4, 5
    shape = (batch, steps, 3) if model.rnn.batch_first else (steps, batch, 3)
    x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (batch,), generator=g)
    args = (x, *initial_state(model.rnn, batch, g), y) if with_h0 else (x, y)
    assert_matches_the_loop(model, ce, args)


class PackedRecurrent(nn.Module):
    """Sequences of different lengths, packed (unsorted): each sample runs over its own steps only."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * 2, 3)
        self.state_head = nn.Linear(rnn.hidden_size * 2, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, hidden = self.rnn(packed)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        padded, _ = pad_packed_sequence(out, batch_first=True)
        mean = padded.sum(1) / lengths.unsqueeze(1).to(padded.dtype)
        return self.head(mean) + self.state_head(torch.cat([h_n[-2], h_n[-1]], dim=-1))


@pytest.mark.parametrize("make_rnn", [lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True),
                                      lambda: nn.GRU(3, 4, bidirectional=True, batch_first=True)],
                         ids=["lstm", "gru"])
def test_packed_sequences_of_different_lengths_match_the_loop(make_rnn):
    torch.manual_seed(0)
    model = randomise_(PackedRecurrent(make_rnn()), seed=3)
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([3, 6, 1, 6, 4])  # unsorted, repeated, one of length 1
    x, y = torch.randn(5, 6, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    assert_matches_the_loop(model, ce, (x, lengths, y))


class EncoderDecoder(nn.Module):
    """seq2seq: the decoder starts from the encoder's final state, so the encoder's h_n gets its gradient from
    the decoder's initial state, and the decoder's h0 is a tensor with a history of its own."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.GRU(3, 4, batch_first=True)
        self.decoder = nn.GRU(2, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, source, target):
        _, state = self.encoder(source)
        out, _ = self.decoder(target, state)
        return self.head(out[:, -1])


def test_an_encoder_state_handed_to_a_decoder_matches_the_loop():
    torch.manual_seed(0)
    model = randomise_(EncoderDecoder(), seed=10)
    g = torch.Generator().manual_seed(11)
    batch = (torch.randn(4, 5, 3, generator=g), torch.randn(4, 3, 2, generator=g), torch.randint(0, 3, (4,)))
    assert_matches_the_loop(model, ce, batch)


def test_recurrent_refusals_name_the_layer_and_the_reason():
    torch.manual_seed(0)
    model = Recurrent(nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True)).train()
    x, y = torch.randn(4, 5, 3), torch.randint(0, 3, (4,))
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer rnn: GRU\(dropout=0.5\) in training mode"):
        erasus.ops.grad_norms(model, ce, (x, y), backend=BACKEND)
    model.eval()  # no dropout in eval mode: measured
    assert erasus.ops.grad_norms(model, ce, (x, y), backend=BACKEND).shape == (4,)

    class OneSequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.RNN(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0])  # (T, 3): steps, not samples

    with pytest.raises(errors.UnsupportedLayerError, match=r"layer rnn: RNN called on an unbatched sequence "
                                                           r"of shape \(4, 3\)"):
        erasus.ops.grad_norms(OneSequence(), ce, (torch.randn(4, 3), torch.randint(0, 3, (4,))), backend=BACKEND)


# --- nn.MultiheadAttention ------------------------------------------------------------------------------

class Attending(nn.Module):
    """proj -> attention -> head, on batch-first queries (the linear layers' rules need their samples first; a
    time-major attention gets them transposed). Without keys and values it attends to itself (the projected
    queries). The masks go by keyword, so ``attn_mask`` may come while ``key_padding_mask`` before it is left
    out."""

    def __init__(self, attn, use_weights):
        super().__init__()
        self.attn, self.use_weights = attn, use_weights
        self.proj = nn.Linear(4, attn.embed_dim)
        self.head = nn.Linear(attn.embed_dim, 3)

    def forward(self, q, k=None, v=None, key_padding_mask=None, attn_mask=None):
        q = self.proj(q) if self.attn.batch_first else self.proj(q).transpose(0, 1)
        if k is None:
            k = v = q
        masks = {name: mask for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask))
                 if mask is not None}
        out, weights = self.attn(q, k, v, need_weights=self.use_weights, **masks)
        logits = self.head(torch.tanh(out).mean(1 if self.attn.batch_first else 0))
        if self.use_weights:  # the attention weights reach the loss too
            logits = logits + weights.square().sum(dim=(-2, -1)).unsqueeze(-1)
        return logits


ATTENTIONS = {
    "self-batch-first": (lambda: nn.MultiheadAttention(6, 2, batch_first=True), False),
    "time-major-kdim-vdim": (lambda: nn.MultiheadAttention(6, 3, kdim=5, vdim=2), False),
    "self-no-bias-weights-used": (lambda: nn.MultiheadAttention(6, 2, bias=False, batch_first=True), True),
    "bias-kv-zero-attn": (lambda: nn.MultiheadAttention(6, 2, add_bias_kv=True, add_zero_attn=True,
                                                        kdim=3, vdim=3, batch_first=True), True),
}


@pytest.mark.parametrize("masks", ["none", "key-padding", "per-sample-attn-mask"])
@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_multihead_attention_matches_the_loop(name, masks):
    torch.manual_seed(0)
    make, use_weights = ATTENTIONS[name]
    model = randomise_(Attending(make(), use_weights), seed=5)
    attn, g = model.attn, torch.Generator().manual_seed(6)
    batch, length = 4, 3
    source = length if attn._qkv_same_embed_dim else 5

    def seq(steps, width):
        return torch.randn(*((batch, steps) if attn.batch_first else (steps, batch)), width, generator=g)

    q = torch.randn(batch, length, 4, generator=g)
    k, v = (None, None) if attn._qkv_same_embed_dim else (seq(source, attn.kdim), seq(source, attn.vdim))
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[torch.arange(batch), torch.tensor([2, 0, 1, 2])] = True  # a different key hidden per sample
    # (B * heads, L, S): torch appends the columns of bias_k / add_zero_attn to it itself
    per_sample_mask = torch.randn(batch * attn.num_heads, length, source, generator=g)
    padding, attn_mask = {"none": (None, None), "key-padding": (padding, None),
                          "per-sample-attn-mask": (None, per_sample_mask)}[masks]
    y = torch.randint(0, 3, (batch,), generator=g)
    assert_matches_the_loop(model, ce, (q, k, v, padding, attn_mask, y))


def test_multihead_attention_output_projection_is_counted_once_and_refusals():
    torch.manual_seed(0)
    model = randomise_(Attending(nn.MultiheadAttention(6, 2, batch_first=True, kdim=3, vdim=3), False), seed=7)
    q, k, v, y = torch.randn(3, 2, 4), torch.randn(3, 4, 3), torch.randn(3, 4, 3), torch.randint(0, 3, (3,))
    fisher = erasus.ops.fisher_diagonal(model, [(q, k, v, y)], loss_fn=ce, backend=BACKEND)
    assert {"attn.out_proj.weight", "attn.out_proj.bias", "attn.q_proj_weight"} <= set(fisher)
    model.attn.q_proj_weight.requires_grad_(False)  # a frozen part is left out, the rest still matches
    assert_matches_the_loop(model, ce, (q, k, v, y))
    model.attn.dropout = 0.3
    model.train()
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer attn: MultiheadAttention\(dropout=0.3\)"):
        erasus.ops.grad_norms(model, ce, (q, k, v, y), backend=BACKEND)
    model.eval()
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer attn.*unbatched query of shape \(2, 6\)"):
        erasus.ops.grad_norms(model, lambda m, b: m(*b).sum(1), (q[0], k[0], v[0]), backend=BACKEND)


# --- bare parameters --------------------------------------------------------------------------------------

class TinyViT(nn.Module):
    """A container using parameters of its own directly: a class token concatenated in front of the patches,
    a position embedding added to them, and a logit scale (CLIP's) multiplying the head's output."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(4, 6)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
        self.pos_embedding = nn.Parameter(torch.randn(1, 4, 6))
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.logit_scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, patches):
        x = self.patch(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.norm(torch.tanh(x))[:, 0]) * self.logit_scale.exp()


def test_bare_parameters_of_a_container_are_exact_without_the_fallback():
    torch.manual_seed(0)
    model = randomise_(TinyViT(), seed=8)
    batch = (torch.randn(5, 3, 4), torch.randint(0, 3, (5,)))
    assert_matches_the_loop(model, ce, batch, bare=("cls_token", "pos_embedding", "logit_scale"))
    model.requires_grad_(False).logit_scale.requires_grad_(True)  # only the scale trains: it alone is measured
    assert_matches_the_loop(model, ce, batch, bare=("logit_scale",))


class EncoderViT(nn.Module):
    """A class token and a position embedding in front of torch's own nn.TransformerEncoder (whose layers call
    nn.MultiheadAttention with keyword masks): the bare parameters' gradients cross the whole encoder."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(4, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embedding = nn.Parameter(torch.randn(1, 4, 8))
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, patches):
        x = self.patch(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.encoder(x)[:, 0])


def test_torch_transformer_encoder_with_bare_parameters_matches_the_loop():
    torch.manual_seed(0)
    model = randomise_(EncoderViT(), seed=12)
    g = torch.Generator().manual_seed(13)
    assert_matches_the_loop(model, ce, (torch.randn(4, 3, 4, generator=g), torch.randint(0, 3, (4,), generator=g)),
                            bare=("cls_token", "pos_embedding"))


class SignOfMax(torch.autograd.Function):
    """y = x, with a backward that reads a number out of its gradient (``float(...)``), which vmap cannot
    batch: the bare parameters' backward then runs one sample at a time."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 if float(grad.abs().max()) >= 0.0 else 0.0)


class GainThroughFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(SignOfMax.apply(x * self.gain))


def test_bare_parameters_behind_a_backward_vmap_cannot_batch_are_still_exact():
    torch.manual_seed(0)
    model = GainThroughFunction()
    g = torch.Generator().manual_seed(14)
    assert_matches_the_loop(model, ce, (torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)),
                            bare=("gain",))


class Contrastive(nn.Module):
    """CLIP-like: two towers and a logit scale applied to the batch's similarity matrix; each sample's loss is
    the cross-entropy of its image against every caption of the batch."""

    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(5, 4), nn.Linear(3, 4)
        self.logit_scale = nn.Parameter(torch.tensor(1.2))

    def forward(self, images, texts):
        a = nn.functional.normalize(self.image(images), dim=-1)
        b = nn.functional.normalize(self.text(texts), dim=-1)
        return self.logit_scale.exp() * a @ b.T


def test_a_bare_scale_in_a_product_over_the_batch_is_exact():
    torch.manual_seed(0)
    model = Contrastive()
    model.requires_grad_(False).logit_scale.requires_grad_(True)  # the towers' rules assume separate samples
    images, texts = torch.randn(6, 5), torch.randn(6, 3)

    def clip_loss(m, b):
        logits = m(*b)
        return nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]), reduction="none")

    assert_matches_the_loop(model, clip_loss, (images, texts), bare=("logit_scale",))


# --- diffusers: attention inside a tiny UNet ---------------------------------------------------------------

def test_tiny_unet2d_condition_model_with_diffusers_attention_matches_the_loop():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6, attention_head_dim=2, norm_num_groups=2).eval()
    attentions = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert attentions and all(isinstance(m.to_q, nn.Linear) for m in attentions)
    g = torch.Generator().manual_seed(9)
    sample, context = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 4, 6, generator=g)
    timesteps, noise = torch.tensor([10, 500, 900]), torch.randn(3, 2, 8, 8, generator=g)

    def denoising_loss(m, b):
        x, t, c, target = b
        return (m(x, t, encoder_hidden_states=c).sample - target).square().flatten(1).mean(1)

    assert_matches_the_loop(unet, denoising_loss, (sample, timesteps, context, noise), rtol=2e-4)
