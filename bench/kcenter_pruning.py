"""k-center below the streaming floor: the C++ op with triangle-inequality pruning against the same kernel
reading every row (the op before pruning), in the same run.

    python bench/kcenter_pruning.py            # n = 50k, d = 512, k = 500; prints only
    python bench/kcenter_pruning.py --quick    # n = 10k, d = 128, k = 100
    python bench/kcenter_pruning.py --record   # appends the table to bench/RESULTS.md

A row whose nearest centre a is at least twice its distance away from the new centre c (||c - a||^2 >= 4 m,
with a rounding margin) cannot come closer to c, so its row of X is not read. Data: a 100-cluster Gaussian
mixture (centres ~ N(0, 16 I), unit noise), where most rows are skipped once every cluster has a centre, and an
isotropic Gaussian, where none are. Both variants must return the same indices and radius (checked); times are
interleaved rounds, median ms per step (20/80 quantiles); 'rows read' is the share of distance evaluations
the pruned run made.
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import torch  # noqa: E402

import harness  # noqa: E402

from erasus.ops import _cpp  # noqa: E402


def select(x: torch.Tensor, k: int, prune: bool) -> tuple[torch.Tensor, float, torch.Tensor]:
    out, min_dist = torch.empty(k, dtype=torch.int64), torch.empty(x.shape[0])
    r2 = _cpp.call("kcenter_greedy", _cpp.as_numpy(x), _cpp.elem_name(x.dtype), torch.tensor([0]).numpy(),
                   out.numpy(), min_dist.numpy(), 1.0, prune)
    return out, r2, min_dist


def rows_read(x: torch.Tensor, indices: torch.Tensor) -> float:
    """The share of (row, step) distance evaluations the pruning rule leaves, replayed in torch (float64)."""
    n = x.shape[0]
    xd = x.double()
    min_dist = torch.full((n,), float("inf"), dtype=torch.float64)
    owner = torch.full((n,), -1, dtype=torch.int64)
    read = 0
    for s, c in enumerate(indices.tolist()):
        to_centre = ((xd[indices[:s]] - xd[c]) ** 2).sum(dim=1) if s else torch.empty(0, dtype=torch.float64)
        must = owner < 0
        if s:
            must |= to_centre[owner.clamp(min=0)] < 4 * (1 + 1e-3) * min_dist
        read += int(must.sum())
        dist = ((xd - xd[c]) ** 2).sum(dim=1)
        closer = dist < min_dist
        owner[closer], min_dist[closer] = s, dist[closer]
    return read / (n * len(indices))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 10k, d = 128, k = 100")
    parser.add_argument("--repeats", type=int, default=5)
    harness.add_record_flag(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    threads = harness.pin_threads()
    n, d, k = (10_000, 128, 100) if args.quick else (50_000, 512, 500)
    g = torch.Generator().manual_seed(0)
    data = {"100-cluster mixture": (torch.randn(100, d, generator=g) * 4)[torch.randint(0, 100, (n,), generator=g)]
            + torch.randn(n, d, generator=g),
            "isotropic Gaussian": torch.randn(n, d, generator=g)}
    rows = ["| data | n x d, k | pruned ms/step | p20–p80 | every row ms/step | p20–p80 | speedup | rows read |",
            "|---|---|---|---|---|---|---|---|"]
    device = torch.device("cpu")
    for name, x in data.items():
        x = x.contiguous()
        pruned, plain = select(x, k, True), select(x, k, False)
        assert torch.equal(pruned[0], plain[0]) and pruned[1] == plain[1], f"{name}: pruning changed the selection"
        times = harness.interleaved({"pruned": lambda: select(x, k, True), "plain": lambda: select(x, k, False)},
                                    device, args.repeats)
        (pm, pl, ph), (am, al, ah) = ((v / k * 1e3 for v in harness.quantiles(times[key]))
                                      for key in ("pruned", "plain"))
        share = rows_read(x, pruned[0]) if args.quick else float("nan")
        rows.append(f"| {name} | {n} x {d}, {k} | {pm:.2f} | {pl:.2f}–{ph:.2f} | {am:.2f} | {al:.2f}–{ah:.2f} | "
                    f"{am / pm:.2f}× | {'–' if share != share else f'{share:.0%}'} |")
    body = (f"{threads} threads, float32, init row 0; the same indices and radius with and without pruning "
            "(checked). rows read: replayed in float64 with --quick only (the full size would take minutes).\n\n"
            + "\n".join(rows) + "\n")
    print(body)
    harness.record_results(args, f"bench/kcenter_pruning.py{' --quick' if args.quick else ''}", body)


if __name__ == "__main__":
    main()
