"""The ops core as a kit (issue 10): the opt-in exact torch.func fallback for layers no rule knows, one registry
of layer rules (a rule registered once serves norms and Fisher; optional libraries registered lazily), one table
per op, and no import circle anywhere in erasus/."""
import ast
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import erasus.ops
from erasus import errors
from erasus.ops import _backend
from erasus.ops.layers import RULES, registered_type, rule_for

ROOT = Path(erasus.ops.__file__).resolve().parents[1]


class Gate(nn.Module):
    """A layer no rule knows: y = x * sigmoid(w) + b^2, elementwise over the last dimension."""

    def __init__(self, d):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.sigmoid(self.w) + self.b.square()


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not the Linear rule's y = x W^T + b."""

    def forward(self, x):
        return 2.0 * super().forward(x) + 1.0


def model_with_unknown_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), Gate(6), nn.Tanh(), nn.Bilinear(6, 6, 4) if False else ScaledLinear(6, 4),
                         nn.Tanh(), nn.Linear(4, 3)).eval()


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def loop(model, batch):
    """Per-sample squared norms and the Fisher sum, by one autograd call per sample (the definition)."""
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    losses = ce(model, batch)
    norms, fisher = [], {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True)
        norms.append(sum(float(g.double().square().sum()) for g in grads))
        for n, g in zip(params, grads):
            fisher[n] += g.double().square()
    return torch.tensor(norms, dtype=torch.float64), fisher


def batch(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_a_layer_no_rule_knows_is_refused_by_name_and_points_to_the_fallback():
    model = model_with_unknown_layers()
    with pytest.raises(errors.UnsupportedLayerError, match=r"layer 1 of type .*Gate.* fallback=True"):
        erasus.ops.grad_norms(model, ce, batch())
    with pytest.raises(errors.UnsupportedLayerError, match=r"fallback=True"):
        erasus.ops.fisher_diagonal(model, [batch()], loss_fn=ce)


def test_the_fallback_is_exact_for_norms_and_fisher_and_names_the_slow_layers():
    model = model_with_unknown_layers()
    data = batch()
    want_norms, want_fisher = loop(model, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(erasus.ops.SlowPathWarning, match=r"\['1', '3'\]"):
        norms = erasus.ops.grad_norms(model, ce, data, squared=True, fallback=True)
    torch.testing.assert_close(norms.double(), want_norms, rtol=1e-5, atol=1e-9)
    with pytest.warns(erasus.ops.SlowPathWarning, match=r"\['1', '3'\]"):
        fisher = erasus.ops.fisher_diagonal(model, [data], loss_fn=ce, reduction="sum", fallback=True)
    for name, value in want_fisher.items():
        torch.testing.assert_close(fisher[name].double(), value, rtol=1e-5, atol=1e-9, msg=name)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_fallback_leaves_registered_layers_on_their_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SlowPathWarning: every layer has a rule
        fast = erasus.ops.grad_norms(model, ce, batch(), fallback=True)
    torch.testing.assert_close(fast.double(), loop(model, batch())[0].sqrt(), rtol=1e-5, atol=1e-9)


def test_the_fallback_on_sequence_inputs_and_a_frozen_part():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), Gate(6), nn.Linear(6, 3)).eval()
    model[0].requires_grad_(False)
    x = torch.randn(4, 7, 5)  # (B, T, d): the gate runs on every position of a sample
    y = torch.randint(0, 3, (4,))

    def seq_ce(m, b):
        return nn.functional.cross_entropy(m(b[0]).mean(1), b[1], reduction="none")

    params = [p for p in model.parameters() if p.requires_grad]
    losses = seq_ce(model, (x, y))
    want = torch.tensor([sum(float(g.double().square().sum()) for g in
                             torch.autograd.grad(losses[i], params, retain_graph=True)) for i in range(4)])
    with pytest.warns(erasus.ops.SlowPathWarning):
        got = erasus.ops.grad_norms(model, seq_ce, (x, y), squared=True, fallback=True)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-9)


def test_one_registry_serves_norms_and_fisher_and_subclasses_find_their_rule():
    for layer in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.LayerNorm):
        assert RULES[layer].norms is not None and RULES[layer].fisher is not None
    assert registered_type(nn.BatchNorm1d(3), "norms") is nn.modules.batchnorm._BatchNorm
    assert rule_for(nn.Linear(2, 2), "fisher") is RULES[nn.Linear].fisher


