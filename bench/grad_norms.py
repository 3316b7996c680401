"""Per-sample gradient norms and the diagonal Fisher: ours against the per-sample loop, torch.func, Opacus and
BackPACK, and against one plain forward+backward of the same batch.

    python bench/grad_norms.py             # the grid below; prints only
    python bench/grad_norms.py --quick     # smaller shapes
    python bench/grad_norms.py --record    # the grid, and appends the table to bench/RESULTS.md

Opacus and BackPACK are optional (`pip install ".[bench]"`); BackPACK pulls in torchvision, which does not
import beside the CPU torch 2.13 build, so run this script in its own environment (README, Benchmarks).
A baseline that is not installed is reported as such, not skipped silently.

For each model and batch, in one process: every implementation is first checked against the per-sample loop
(norms to rtol 1e-3), then all are timed interleaved; printed are the median time (20/80 quantiles), the
ratio to ours, the ratio to one plain forward+backward, and the peak memory (CUDA) or the analytic extra
memory of per-sample gradients (CPU). With --record, a dated table is appended to bench/RESULTS.md;
without it nothing tracked is written.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import harness  # noqa: E402

import erasus.ops  # noqa: E402


class Block(nn.Module):
    """A transformer MLP block (Linear -> GELU -> Linear) at GPT-2-small width."""

    def __init__(self, d, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


class LoRALinear(nn.Module):
    """A frozen d x d projection with a trainable rank-r adapter (peft's layout: A then B, scaled)."""

    def __init__(self, d, r):
        super().__init__()
        self.base = nn.Linear(d, d).requires_grad_(False)
        self.lora_A, self.lora_B = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))


def models(quick: bool):
    """(label, model, inputs, targets, per-sample loss on (output, target))."""
    mse = lambda out, y: (out - y).square().flatten(1).sum(1)  # noqa: E731
    ce = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    g = torch.Generator().manual_seed(0)
    cases = []
    for batch in ((64,) if quick else (64, 256, 512)):
        mlp = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        cases.append((f"MLP head 512-1024-1024-10, T=1, B={batch}", mlp, torch.randn(batch, 512, generator=g),
                      torch.randint(0, 10, (batch,), generator=g), ce))
    batch = 32 if quick else 64
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64 * 16 * 16, 10))
    cases.append((f"CNN 3x32x32, B={batch}", cnn, torch.randn(batch, 3, 32, 32, generator=g),
                  torch.randint(0, 10, (batch,), generator=g), ce))
    d, hidden = (256, 1024) if quick else (768, 3072)
    for steps in ((32,) if quick else (128, 512)):
        batch = 32 if steps <= 128 else 8
        net = nn.Sequential(Block(d, hidden), Block(d, hidden))
        cases.append((f"2 GPT-2 MLP blocks {d}/{hidden}, T={steps}, B={batch}", net,
                      torch.randn(batch, steps, d, generator=g), torch.randn(batch, steps, d, generator=g), mse))
    steps, batch = (32, 32) if quick else (128, 32)
    lora = nn.Sequential(LoRALinear(d, 8), nn.GELU(), LoRALinear(d, 8))
    cases.append((f"LoRA r=8 on {d}x{d} (x2), T={steps}, B={batch}", lora, torch.randn(batch, steps, d, generator=g),
                  torch.randn(batch, steps, d, generator=g), mse))
    return [(label, m.eval(), x, y, loss) for label, m, x, y, loss in cases]


def ours(model, x, y, loss):
    return erasus.ops.grad_norms(model, lambda m, b: loss(m(b[0]), b[1]), (x, y))


def plain(model, x, y, loss):
    model.zero_grad(set_to_none=True)
    loss(model(x), y).sum().backward()


def per_sample_loop(model, x, y, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(x.shape[0])
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        out[i] = sum(g.square().sum() for g in grads)
    return out.sqrt()


def vmap_grad(model, x, y, loss):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v for k, v in model.named_parameters() if not v.requires_grad}

    def sample_loss(p, xi, yi):
        return loss(functional_call(model, {**p, **frozen}, (xi[None],)), yi[None]).sum()

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt()


def opacus_hooks(model, x, y, loss):
    from opacus.grad_sample import GradSampleModule

    # Opacus records activations only in training mode; these models have no dropout or BatchNorm.
    gsm = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")
    loss(gsm(x), y).sum().backward()
    norms = sum(p.grad_sample.flatten(1).square().sum(1) for p in gsm.parameters() if p.requires_grad)
    return norms.sqrt()


