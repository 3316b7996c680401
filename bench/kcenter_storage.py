"""k-center and herding on 16-bit storage: do fp16 / bf16 rows (half the bytes per step) pay off on the CPU?

    python bench/kcenter_storage.py            # n = 50k, d = 512, 100 steps; prints only
    python bench/kcenter_storage.py --quick    # n = 10k, d = 256
    python bench/kcenter_storage.py --record   # appends the table to bench/RESULTS.md

The C++ kernels widen 16-bit rows in registers inside the distance loop (F16C's vcvtph2ps for fp16, zero
halves interleaved under the 16 bits for bf16; AVX2 + FMA chosen at run time where the CPU has them) and do the
float32 loop's arithmetic in the float32 loop's order, so a 16-bit X gives exactly the indices of its float32
widening (checked here before timing). On a CPU whose fp16 conversion is slow (znver1: vcvtph2ps converts
about 6.5 G elements/s per core alone, ~5 G with the distance arithmetic, below what two cores need to stream
fp16 rows at the memory bandwidth) fp16 is bound by the conversion, bf16 (a shift) by memory. 16-bit rows are
prefetched 4 KB ahead (the non-temporal hint for an X larger than the last-level cache, as 50k x 512 is);
float32 rows keep the hardware prefetcher, which streamed them as fast or faster. Printed: median ms per
selection step (20/80 quantiles, interleaved rounds), GB/s of X streamed, the speedup over the float32 op
(ratio of the medians) and the 20/80 quantiles of the per-round speedups (the float32 call and this one in the
same round).
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import torch  # noqa: E402

import harness  # noqa: E402

import erasus.ops  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 10k, d = 256")
    parser.add_argument("--repeats", type=int, default=7)
    harness.add_record_flag(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    threads = harness.pin_threads()
    n, d, steps = (10_000, 256, 50) if args.quick else (50_000, 512, 100)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=g)
    device = torch.device("cpu")
    rows = ["| op | dtype | n x d | ms/step | p20–p80 | GB/s of X | vs float32 | per round p20–p80 |",
            "|---|---|---|---|---|---|---|---|"]
    for op in ("kcenter_greedy", "herding"):
        xs = {dt: base.to(dt).contiguous() for dt in DTYPES}
        widened = {dt: x.float() for dt, x in xs.items()}
        fn = getattr(erasus.ops, op)

        def run(x):
            out = fn(x, steps, backend="cpp")
            return out.indices if op == "kcenter_greedy" else out

        for dt in DTYPES[1:]:  # the same indices as the float32 op on the widened rows
            assert torch.equal(run(xs[dt]), run(widened[dt])), f"{op} {dt} differs from its float32 widening"
        impls = {str(dt).replace("torch.", ""): (lambda x=x: run(x)) for dt, x in xs.items()}
        for f in impls.values():
            f()
        times = harness.interleaved(impls, device, args.repeats)
        base_ms = harness.quantiles(times["float32"])[0] / steps * 1e3
        for (name, samples), dt in zip(times.items(), DTYPES):
            median, low, high = (v / steps * 1e3 for v in harness.quantiles(samples))
            gbs = n * d * xs[dt].element_size() / (median * 1e-3) / 1e9
            # the float32 call and this one in the same round, under a second apart: the drift of the machine's
            # bandwidth between rounds cancels in their ratio
            _, r_low, r_high = harness.quantiles([a / b for a, b in zip(times["float32"], samples)])
            rows.append(f"| {op} | {name} | {n} x {d} | {median:.2f} | {low:.2f}–{high:.2f} | {gbs:.1f} | "
                        f"{base_ms / median:.2f}× | {r_low:.2f}–{r_high:.2f}× |")
    body = (f"{threads} threads; {steps} steps per call; X ~ N(0, 1). The same indices as the float32 op on the "
            "widened rows (checked).\n\n" + "\n".join(rows) + "\n")
    print(body)
    harness.record_results(args, f"bench/kcenter_storage.py{' --quick' if args.quick else ''}", body)


if __name__ == "__main__":
    main()
