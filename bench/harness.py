"""Shared benchmark plumbing: the machine's name and bandwidth, interleaved timing, and RESULTS.md records.

Recording is opt-in: a script writes bench/RESULTS.md or a committed plot only when run with ``--record``
(``add_record_flag``); by default it prints its tables and puts any plot in a fresh temporary folder.

Protocol (../shared/reference/kernels.md, section 8): in one process, check every implementation against
the reference first, then time all of them interleaved (ABAB...) and report medians with 20/80 quantiles.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def pin_threads() -> int:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_name() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    name = f"{cpu_name()}, {os.cpu_count()} cores, {mem:.0f} GiB"
    if torch.cuda.is_available():
        name += f"; GPU {torch.cuda.get_device_name()}"
    return name


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth_gbs(device: torch.device, gib: float = 1.0, repeats: int = 7) -> float:
    """Measured read bandwidth: best time of a sum over a pre-faulted buffer much larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(impls: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                progress=None) -> dict[str, list[float]]:
    """Seconds per call for each implementation, measured round-robin so drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            times[name].append(timed(fn, device))
            if progress is not None:
                progress.update(1)
    return times


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for mod in ("numpy", "faiss", "triton"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            continue
    return ", ".join(parts)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def rss_growth_mib(fn) -> tuple[float, object]:
    """``(MiB, result)``: how far one call of ``fn`` raises this process's peak resident set above the resident set
    before it (Linux: the high-water mark VmHWM is reset to the current RSS first, and freed heap pages are given
    back, so earlier peaks -- building the inputs -- are not counted). NaN where /proc cannot do this."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:  # a kernel control file, not an output
            f.write("5")
        before = _status_kib("VmRSS")
    except (OSError, LookupError):
        return float("nan"), fn()
    result = fn()
    return (_status_kib("VmHWM") - before) / 1024, result


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    """``--record`` (append to bench/RESULTS.md, replace committed plots); off by default. ``--no-record`` is
    accepted too and means the default, so older command lines still run and write nothing."""
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=False,
                        help="append the tables to bench/RESULTS.md and replace the committed plots "
                             "(default: print only; plots go to a temporary folder)")


def record_results(args: argparse.Namespace, title: str, body: str, path: Path | None = None) -> bool:
    """Append ``body`` to RESULTS.md only if the run asked for ``--record``; returns whether it did."""
    if not args.record:
        return False
    target = RESULTS if path is None else path
    append_results(title, body, target)
    print(f"\nAppended to {target}")
    return True


def plot_path(args: argparse.Namespace, name: str) -> Path:
    """Where a plot goes: beside this file (replacing the committed one) under ``--record``, else a new
    temporary folder, so a plain run never touches a tracked file."""
    folder = Path(__file__).resolve().parent if args.record else Path(tempfile.mkdtemp(prefix="erasus-bench-"))
    return folder / name


def append_results(title: str, body: str, path: Path = RESULTS) -> None:
    """Append a dated section to ``path`` unconditionally; scripts go through ``record_results``."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (f"\n## {title} — {stamp}\n\nMachine: {machine_name()} (host `{platform.node()}`); threads "
              f"{torch.get_num_threads()}; {versions()}; git {git_sha()}.\n\n")
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by the scripts in bench/ when run with `--record` (without "
                        "it they only print); compare rows only within one machine and one run.\n")
    with path.open("a") as f:
        f.write(header + body.rstrip() + "\n")
