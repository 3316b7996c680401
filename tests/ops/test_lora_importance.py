"""erasus.ops.lora_importance (LoRAPrune's |G_hat * (W + s B A)|) and LoraImportanceEMA, against a dense float64
oracle written from the definition (tests/ops/grid.py: lora_importance_oracle), on every backend; LoRA's B = 0
initialisation; a real peft LoRA layer; bad input. The block-boundary shapes of the kernels are in the grid."""
import importlib
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn

import erasus.ops
from erasus import errors
from erasus.ops.lora_importance import LORA_IMPORTANCE, LoraImportanceEMA, NonFiniteImportanceWarning
from grid import assert_within, lora_factors, lora_importance_oracle
from oracles import backends_for

BACKENDS = backends_for(LORA_IMPORTANCE.backends)
MODULE = importlib.import_module("erasus.ops.lora_importance")  # the attribute erasus.ops.lora_importance is the op


def interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def device_of(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def run(backend, factors, scaling=0.75, fan_in_fan_out=False, groups=None):
    device = device_of(backend)
    return erasus.ops.lora_importance(*(t.to(device) for t in factors), scaling=scaling,
                                      fan_in_fan_out=fan_in_fan_out, groups=groups, backend=backend).cpu()


def assert_oracle(got, factors, scaling=0.75, fan_in_fan_out=False, groups=None, what=""):
    want, bound = lora_importance_oracle(*factors, scaling, fan_in_fan_out, groups)
    assert got.dtype == torch.float32
    assert_within(got, want, bound, what or f"fan_in_fan_out={fan_in_fan_out}, groups={groups}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_one_to_eight_odd_sizes_both_layouts_and_groups(backend):
    # odd sizes, every rank 1..8; under the Triton interpreter fewer ranks (each call runs program by program)
    out_f, in_f = (7, 9) if interpreted(backend) else (37, 53)
    ranks = (1, 4, 8) if interpreted(backend) else range(1, 9)
    for rank in ranks:
        for fan_in_fan_out in (False, True):
            factors = lora_factors(out_f, in_f, rank, fan_in_fan_out, seed=rank)
            for groups in (None, ("out", out_f), ("in", in_f), ("in", 1)):
                got = run(backend, factors, fan_in_fan_out=fan_in_fan_out, groups=groups)
                assert_oracle(got, factors, fan_in_fan_out=fan_in_fan_out, groups=groups,
                              what=f"r={rank}, fan_in_fan_out={fan_in_fan_out}, groups={groups}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_half_base_weight_with_fp32_adapters(backend, dtype):
    if interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    factors = [t.to(dtype) for t in lora_factors(12, 10, 3, False, seed=5)]
    assert_oracle(run(backend, factors, groups=("out", 4)), factors, groups=("out", 4))
    # peft keeps fp32 adapters on a half base weight: each tensor is read in its own dtype
    mixed = [factors[0]] + [t.float() for t in factors[1:]]
    assert_oracle(run(backend, mixed), mixed)


def test_head_groups_are_sums_over_contiguous_output_channels():
    heads, head_dim, in_f = 4, 6, 11
    factors = lora_factors(heads * head_dim, in_f, 2, False, seed=9)
    per_weight = erasus.ops.lora_importance(*factors, scaling=2.0, backend="reference")
    per_head = erasus.ops.lora_importance(*factors, scaling=2.0, groups=("out", heads), backend="reference")
    torch.testing.assert_close(per_head, per_weight.view(heads, head_dim, in_f).sum(dim=(1, 2)))
    per_column_block = erasus.ops.lora_importance(*factors, scaling=2.0, groups=("in", 1), backend="reference")
    torch.testing.assert_close(per_column_block, per_weight.sum().reshape(1))


def test_the_reference_works_in_bounded_row_blocks(monkeypatch):
    """The reference computes G_hat and B A for a few rows at a time; any block size (ragged last block, one
    row, the whole matrix) gives the oracle's value."""
    factors = lora_factors(29, 13, 4, False, seed=2)
    seen = []
    original = torch.Tensor.mul_

    def spy(self, other):  # G_hat * merged, once per block: record the block's size
        seen.append(self.numel())
        return original(self, other)

    for elements, fan_in_fan_out, groups in ((13 * 5, False, None), (13 * 3, False, ("out", 29)),
                                             (1, True, ("in", 13)), (1 << 20, True, None)):
        monkeypatch.setattr(MODULE, "REFERENCE_BLOCK_ELEMENTS", elements)
        monkeypatch.setattr(torch.Tensor, "mul_", spy)
        seen.clear()
        layout = [t.T.contiguous() if fan_in_fan_out and i == 0 else t for i, t in enumerate(factors)]
        got = erasus.ops.lora_importance(*layout, scaling=0.5, fan_in_fan_out=fan_in_fan_out, groups=groups,
                                         backend="reference")
        monkeypatch.setattr(torch.Tensor, "mul_", original)
        assert seen and max(seen) <= max(elements, layout[0].shape[1]), (elements, seen)
        assert_oracle(got, layout, 0.5, fan_in_fan_out, groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_at_lora_init_b_is_zero_so_the_importance_is_the_rank_r_term_g_b_a_times_w(backend):
    """With B = 0 the gradient of A is B^T (...) = 0, G_hat = G_B A (rank r) and W + s B A = W: the importance
    is |G_B A * W| whatever the scaling."""
    w, a, _, _, gb = lora_factors(9, 7, 2, False, seed=4)
    b, ga = torch.zeros(9, 2), torch.zeros(2, 7)
    want = ((gb.double() @ a.double()) * w.double()).abs()
    for scaling in (0.5, 16.0):
        got = run(backend, (w, a, b, ga, gb), scaling=scaling)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)


def _peft_gpt2(init_lora_weights):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on fan_in_fan_out for Conv1D
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                 init_lora_weights=init_lora_weights)
        return peft.get_peft_model(model, config)


def _lora_layers(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _backward(model):
    ids = torch.randint(1, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_peft_lora_layers_match_the_dense_formula(backend):
    """A backward through a tiny peft GPT-2 (Conv1D weights, fan_in_fan_out) and a peft nn.Linear: the op on
    the module's own tensors equals the dense formula; the per-head sums of c_attn (q, k, v x 2 heads)."""
    gpt2 = _peft_gpt2(init_lora_weights=False)  # random B: every term of G_hat is non-zero
    linear = peft.get_peft_model(nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 1)),
                                 peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    _backward(gpt2)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(2))
    linear(x).square().sum().backward()
    layers = {**_lora_layers(gpt2), **_lora_layers(linear)}
    assert len(layers) == 3
    if interpreted(backend):
        layers = {name: m for name, m in layers.items() if "c_attn" in name or name.endswith("0")}
    for name, module in layers.items():
        factors = (module.base_layer.weight, module.lora_A["default"].weight, module.lora_B["default"].weight,
                   module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
        assert all(t is not None for t in factors)
        scaling, fan_in_fan_out = module.scaling["default"], module.fan_in_fan_out
        assert fan_in_fan_out == ("c_" in name)
        groups = ("out", 6) if "c_attn" in name else None  # 3 projections x 2 heads
        got = run(backend, factors, scaling=scaling, fan_in_fan_out=fan_in_fan_out, groups=groups)
        assert_oracle(got, factors, scaling, fan_in_fan_out, groups, what=name)
        assert float(got.min()) >= 0 and float(got.max()) > 0


def test_peft_gradients_are_the_chain_rule_of_the_merged_weight():
    """Why the layouts are right: for y = x (W + s B A)^T, G_A = s B^T G_W and G_B = s G_W A^T, with G_W the
    true gradient of the (out x in) merged weight. G_hat is built from exactly these tensors."""
    gpt2 = _peft_gpt2(init_lora_weights=False)
    name, module = next((n, m) for n, m in _lora_layers(gpt2).items() if "c_attn" in n)
    module.base_layer.weight.requires_grad_(True)
    _backward(gpt2)
    g_w = module.base_layer.weight.grad.double().T  # stored (in, out) -> (out, in)
    a, b = (module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double())
    s = module.scaling["default"]
    torch.testing.assert_close(module.lora_A["default"].weight.grad.double(), s * b.T @ g_w, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(module.lora_B["default"].weight.grad.double(), s * g_w @ a.T, rtol=1e-4, atol=1e-7)


def test_a_fresh_peft_layer_has_zero_b_and_zero_grad_a():
    gpt2 = _peft_gpt2(init_lora_weights=True)
    _backward(gpt2)
    module = next(m for n, m in _lora_layers(gpt2).items() if "c_attn" in n)
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    assert float(b.detach().abs().max()) == 0.0 and float(a.grad.abs().max()) == 0.0
    got = erasus.ops.lora_importance(module.base_layer.weight, a, b, a.grad, b.grad,
                                     scaling=module.scaling["default"], fan_in_fan_out=True, backend="reference")
    want = ((b.grad.double() @ a.double()).T * module.base_layer.weight.double()).abs()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-12)


# --- bad input


def _good():
    return dict(zip(("weight", "lora_A", "lora_B", "grad_A", "grad_B"), lora_factors(6, 5, 2, False, seed=0)))


@pytest.mark.parametrize("change, error, match", [
    ({"lora_A": torch.zeros(2, 4), "grad_A": torch.zeros(2, 4)}, errors.ShapeError, r"weight must be \(out, in\)"),
    ({"lora_B": torch.zeros(6, 3)}, errors.ShapeError, "lora_B must be"),
    ({"grad_A": torch.zeros(2, 4)}, errors.ShapeError, "grad_A must have the shape of lora_A"),
    ({"grad_B": torch.zeros(6, 1)}, errors.ShapeError, "grad_B must have the shape of lora_B"),
    ({"weight": torch.zeros(5, 6)}, errors.ShapeError, "pass fan_in_fan_out=True"),
    ({"weight": torch.zeros(6, 5, 1)}, errors.ShapeError, "weight must be 2-D"),
    ({"lora_A": torch.zeros(0, 5), "lora_B": torch.zeros(6, 0), "grad_A": torch.zeros(0, 5),
      "grad_B": torch.zeros(6, 0)}, errors.EmptyInputError, "lora_A has rank r = 0"),
    ({"grad_A": None}, errors.InvalidInputError, "grad_A is None"),
    ({"lora_B": [[1.0]]}, errors.InvalidInputError, "lora_B must be a torch.Tensor"),
    ({"weight": torch.zeros(6, 5, dtype=torch.int64)}, errors.DTypeError, "weight must be float32"),
    ({"grad_B": torch.zeros(6, 2, dtype=torch.float64)}, errors.DTypeError, "grad_B must be float32"),
    ({"grad_A": torch.full((2, 5), float("nan"))}, errors.NonFiniteError, "grad_A holds NaN"),
    ({"lora_B": torch.full((6, 2), float("inf"))}, errors.NonFiniteError, "lora_B holds NaN"),
])
def test_bad_tensors_are_refused_by_name(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        erasus.ops.lora_importance(*args.values(), scaling=1.0, backend="reference")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [None, ("out", 2)])
def test_non_finite_weight_and_overflow_are_refused(backend, groups):
    args = _good()
    w = args["weight"].clone()
    w[4, 3] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="weight holds NaN"):
        run(backend, (w, *list(args.values())[1:]), groups=groups)
    w[4, 3] = float("inf")
    with pytest.raises(errors.NonFiniteError, match="weight holds NaN"):
        run(backend, (w, *list(args.values())[1:]), groups=groups)
    huge = [args["weight"] * 1e30] + [t * 1e10 for t in list(args.values())[1:]]
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        run(backend, huge, groups=groups)


@pytest.mark.parametrize("scaling", [0.0, -1.0, float("nan"), float("inf"), True, "2", None])
def test_bad_scaling_is_refused(scaling):
    with pytest.raises(errors.InvalidInputError, match="scaling must be"):
        erasus.ops.lora_importance(*_good().values(), scaling=scaling, backend="reference")


def test_scaling_may_be_a_one_element_tensor():
    args = list(_good().values())
    torch.testing.assert_close(erasus.ops.lora_importance(*args, scaling=torch.tensor(2.0)),
                               erasus.ops.lora_importance(*args, scaling=2.0))


@pytest.mark.parametrize("groups, match", [
    (("out", 4), r"does not tile the weight: n_groups must divide the out dimension \(6\)"),
    (("in", 2), r"does not tile the weight: n_groups must divide the in dimension \(5\)"),
    (("out", 0), "does not tile the weight"),
    (("rows", 2), "groups must be None"),
    (("out", 2.0), "groups must be None"),
    (("out",), "groups must be None"),
    ("out", "groups must be None"),
])
def test_groups_that_do_not_tile_the_weight_are_refused(groups, match):
    with pytest.raises(errors.InvalidInputError, match=match):
        erasus.ops.lora_importance(*_good().values(), scaling=1.0, groups=groups, backend="reference")


def test_mutates_nothing():
    args = _good()
    before = {name: t.clone() for name, t in args.items()}
    erasus.ops.lora_importance(*args.values(), scaling=1.0, groups=("out", 3), backend="reference")
    for name, t in args.items():
        assert torch.equal(t, before[name]), name


# --- LoraImportanceEMA


def test_ema_follows_loraprune_update():
    ema = LoraImportanceEMA()  # LoRAPrune: beta = 0.9
    steps = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.5, 0.5])]
    want = steps[0].double()
    ema.update("q", steps[0])
    for importance in steps[1:]:
        want = 0.9 * want + 0.1 * importance.double()
        got = ema.update("q", importance)
    torch.testing.assert_close(got.double(), want)
    assert "q" in ema and ema["q"] is got and got.dtype == torch.float32
    ema.update("k", torch.tensor([5.0]))  # one average per module
    assert ema["k"].tolist() == [5.0] and ema["q"].shape == (2,)