def opacus_ghost(model, x, y, loss):
    """Opacus ghost clipping's per-sample norms: its first backward only (no clipped second backward)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model).train(), max_grad_norm=1.0, use_ghost_clipping=True,
                                               loss_reduction="sum")
    loss(gsm(x), y).sum().backward()
    return gsm.get_norm_sample()


def baselines():
    impls = {"ours": ours, "per-sample loop": per_sample_loop, "torch.func vmap(grad)": vmap_grad}
    missing = []
    try:
        import opacus  # noqa: F401

        impls["Opacus GradSampleModule"] = opacus_hooks
        impls["Opacus ghost (1st backward)"] = opacus_ghost
    except ImportError:
        missing.append("opacus")
    return impls, missing


# --- Fisher ---------------------------------------------------------------------------------------------

def fisher_ours(model, x, y, loss):
    return erasus.ops.fisher_diagonal(model, [(x, y)], loss_fn=lambda m, b: loss(m(b[0]), b[1]), reduction="sum")


def fisher_loop(model, x, y, loss):
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]).sum(), list(params.values()))
        for k, gr in zip(params, grads):
            out[k] += gr.square()
    return out


def fisher_backpack(model, x, y, loss):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    net = extend(copy.deepcopy(model))
    lossfn = extend(nn.CrossEntropyLoss(reduction="sum") if y.dtype == torch.long else nn.MSELoss(reduction="sum"))
    with backpack(SumGradSquared()):
        lossfn(net(x), y).backward()
    return {k: p.sum_grad_squared for k, p in net.named_parameters() if p.requires_grad}


# --- layer level: which path and which backend wins, per shape --------------------------------------------

LAYER_SHAPES = [(256, 1, 1024, 1024), (512, 1, 1024, 10), (16, 64, 768, 3072), (16, 128, 768, 3072),
                (8, 256, 1024, 1024), (8, 512, 768, 768), (8, 1024, 1024, 1024), (4, 512, 4096, 8),
                (32, 128, 768, 8)]


def layer_table(quick: bool, repeats: int, device) -> list[str]:
    """Times every (path, backend) of per_sample_grad_norms and every backend of squared_grad_sum per shape,
    after checking each against the reference; reports the flop rule's pick next to the measured winner."""
    from erasus.ops.linear_grads import choose_path

    backends = [b for b in ("reference", "cpp", "triton") if erasus.ops.backends()[b]["available"]
                and (b != "triton" or device.type == "cuda")]
    shapes = LAYER_SHAPES[:4] if quick else LAYER_SHAPES
    lines = ["| op | B, T, d, p | rule picks | " + " | ".join(f"{path}/{b} ms" for path in ("ghost", "materialize")
                                                          for b in backends) + " | measured winner |",
             "|---|---|---|" + "---|" * (2 * len(backends)) + "---|"]
    for batch, steps, d, p in tqdm(shapes, desc="layer shapes", file=sys.stderr):
        g = torch.Generator().manual_seed(steps)
        a, gr = torch.randn(batch, steps, d, generator=g).to(device), torch.randn(batch, steps, p, generator=g).to(device)
        paths = ["outer"] if steps == 1 else ["ghost", "materialize"]
        impls = {}
        want = erasus.ops.per_sample_grad_norms(a, gr, backend="reference").weight
        for path in paths:
            for b in backends:
                got = erasus.ops.per_sample_grad_norms(a, gr, path=path, backend=b).weight
                assert torch.allclose(got, want, rtol=1e-3), (path, b)
                impls[f"{path}/{b}"] = lambda path=path, b=b: erasus.ops.per_sample_grad_norms(a, gr, path=path,
                                                                                           backend=b)
        times = {k: harness.quantiles(v)[0] for k, v in harness.interleaved(impls, device, repeats).items()}
        cells = [f"{times[f'{path}/{b}'] * 1e3:.1f}" if f"{path}/{b}" in times else "–"
                 for path in ("ghost", "materialize") for b in backends]
        if steps == 1:
            cells = [f"outer/{b}: {times[f'outer/{b}'] * 1e3:.2f}" for b in backends] + ["–"] * (len(cells) - len(backends))
        lines.append(f"| per_sample_grad_norms | {batch}, {steps}, {d}, {p} | {choose_path(steps, d, p)} | "
                     + " | ".join(cells) + f" | {min(times, key=times.get)} |")
        fisher = {b: (lambda b=b: erasus.ops.squared_grad_sum(a, gr, backend=b)) for b in backends}
        ref = erasus.ops.squared_grad_sum(a, gr, backend="reference").weight
        for b in backends:
            assert torch.allclose(erasus.ops.squared_grad_sum(a, gr, backend=b).weight, ref, rtol=1e-3,
                                  atol=1e-5 * float(ref.abs().max())), b
        ft = {k: harness.quantiles(v)[0] for k, v in harness.interleaved(fisher, device, repeats).items()}
        lines.append(f"| squared_grad_sum | {batch}, {steps}, {d}, {p} | – | "
                     + " | ".join(f"{b}: {ft[b] * 1e3:.1f}" for b in backends)
                     + " |" * (2 * len(backends) - len(backends)) + f" {min(ft, key=ft.get)} |")
    return lines


