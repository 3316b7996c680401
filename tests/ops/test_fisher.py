import copy

import peft
import pytest
import torch
from torch import nn

import erasus.ops
from erasus import errors
from erasus.ops.linear_grads import SQUARED_GRAD_SUM
from oracles import backends_for
from test_grad_norms import DTYPES, TOL, case, is_interpreted
from test_model_grad_norms import ce, cnn, lm_batch, lm_loss, mlp, tiny_gpt2, tiny_llama

BACKENDS = SQUARED_GRAD_SUM.backends

SHAPES = [(1, 1, 1, 1), (5, 1, 7, 3), (17, 1, 33, 18), (1, 4, 9, 5), (3, 2, 33, 17), (4, 19, 20, 6)]
TRITON_SHAPES = [(1, 1, 1, 1), (5, 1, 7, 3), (2, 3, 9, 5)]


def loop_squares(a, g):
    a3 = a.double().reshape(a.shape[0], -1, a.shape[-1])
    g3 = g.double().reshape(g.shape[0], -1, g.shape[-1])
    w = sum((g3[i].T @ a3[i]).square() for i in range(a3.shape[0]))
    b = g3.sum(dim=1).square().sum(dim=0)
    return w, b


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_every_backend_matches_the_per_sample_loop(backend):
    shapes = TRITON_SHAPES if is_interpreted(backend) else SHAPES
    dtypes = DTYPES[:2] if is_interpreted(backend) else DTYPES
    for batch, steps, d, p in shapes:
        for dtype in dtypes:
            a, g = case(batch, steps, d, p, dtype, seed=5)
            got = erasus.ops.squared_grad_sum(a, g, backend=backend)
            want_w, want_b = loop_squares(a, g)
            rtol, atol = TOL[dtype]
            assert got.weight.shape == (p, d) and got.weight.dtype == torch.float32
            torch.testing.assert_close(got.weight.double(), want_w, rtol=rtol, atol=atol)
            torch.testing.assert_close(got.bias.double(), want_b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_empty_batch_gives_zeros(backend):
    got = erasus.ops.squared_grad_sum(torch.empty(0, 2, 3), torch.empty(0, 2, 4), backend=backend)
    assert got.weight.shape == (4, 3) and not got.weight.any() and not got.bias.any()


def loop_fisher(model, loss_fn, batches, mode="empirical"):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for batch in batches:
        losses = loss_fn(model, batch)
        if mode == "batch_squared":
            grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
            for n, gr in zip(params, grads):
                out[n] += 0 if gr is None else gr.double().square()
            count += 1
            continue
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
            for n, gr in zip(params, grads):
                out[n] += 0 if gr is None else gr.double().square()
        count += losses.shape[0]
    return {n: v / count for n, v in out.items()}


def assert_fisher_close(got, want):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["empirical", "batch_squared"])
def test_classifier_fisher_matches_the_loop(mode):
    model = mlp()
    batches = [(torch.randn(6, 12), torch.randint(0, 5, (6,))), (torch.randn(3, 12), torch.randint(0, 5, (3,)))]
    assert_fisher_close(erasus.ops.fisher_diagonal(model, batches, loss_fn=ce, mode=mode),
                        loop_fisher(model, ce, batches, mode))
    model = cnn()
    batches = [(torch.randn(5, 2, 7, 7), torch.randint(0, 4, (5,)))]
    assert_fisher_close(erasus.ops.fisher_diagonal(model, batches, loss_fn=ce, mode=mode),
                        loop_fisher(model, ce, batches, mode))


def test_language_model_fisher_matches_the_loop():
    model = tiny_llama()
    assert_fisher_close(erasus.ops.fisher_diagonal(model, [lm_batch()], loss_fn=lm_loss),
                        loop_fisher(model, lm_loss, [lm_batch()]))
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0))
    for module in lora.modules():
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    lora.eval()
    got = erasus.ops.fisher_diagonal(lora, [lm_batch()], loss_fn=lm_loss)
    assert got and all("lora_" in name for name in got)
    assert_fisher_close(got, loop_fisher(lora, lm_loss, [lm_batch()]))
    untied = tiny_gpt2(tied=False)
    assert_fisher_close(erasus.ops.fisher_diagonal(untied, [lm_batch()], loss_fn=lm_loss),
                        loop_fisher(untied, lm_loss, [lm_batch()]))
    with pytest.raises(errors.InvalidInputError, match="tied weights"):
        erasus.ops.fisher_diagonal(tiny_gpt2(tied=True), [lm_batch()], loss_fn=lm_loss)
    tied = tiny_gpt2(tied=True)  # batch_squared works with tied weights: it uses ordinary gradients
    assert_fisher_close(erasus.ops.fisher_diagonal(tied, [lm_batch()], loss_fn=lm_loss, mode="batch_squared"),
                        loop_fisher(tied, lm_loss, [lm_batch()], "batch_squared"))