def test_ema_skips_a_nan_update_with_a_warning_and_keeps_the_average():
    ema = LoraImportanceEMA(beta=0.5)
    ema.update("q", torch.tensor([2.0, 4.0]))
    with pytest.warns(NonFiniteImportanceWarning, match="'q' holds NaN"):
        kept = ema.update("q", torch.tensor([float("nan"), 0.0]))
    assert kept.tolist() == [2.0, 4.0] and ema.skipped == {"q": 1}
    assert ema.update("q", torch.tensor([0.0, 0.0])).tolist() == [1.0, 2.0]
    with pytest.warns(NonFiniteImportanceWarning):
        assert LoraImportanceEMA().update("v", torch.tensor([float("inf")])) is None  # nothing to keep yet


def test_ema_can_raise_instead_of_skipping():
    ema = LoraImportanceEMA(skip_nonfinite=False)
    with pytest.raises(errors.NonFiniteError, match="'q' holds NaN"):
        ema.update("q", torch.tensor([float("nan")]))
    assert "q" not in ema


@pytest.mark.parametrize("beta", [1.0, -0.1, float("nan"), True, "0.9"])
def test_ema_refuses_bad_beta(beta):
    with pytest.raises(errors.InvalidInputError, match="beta must be"):
        LoraImportanceEMA(beta=beta)


