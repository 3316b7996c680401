"""Brute-force oracles, written from the definitions and independent of erasus' code paths."""
import torch

import erasus.ops


def kcenter_bruteforce(x: torch.Tensor, k: int, init: list[int]):
    """Greedy farthest-first on the full float64 n x n distance matrix. Returns (indices, radius)."""
    xd = x.double()
    dist = torch.cdist(xd, xd)
    chosen = list(init)
    while len(chosen) < k:
        to_nearest = dist[:, chosen].min(dim=1).values
        to_nearest[chosen] = -1.0
        chosen.append(int(torch.argmax(to_nearest)))
    radius = float(dist[:, chosen].min(dim=1).values.max()) if len(chosen) < x.shape[0] else 0.0
    return chosen, radius


def herding_bruteforce(x: torch.Tensor, k: int) -> list[int]:
    """Herding by its definition, re-summing the chosen rows at every step, in float64."""
    xd = x.double()
    mean = xd.mean(dim=0)
    chosen: list[int] = []
    for i in range(k):
        target = (i + 1) * mean - (xd[chosen].sum(dim=0) if chosen else 0.0)
        dist = ((xd - target) ** 2).sum(dim=1)
        if chosen:
            dist[chosen] = float("inf")
        chosen.append(int(torch.argmin(dist)))
    return chosen


def backends_for(op_backends, device="cpu"):
    """The op's backends that can run here; cpp must always be there (a failed build is a test failure)."""
    available = erasus.ops.backends()
    return [b for b in op_backends if b == "cpp" or available[b]["available"]]


def kcenter_default_init(x: torch.Tensor) -> list[int]:
    """The documented default first centre: the row nearest the mean of x (float64, direct differences)."""
    xd = x.double()
    return [int(torch.argmin(((xd - xd.mean(dim=0)) ** 2).sum(dim=1)))]


def per_sample_gradients(model: torch.nn.Module, loss_fn, batch) -> list[dict[str, torch.Tensor]]:
    """The definition of per-sample gradients: a float64 copy of the model and of the batch's float tensors,
    one autograd call per sample's loss, over the trainable parameters (a parameter the loss does not reach
    gets a zero gradient). Returns one {parameter name: float64 gradient} per sample."""
    import copy

    model64 = copy.deepcopy(model).double()
    batch64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in batch)
    params = {name: p for name, p in model64.named_parameters() if p.requires_grad}
    losses = loss_fn(model64, batch64)
    out = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        out.append({name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), grads)})
    return out


def squared_norms_loop(model, loss_fn, batch) -> torch.Tensor:
    """(B,) float64 squared per-sample gradient norms, by :func:`per_sample_gradients`."""
    return torch.stack([sum(g.square().sum() for g in grads.values())
                        for grads in per_sample_gradients(model, loss_fn, batch)])


def fisher_loop(model, loss_fn, batch) -> dict[str, torch.Tensor]:
    """{name: float64 mean over samples of the squared per-sample gradient}, by :func:`per_sample_gradients`."""
    per_sample = per_sample_gradients(model, loss_fn, batch)
    return {name: sum(grads[name].square() for grads in per_sample) / len(per_sample) for name in per_sample[0]}
