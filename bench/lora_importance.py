"""LoRAPrune importance: erasus.ops.lora_importance (tiled, no out x in G_hat or BA) against materialising G_hat
and BA in torch, as LoRAPrune's compute_sensitivity does, per output channel (grouped) and per weight.

    python bench/lora_importance.py              # out x in = 4096 x 4096 and 11008 x 4096, r = 16; prints only
    python bench/lora_importance.py --quick      # 1024 x 1024, r = 8
    python bench/lora_importance.py --record     # the same, and appends the table to bench/RESULTS.md

For each shape, in one process: both implementations are checked against each other first, then timed
interleaved (median and 20/80 quantiles). Peak memory is what a call adds to the process: on CPU the resident
set's high-water mark (VmHWM, reset through /proc/self/clear_refs after malloc_trim) minus the resident set
before the call; on CUDA torch.cuda.max_memory_allocated minus the memory allocated before it. The inputs
(W, A, B, G_A, G_B) are allocated before and not counted.
"""
from __future__ import annotations

import argparse
import os
import sys

# bench/selectors.py shadows the standard library's `selectors` (which torch imports): bench/ goes to the back
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import torch  # noqa: E402

import harness  # noqa: E402

import erasus.ops  # noqa: E402
from erasus.ops.lora_importance import LORA_IMPORTANCE  # noqa: E402

SCALING = 2.0  # lora_alpha / r, e.g. alpha 32 at r 16


def materialised(w, a, b, ga, gb, scaling: float, grouped: bool) -> torch.Tensor:
    """LoRAPrune's way: the out x in estimate G_hat and B A as whole matrices, then the elementwise product."""
    g_hat = gb @ a + b @ ga - gb @ ga
    importance = (g_hat * (w + scaling * (b @ a))).abs()
    return importance.sum(dim=1) if grouped else importance


def peak_extra_mb(fn, device: torch.device) -> float:
    """Memory one call of ``fn`` adds at its peak, in MB (see the module docstring); NaN where unmeasurable."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        del result
        return extra / 1e6
    mib, result = harness.rss_growth_mib(fn)
    del result
    return mib * 1024 * 1024 / 1e6


def factors(out_f: int, in_f: int, rank: int, device: torch.device):
    gen = torch.Generator().manual_seed(out_f + in_f + rank)
    return [t.to(device) for t in (torch.randn(out_f, in_f, generator=gen), torch.randn(rank, in_f, generator=gen),
                                   torch.randn(out_f, rank, generator=gen) * 0.1,
                                   torch.randn(rank, in_f, generator=gen) * 1e-3,
                                   torch.randn(out_f, rank, generator=gen) * 1e-3)]


def bench_shape(device: torch.device, out_f: int, in_f: int, rank: int, grouped: bool, repeats: int) -> dict:
    inputs = factors(out_f, in_f, rank, device)
    groups = ("out", out_f) if grouped else None
    backend = LORA_IMPORTANCE.resolve(device, None)
    impls = {
        f"erasus ({backend})": lambda: erasus.ops.lora_importance(*inputs, scaling=SCALING, groups=groups),
        "materialised G_hat, BA (torch)": lambda: materialised(*inputs, SCALING, grouped),
    }
    ours, theirs = (fn() for fn in impls.values())
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5 * scale)  # never time a wrong result
    del ours, theirs
    for fn in impls.values():  # warm-up
        fn()
    times = harness.interleaved(impls, device, repeats)
    memory = {name: peak_extra_mb(fn, device) for name, fn in impls.items()}
    return {"device": device.type, "shape": (out_f, in_f, rank), "grouped": grouped, "times": times,
            "memory": memory}


def report(rows: list[dict]) -> list[str]:
    lines = ["| device | out x in, r | result | impl | median ms | p20–p80 ms | GB/s of W | peak extra MB | "
             "ours vs impl |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        out_f, in_f, rank = row["shape"]
        names = list(row["times"])
        ours = harness.quantiles(row["times"][names[0]])[0]
        for name in names:
            med, p20, p80 = harness.quantiles(row["times"][name])
            result = f"per output channel ({out_f})" if row["grouped"] else "per weight"
            mark = " **(ours)**" if name == names[0] else ""
            lines.append(f"| {row['device']} | {out_f} x {in_f}, {rank} | {result} | {name}{mark} | "
                         f"{med * 1e3:.1f} | {p20 * 1e3:.1f}–{p80 * 1e3:.1f} | {out_f * in_f * 4 / med / 1e9:.1f} | "
                         f"{row['memory'][name]:.1f} | {med / ours:.2f}× |")
    return lines


NOTES = """
W, A, B, G_A, G_B are float32 (scaling 2). 'GB/s of W' counts one read of the float32 weight per call. 'peak
extra MB' is the memory a call adds at its peak beyond its inputs (see bench/lora_importance.py): the
materialised way holds several out x in float32 temporaries (G_hat, B A, W + sBA, the product); ours holds the
result and, on CPU, one row block of the reference's temporaries (2^18 elements each), on CUDA the result
only (Triton: G_hat and BA live in registers, per tile). A 4096 x 4096 float32 matrix is 67 MB.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape (1024 x 1024, r = 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per implementation")
    harness.add_record_flag(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    threads = harness.pin_threads()
    repeats = args.repeats or (5 if args.quick else 7)
    shapes = [(1024, 1024, 8)] if args.quick else [(4096, 4096, 16), (11008, 4096, 16)]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"Machine: {harness.machine_name()}; {threads} threads; {harness.versions()}", file=sys.stderr)
    rows = []
    for device in devices:
        for out_f, in_f, rank in shapes:
            for grouped in (True, False):
                print(f"{device.type} {out_f} x {in_f} r={rank} grouped={grouped}", file=sys.stderr)
                rows.append(bench_shape(device, out_f, in_f, rank, grouped, repeats))
    lines = report(rows)
    print("\n".join(lines) + NOTES)
    harness.record_results(args, f"bench/lora_importance.py{' --quick' if args.quick else ''}",
                           "\n".join(lines) + "\n" + NOTES)


if __name__ == "__main__":
    main()