def test_ema_refuses_a_shape_change_and_integer_importances():
    ema = LoraImportanceEMA()
    ema.update("q", torch.ones(3))
    with pytest.raises(errors.ShapeError, match="'q' has shape"):
        ema.update("q", torch.ones(4))
    with pytest.raises(errors.DTypeError, match="floating-point"):
        ema.update("k", torch.ones(3, dtype=torch.int64))


def test_ema_of_the_op_over_steps_of_a_peft_model():
    """The intended use: one average per LoRA module, updated after each backward (the op's group vector)."""
    gpt2 = _peft_gpt2(init_lora_weights=False)
    ema = LoraImportanceEMA(beta=0.9)
    layers = _lora_layers(gpt2)
    history = []
    for step in range(2):
        gpt2.zero_grad()
        ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(step))
        gpt2(input_ids=ids, labels=ids).loss.backward()
        module = layers["base_model.model.transformer.h.0.attn.c_attn"]
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        importance = erasus.ops.lora_importance(module.base_layer.weight, a, b, a.grad, b.grad,
                                                scaling=module.scaling["default"], fan_in_fan_out=True,
                                                groups=("out", 6), backend="reference")
        history.append(importance)
        ema.update("c_attn", importance)
    torch.testing.assert_close(ema["c_attn"], 0.9 * history[0] + 0.1 * history[1])