def test_transformers_types_are_registered_lazily_not_by_importing_erasus_ops():
    code = ("import sys, erasus.ops\n"
            "from erasus.ops.layers import RULES\n"
            "assert 'transformers' not in sys.modules, 'erasus.ops imported transformers'\n"
            "assert not any(t.__module__.startswith('transformers') for t in RULES)\n"
            "import torch, transformers\n"
            "from transformers import GPT2Config, GPT2LMHeadModel\n"
            "m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8))\n"
            "ids = torch.randint(0, 20, (2, 5))\n"
            "loss = lambda m, b: torch.nn.functional.cross_entropy(m(b).logits[:, :-1].transpose(1, 2), b[:, 1:],"
            " reduction='none').mean(1)\n"
            "print(erasus.ops.grad_norms(m, loss, ids).shape)\n"
            "assert any(t.__name__ == 'Conv1D' for t in RULES)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent.parent
                         if False else None, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2])" in out.stdout


def test_every_op_declares_its_backends_in_one_table():
    assert set(_backend.OPS) == {"kcenter_greedy", "herding", "kmeans_coreset", "per_sample_grad_norms",
                                 "squared_grad_sum", "dual_sensitivity_mask", "lora_importance"}
    for table in _backend.OPS.values():
        assert table.backends[0] == "reference" and callable(table.implementations["reference"])
    with pytest.raises(errors.InvalidInputError, match="needs a 'reference' implementation"):
        _backend.OpTable("broken", {"cpp": lambda: None})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """erasus modules that ``path`` imports at module level (imports inside functions are deferred, so they
    cannot form an import-time circle)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_import_circle_in_erasus():
    files = [p for p in ROOT.rglob("*.py")]
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _top_level_imports(p, modules) for p in files}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "erasus.ops.layers.linear" in graph and graph["erasus.ops.layers.linear"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 37, (1 << 20) // 2 + 1])  # the last: over 1 MiB in 16-bit (torch path)
def test_finiteness_and_largest_magnitude_agree_with_torch_on_every_path(dtype, numel):
    """all_finite / max_abs read small CPU tensors as sign-cleared bits in numpy (no torch thread pool), larger
    ones through torch.aminmax: the same answers, NaN / +-inf anywhere, strided and grad-carrying inputs."""
    from erasus.ops._validate import all_finite, max_abs

    g = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=g) * 100).to(dtype)
    assert all_finite(x) and max_abs(x) == float(x.abs().max())
    assert max_abs(-x) == max_abs(x)
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[numel // 2] = bad
        assert not all_finite(y), bad
    grad = torch.randn(2 * numel + 1, generator=g, requires_grad=True).to(dtype)[::2]  # strided, autograd
    assert all_finite(grad) and max_abs(grad) == float(grad.detach().abs().max())


def test_an_extension_older_than_the_python_code_is_reported_not_called(monkeypatch):
    """An editable checkout whose sources moved on since erasus._C was built: the cpp backend is unavailable,
    saying which functions are missing and how to rebuild, instead of an AttributeError in some later call.
    Every function the Python side calls is listed (checked against the sources) and present in this build."""
    import importlib
    import re
    import types

    from erasus.ops import _backend

    sources = "".join(p.read_text() for p in Path(_backend.__file__).parents[1].rglob("*.py"))
    called = set(re.findall(r'_cpp\.call\(\s*"(\w+)"', sources))
    assert called and called <= set(_backend._C_FUNCTIONS)
    ext = importlib.import_module("erasus._C")
    assert all(hasattr(ext, name) for name in _backend._C_FUNCTIONS)

    stale = types.SimpleNamespace(__file__="/old/_C.so", **{name: getattr(ext, name) for name in _backend._C_FUNCTIONS
                                                              if name != "kcenter_step"})
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name: stale if name == "erasus._C" else real_import(name))
    _backend._probe.cache_clear()
    try:
        ok, why = _backend._probe("cpp")
        assert not ok and "lacks kcenter_step" in why and "pip install --no-build-isolation -e ." in why
    finally:
        monkeypatch.undo()
        _backend._probe.cache_clear()
    assert _backend._probe("cpp")[0]