def close(a, b, rtol=1e-3) -> bool:
    if isinstance(a, dict):
        return all(close(a[k], b[k], rtol) for k in b)
    return bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-6 * float(b.abs().max())))


def run(label, model, x, y, loss, impls, repeats, bar, device):
    ref_fn = impls.get("per-sample loop") or impls["per-sample loop (Fisher)"]
    ref = ref_fn(model, x, y, loss)
    usable = {}
    notes = []
    for name, fn in impls.items():
        try:
            got = fn(model, x, y, loss)
        except Exception as exc:  # a baseline that cannot handle this model is reported, not timed
            notes.append(f"{name}: fails on this model ({type(exc).__name__}: {str(exc)[:80]})")
            bar.update(repeats)
            continue
        if not close(got, ref):
            raise SystemExit(f"{label}: {name} disagrees with the per-sample loop; not timing it")
        usable[name] = lambda fn=fn: fn(model, x, y, loss)
    usable["plain fwd+bwd"] = lambda: plain(model, x, y, loss)
    times = harness.interleaved(usable, device, repeats, bar)
    return times, notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    harness.add_record_flag(parser)
    return parser


def main():
    args = build_parser().parse_args()
    threads = harness.pin_threads()
    repeats = args.repeats or (3 if args.quick else 5)
    device = torch.device("cpu")
    impls, missing = baselines()
    fisher_impls = {"ours": fisher_ours, "per-sample loop (Fisher)": fisher_loop}
    try:
        import backpack  # noqa: F401

        fisher_impls["BackPACK SumGradSquared"] = fisher_backpack
    except ImportError:
        missing.append("backpack-for-pytorch")
    print(f"Machine: {harness.machine_name()}; {threads} threads; {harness.versions()}")
    cases = models(args.quick)
    lines = ["| quantity | model / batch | impl | median ms | p20–p80 ms | impl / ours | impl / plain fwd+bwd |",
             "|---|---|---|---|---|---|---|"]
    notes = [f"not installed, not timed: {', '.join(missing)}"] if missing else []
    total = sum(repeats * (len(impls) + 1 + len(fisher_impls) + 1) for _ in cases)
    with tqdm(total=total, desc="timing", unit="call", file=sys.stderr) as bar:
        for label, model, x, y, loss in cases:
            for quantity, table in (("grad norms", impls), ("Fisher diag", fisher_impls)):
                times, why = run(label, model, x, y, loss, table, repeats, bar, device)
                notes += [f"{quantity}, {label}: {w}" for w in why]
                t_ours = harness.quantiles(times["ours"])[0]
                t_plain = harness.quantiles(times["plain fwd+bwd"])[0]
                for name, samples in times.items():
                    med, p20, p80 = harness.quantiles(samples)
                    lines.append(f"| {quantity} | {label} | {name}{' **(ours)**' if name == 'ours' else ''} | "
                                 f"{med * 1e3:.1f} | {p20 * 1e3:.1f}–{p80 * 1e3:.1f} | {med / t_ours:.2f}× | "
                                 f"{med / t_plain:.2f}× |")
    body = "\n".join(["Layer level (given A and G; ms, median of interleaved runs):", ""]
                     + layer_table(args.quick, repeats, device)
                     + ["", "Model level:", ""] + lines + [""] + [f"- {n}" for n in notes])
    print(body)
    harness.record_results(args, f"bench/grad_norms.py{' --quick' if args.quick else ''}", body)


if __name__ == "__main__":
    main()
