import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import erasus.ops
from erasus import errors
from erasus.selectors import EL2NSelector, FacilityLocationSelector, GradNormSelector


def setup(n=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).eval()
    g = torch.Generator().manual_seed(seed)
    return model, TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


def last_layer_grads(model, data):
    """Materialised [e, e (x) h] per sample, by autograd on the last layer's parameters."""
    x, y = data.tensors
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        gw, gb = torch.autograd.grad(loss, [model[2].weight, model[2].bias])
        rows.append(torch.cat([gb.flatten(), gw.flatten()]))
    return torch.stack(rows).double()


def full_grad_norms(model, data):
    x, y = data.tensors
    params = list(model.parameters())
    out = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        out.append(sum(float(g.square().sum()) for g in torch.autograd.grad(loss, params)))
    return torch.tensor(out)


def test_gradnorm_model_scope_keeps_the_largest_full_gradients():
    model, data = setup()
    got = GradNormSelector(batch_size=16).select(data, k=8, model=model)
    assert got.tolist() == torch.argsort(full_grad_norms(model, data), descending=True)[:8].tolist()


def test_gradnorm_last_layer_scope_uses_the_closed_form():
    model, data = setup(seed=1)
    got = GradNormSelector(scope="last_layer").select(data, ratio=0.2, model=model)
    want = torch.argsort(last_layer_grads(model, data).norm(dim=1), descending=True)[:8]
    assert got.tolist() == want.tolist()


def test_el2n_is_the_error_norm():
    model, data = setup(seed=2)
    x, y = data.tensors
    err = torch.softmax(model(x), 1).detach() - nn.functional.one_hot(y, 4)
    assert EL2NSelector().select(data, k=5, model=model).tolist() == \
        torch.argsort(err.norm(dim=1), descending=True)[:5].tolist()


def test_factorised_gram_equals_the_materialised_one():
    model, data = setup(seed=3)
    grads = last_layer_grads(model, data)
    x, y = data.tensors
    h = model[1](model[0](x)).detach()
    e = torch.softmax(model(x), 1).detach() - nn.functional.one_hot(y, 4)
    torch.testing.assert_close(erasus.ops.last_layer_grad_gram(e, h).double(), grads @ grads.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(erasus.ops.last_layer_grad_sq_norms(e, h).double(), grads.square().sum(1),
                               rtol=1e-4, atol=1e-5)


def test_facility_location_matches_a_greedy_oracle_on_materialised_gradients():
    model, data = setup(n=25, seed=4)
    grads = last_layer_grads(model, data)
    dist = torch.cdist(grads, grads)
    sim = dist.max() - dist
    chosen = []
    for _ in range(5):
        cover = sim[chosen].max(0).values if chosen else torch.zeros(25, dtype=torch.float64)
        gains = torch.tensor([float((sim[i] - cover).clamp(min=0).sum()) if i not in chosen else -1.0
                              for i in range(25)])
        chosen.append(int(torch.argmax(gains)))
    sel = FacilityLocationSelector()
    assert sel.select(data, k=5, model=model).tolist() == chosen
    assert sel.weights_.shape == (5,) and int(sel.weights_.sum()) == 25


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: GradNormSelector().select(setup()[1], k=2), errors.InvalidInputError, "needs a model"),
        (lambda: EL2NSelector().select(setup()[1], k=2), errors.InvalidInputError, "needs a model"),
        (lambda: GradNormSelector(scope="layer"), errors.InvalidInputError, "scope must be"),
        (lambda: EL2NSelector().select(TensorDataset(torch.randn(5, 6)), k=2, model=setup()[0]),
         errors.InvalidInputError, "needs labels"),
        (lambda: FacilityLocationSelector().select(setup()[1], k=41, model=setup()[0]), errors.InvalidInputError,
         "k must be"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_model_without_logits_is_refused_by_name():
    """A model whose output has no logits tensor (e.g. CLIP's CLIPOutput) needs a loss_fn; said so, clearly."""
    class Pairs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return {"image_embeds": self.proj(x)}

    data = TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(errors.InvalidInputError, match="has no logits tensor: pass loss_fn"):
        GradNormSelector().select(data, k=2, model=Pairs())
