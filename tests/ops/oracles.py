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
