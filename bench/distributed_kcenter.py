"""Distributed k-center on one CPU machine: 1 process against 2 gloo processes, with the same cores.

    python bench/distributed_kcenter.py            # n = 50k, d = 512, k = 500; prints only
    python bench/distributed_kcenter.py --quick    # n = 10k, d = 128, k = 100
    python bench/distributed_kcenter.py --data clusters   # a 100-cluster mixture: most rows pruned
    python bench/distributed_kcenter.py --record   # the same, and appends the table to bench/RESULTS.md

Two processes are started once (torch.multiprocessing, gloo on 127.0.0.1 via a file rendezvous); X (float32,
seeded) is built in both and each keeps its rows (erasus.distributed.shard_range). Then, round-robin (ABCD,
ABCD, ...) so that drift hits every row alike:

* A ``erasus.distributed.distributed_kcenter`` in a group of 1 (rank 0 alone), 1 torch thread;
* B the same with all cores as torch threads;
* C ``erasus.ops.kcenter_greedy`` (the compiled single-process op, all cores as OpenMP threads) -- context: what
  one process gets without torch.distributed;
* D ``distributed_kcenter`` on 2 processes, each with cores / 2 threads (1 on a 2-core machine), so that D and
  B use the same cores and the processes do not fight over them with their thread pools.

The speedup of 1 -> 2 processes is D against A (the same threads per process) and against B (the same cores).
Also timed: the collectives alone (one broadcast of a d-float row and one all-reduce of an int64 per step), the
floor the network adds per step. Before timing, D's indices are checked against C's (the same farthest-first
sequence). Two processes on one machine share its memory bandwidth, so expect little from a second process on
a bandwidth-bound step; the distributed op is for rows that do not fit one machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# bench/selectors.py shadows the standard library's `selectors` (which torch imports): bench/ goes to the back
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import harness  # noqa: E402

import erasus.ops  # noqa: E402
from erasus.distributed import distributed_kcenter, shard_range  # noqa: E402

WORLD = 2


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _collectives_alone(d: int, k: int) -> float:
    """Seconds for k steps of what distributed_kcenter sends per step, without the distance work."""
    row, key = torch.zeros(d), torch.zeros(1, dtype=torch.int64)
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(k):
        dist.broadcast(row, src=step % WORLD)
        dist.all_reduce(key, op=dist.ReduceOp.MAX)
    return time.perf_counter() - t0


def make_x(data: str, n: int, d: int) -> torch.Tensor:
    """The rows (float32, seeded): N(0, 1), or bench/kcenter_pruning.py's 100-cluster mixture (centres ~ N(0, 16),
    unit noise), where the triangle inequality spares most rows."""
    g = torch.Generator().manual_seed(0)
    if data == "gaussian":
        return torch.randn(n, d, generator=g)
    return (torch.randn(100, d, generator=g) * 4)[torch.randint(0, 100, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _worker(rank: int, data: str, n: int, d: int, k: int, repeats: int, init_method: str, results) -> None:
    cores = os.cpu_count() or 1
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    solo = dist.new_group([0])  # every rank takes part in creating it; only rank 0 runs in it
    x = make_x(data, n, d)
    begin, end = shard_range(n, rank, WORLD)
    shard = x[begin:end].clone()
    if rank != 0:
        del x

    def one_process(threads):
        def run():
            torch.set_num_threads(threads)
            return distributed_kcenter(x, k, group=solo)
        return run

    def one_process_op():
        torch.set_num_threads(cores)
        return erasus.ops.kcenter_greedy(x, k)

    def two_processes():
        torch.set_num_threads(max(1, cores // WORLD))
        return distributed_kcenter(shard, k)

    # check first (a wrong result is never timed), which also warms every path up
    two = two_processes()
    if rank == 0:
        same = two.indices.tolist() == one_process_op().indices.tolist()
        same_solo = one_process(cores)().indices.tolist() == two.indices.tolist()
    dist.barrier()
    solo_runs = {"1 process, distributed_kcenter": one_process(1),
                 f"1 process, distributed_kcenter, {cores} threads": one_process(cores),
                 "1 process, erasus.ops.kcenter_greedy (cpp)": one_process_op}
    times: dict[str, list[float]] = {name: [] for name in solo_runs}
    times["2 processes, distributed_kcenter"] = []
    for _ in range(repeats):
        if rank == 0:
            for name, run in solo_runs.items():
                times[name].append(_timed(run))
        dist.barrier()
        elapsed = _timed(two_processes)
        dist.barrier()
        times["2 processes, distributed_kcenter"].append(elapsed)
    torch.set_num_threads(max(1, cores // WORLD))
    comm = min(_collectives_alone(d, k) for _ in range(3))
    if rank == 0:  # to the parent through a queue: the script writes no file of its own
        results.put({"times": times, "same": same, "same_solo": same_solo, "comm": comm, "cores": cores})
    dist.barrier()
    dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 10k, d = 128, k = 100")
    parser.add_argument("--data", choices=("gaussian", "clusters"), default="gaussian",
                        help="X ~ N(0, 1) (every row read every step) or a 100-cluster mixture (most rows pruned)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration (default 3, 5 quick)")
    harness.add_record_flag(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    n, d, k = (10_000, 128, 100) if args.quick else (50_000, 512, 500)
    repeats = args.repeats or (5 if args.quick else 3)
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:  # the rendezvous file of the process group
        mp.spawn(_worker, args=(args.data, n, d, k, repeats, f"file://{os.path.join(tmp, 'rendezvous')}", results),
                 nprocs=WORLD, join=True)
    result = results.get()
    cores = result["cores"]
    per_thread = harness.quantiles(result["times"]["1 process, distributed_kcenter"])[0]
    per_core = harness.quantiles(result["times"][f"1 process, distributed_kcenter, {cores} threads"])[0]
    lines = [f"Machine: {harness.machine_name()}; {harness.versions()}",
             f"X: {'N(0, 1)' if args.data == 'gaussian' else '100-cluster mixture'}, n={n}, d={d}, float32 "
             f"({n * d * 4 / 2**20:.0f} MiB); k={k}; {repeats} rounds, round-robin",
             "",
             "| configuration | processes x threads | ms/step median (p20-p80) | vs 1 x 1 | vs 1 x cores |",
             "|---|---|---|---|---|"]
    for name, samples in result["times"].items():
        med, p20, p80 = harness.quantiles(samples)
        shape = (f"{WORLD} x {max(1, cores // WORLD)}" if name.startswith("2") else
                 "1 x 1" if name == "1 process, distributed_kcenter" else f"1 x {cores}")
        lines.append(f"| {name} | {shape} | {1e3 * med / k:.2f} ({1e3 * p20 / k:.2f}-{1e3 * p80 / k:.2f}) | "
                     f"{per_thread / med:.2f}x | {per_core / med:.2f}x |")
    lines += ["",
              f"Collectives alone (1 broadcast of {d} floats + 1 all-reduce of an int64 per step, 2 processes): "
              f"{1e3 * result['comm'] / k:.3f} ms/step.",
              f"Same indices as erasus.ops.kcenter_greedy: {'yes' if result['same'] else 'NO'} (2 processes); "
              f"{'yes' if result['same_solo'] else 'NO'} (1 process)."]
    body = "\n".join(lines)
    print(body)
    harness.record_results(args, f"bench/distributed_kcenter.py{' --quick' if args.quick else ''}"
                                 f"{' --data clusters' if args.data == 'clusters' else ''}",
                           "\n".join(lines[1:]) + NOTES)


NOTES = """

'vs 1 x 1' / 'vs 1 x cores': that row's speed against distributed_kcenter in one process with 1 thread / with
every core as a torch thread (>1: faster). The 2-process row uses cores / 2 threads per process (a process's
ATen/OpenMP pool sized to its share of the cores), so it and the '1 x cores' rows use the same cores. On one
machine the processes share its memory bandwidth, so a step that streams X from DRAM gains little from a
second process; distributed_kcenter is for X spread over machines (or GPUs), where each rank streams only its
rows. Its per-rank step on CPU is the compiled op's own step (_C.kcenter_step: the triangle pruning, the
distances, the running minima and the rank's farthest row in one call on the rank's threads) plus the per-step
collectives, whose latency is measured above; the compiled single-process op's row is the reference point on
one machine. Timings from a machine shared with other jobs are noisy: compare rows only
within one run.
"""


if __name__ == "__main__":
    main()