def class_resolved_squares(model, inputs):
    """For each input row x_j and each class y: p(y | x_j) and the squared gradient of CE(model(x_j), y) for
    every parameter, by one autograd call per (row, class) on a float64 copy of the model."""
    model64 = copy.deepcopy(model).double()
    params = dict(model64.named_parameters())
    rows = []
    for x in inputs.double():
        logits = model64(x[None])
        probs = torch.softmax(logits.detach()[0], dim=0)
        squares = []
        for y in range(logits.shape[1]):
            loss = nn.functional.cross_entropy(logits, torch.tensor([y]))
            grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
            squares.append({n: g.square() for n, g in zip(params, grads)})
        rows.append((probs, squares))
    return list(params), rows


def label_average(names, rows, weights_of):
    """mean_j sum_y w_j(y) g_{j,y}^2: the Fisher of one label drawn per sample with probabilities w_j."""
    return {n: sum(sum(w * sq[n] for w, sq in zip(weights_of(probs), squares)) for probs, squares in rows) / len(rows)
            for n in names}


def test_mc_fisher_converges_to_the_expected_fisher_of_the_model():
    # 4 distinct inputs, each repeated R times: the MC estimate averages R labels drawn from p(. | x_j), and the
    # true Fisher is mean_j sum_y p(y | x_j) g_{j,y}^2, computed exactly by a per-class loop.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.mul_(6.0)  # peaked, unequal class probabilities: label choices then matter
    inputs, repeats = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), 20000
    data = [inputs.repeat_interleave(repeats, dim=0)]
    logits_fn = lambda m, b: m(b)  # noqa: E731
    got = erasus.ops.fisher_diagonal(model, data, mode="mc", logits_fn=logits_fn, seed=0)
    again = erasus.ops.fisher_diagonal(model, data, mode="mc", logits_fn=logits_fn, seed=0)
    other_seed = erasus.ops.fisher_diagonal(model, data, mode="mc", logits_fn=logits_fn, seed=1)
    assert all(torch.equal(got[n], again[n]) for n in got)
    assert any(not torch.equal(got[n], other_seed[n]) for n in got)

    names, rows = class_resolved_squares(model, inputs)
    exact = label_average(names, rows, lambda p: p)
    # Standard error of the estimate, element by element: Var_y(g^2) under p, per input, over R draws each.
    fourth = label_average(names, rows, lambda p: p * 0)  # zeros shaped like each parameter
    for probs, squares in rows:
        for n in names:
            mean = sum(w * sq[n] for w, sq in zip(probs, squares))
            fourth[n] += (sum(w * sq[n].square() for w, sq in zip(probs, squares)) - mean.square()) / repeats
    stderr = {n: fourth[n].sqrt() / len(rows) for n in names}
    # 5 standard errors (a false alarm about once in 10^6 per element) plus float32 rounding of the sums
    tolerance = {n: 5 * stderr[n] + 1e-6 + 1e-5 * exact[n] for n in names}
    assert set(got) == set(names)
    for n in names:
        assert bool(((got[n].double() - exact[n]).abs() <= tolerance[n]).all()), n

    # The check can tell a wrong estimator: labels drawn uniformly, or the most likely label, or the data's own
    # label distribution ignored altogether, land far outside the tolerance.
    uniform = label_average(names, rows, lambda p: torch.full_like(p, 1 / p.numel()))
    argmax = label_average(names, rows, lambda p: nn.functional.one_hot(p.argmax(), p.numel()).double())
    for wrong in (uniform, argmax):
        assert max(float(((wrong[n] - exact[n]).abs() / tolerance[n]).max()) for n in names) > 10


def test_fisher_leaves_the_model_alone_and_reduction_sum():
    model = mlp().train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    batches = [(torch.randn(4, 12), torch.randint(0, 5, (4,)))]
    mean = erasus.ops.fisher_diagonal(model, batches, loss_fn=ce)
    total = erasus.ops.fisher_diagonal(model, batches, loss_fn=ce, reduction="sum")
    assert all(torch.allclose(total[n], mean[n] * 4) for n in mean)
    assert model.training and all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, data, error, match",
    [
        ({"mode": "exact"}, [], errors.InvalidInputError, "mode must be one of"),
        ({"mode": "mc"}, [], errors.InvalidInputError, "needs logits_fn"),
        ({}, [], errors.InvalidInputError, "needs loss_fn"),
        ({"loss_fn": ce}, [], errors.EmptyInputError, "no batches"),
        ({"loss_fn": ce, "reduction": "max"}, [], errors.InvalidInputError, "reduction must be"),
        ({"loss_fn": lambda m, b: ce(m, b).sum(), "mode": "batch_squared"},
         [(torch.randn(2, 12), torch.zeros(2, dtype=torch.long))], errors.InvalidInputError, "one loss per sample"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, data, error, match):
    with pytest.raises(error, match=match):
        erasus.ops.fisher_diagonal(mlp(), data, **kwargs)
