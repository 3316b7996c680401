"""Dual-sensitivity LoRA pruning (dual_prune) against its baselines on the tiny LM corpus: Selective Pruning
(activation-ratio scores, training-free) and plain LoRA gradient ascent / NPO.

    python bench/pruning.py              # seeds 0, 1, 2; prints only (a few minutes on 2 cores)
    python bench/pruning.py --seeds 0    # one seed
    python bench/pruning.py --record     # the same, and appends the table to bench/RESULTS.md

Scenario: erasus.data.lm_models.lm_scenario("gpt2", 0.25, preset="test", seed=s) for each seed s (12 authors x
8 QA pairs, 3 forgotten; the retrained model is trained on the retain authors only). Every method runs through
ErasusUnlearner with erasus.lm_demo.RUN (20 epochs at most, forget batch 8, retain batch 32, stop at the
retrained model's forget NLL, checked every step) and unlearning seed s:

* dual_prune: tests/lm/test_dual_prune.py PARAMS (GA adapters, a round of 2% of the groups every 5 steps,
  retain-QA floor 0.9 on 24 retain samples), LoRA lm_demo.lora_config("gpt2");
* selective_pruning: ratio SELECTIVE_RATIO of the head / MLP-channel groups, eps 1e-5, on the plain model;
* LoRA GA and LoRA NPO: the LoRA settings of erasus.lm_demo.LM_METHODS ("GA + output anchor", "NPO").
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# bench/selectors.py shadows the standard library's `selectors` (which torch imports): bench/ goes to the back
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]
_ROOT = os.path.dirname(_HERE)
sys.path.append(_ROOT)  # tests/lm/test_dual_prune.py holds dual_prune's tuned settings

import harness  # noqa: E402

#: Selective Pruning's fraction: at 0.2 its retain QA is about dual_prune's floor (0.9) on seed 0, so the two
#: prune to the same retain cost; it is training-free and has no stopping rule (0.1 keeps retain QA 1.0 but
#: barely moves the forget NLL: 0.031 -> 0.050 on seed 0).
SELECTIVE_RATIO = 0.2
COLUMNS = [("forget_nll", "forget NLL"), ("forget_qa_acc", "forget QA"), ("retain_qa_acc", "retain QA"),
           ("mia_min_k++_auc", "MinK++ AUC")]


def methods() -> list[tuple[str, str, dict, bool]]:
    """(label, strategy, params, with LoRA)."""
    from erasus.lm_demo import LM_METHODS
    from tests.lm.test_dual_prune import PARAMS

    lora_params = {name: by_arch["gpt2"][1] for _, name, by_arch in LM_METHODS}
    return [("dual_prune (LoRA)", "dual_prune", PARAMS, True),
            (f"selective_pruning (ratio {SELECTIVE_RATIO})", "selective_pruning", {"ratio": SELECTIVE_RATIO}, False),
            ("LoRA GA (+ output anchor)", "ga", lora_params["ga"], True),
            ("LoRA NPO", "npo", lora_params["npo"], True)]


def run(seed: int) -> list[dict]:
    from erasus import ErasusUnlearner
    from erasus.data.lm_models import lm_scenario
    from erasus.lm_demo import RUN, lora_config
    from erasus.tasks import CausalLM

    s = lm_scenario("gpt2", 0.25, preset="test", seed=seed)
    rows = []
    for label, name, params, lora in methods():
        unlearner = ErasusUnlearner(s["original"], strategy=name, selector=None, prune_ratio=1.0,
                                    strategy_params=params, lora=lora_config("gpt2") if lora else None, copy=True,
                                    seed=seed, task=CausalLM(mias=("min_k++",)), **RUN)
        t0 = time.perf_counter()
        _, report = unlearner.fit(s["forget"], s["retain"], test=s["holdout"], retrained=s["retrained"])
        seconds = time.perf_counter() - t0
        if not rows:
            for ref in ("original", "retrained"):
                rows.append({"method": f"({ref})", "seed": seed, **report[ref]})
        rows.append({"method": label, "seed": seed, **report["metrics"], "passes": report["forget_sample_passes"],
                     "time_s": seconds, "reached": bool((report["early_stop"] or {}).get("reached")),
                     "stopped": report["guard"]["stopped"]})
        print(f"seed {seed} {label}: " + ", ".join(f"{short} {rows[-1].get(key, float('nan')):.3f}"
                                                     for key, short in COLUMNS)
              + f", passes {rows[-1]['passes']}, {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def _cell(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def report(rows: list[dict], seeds: list[int]) -> list[str]:
    lines = ["| method | " + " | ".join(short for _, short in COLUMNS) + " | forget sample passes | time s | "
             "target reached |", "|---" * (len(COLUMNS) + 4) + "|"]
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        cells = [_cell([r.get(key) for r in mine]) for key, _ in COLUMNS]
        if "passes" in mine[0]:
            extra = [_cell([r["passes"] for r in mine], 0), _cell([r["time_s"] for r in mine], 1),
                     f"{sum(r['reached'] for r in mine)}/{len(mine)}"]
        else:
            extra = ["-", "-", "-"]
        lines.append(f"| {label} | " + " | ".join(cells + extra) + " |")
    return lines


NOTES = """
Mean ± half the range over the seeds ({seeds}); each seed builds its own scenario (authors, split, models).
forget NLL: mean answer NLL on the forget set (the target is the retrained model's); forget / retain QA: greedy
exact-answer accuracy; MinK++ AUC: Min-K%++ membership AUC, forget vs holdout (0.5 = indistinguishable);
forget sample passes: forget samples the strategy read (report["forget_sample_passes"]: one pass over the 24
forget samples for selective_pruning, which also reads the retain set once); time: the unlearning run with its
per-step stopping checks, without the final evaluation. target reached: runs that met the retrained model's
forget NLL (selective_pruning is one-shot and has no stopping rule). Selective Pruning ratio {ratio}.
"""


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="scenario and unlearning seeds")
    harness.add_record_flag(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    # OMP_NUM_THREADS, when set, is kept (the bench can run beside the test suite on one core)
    threads = torch_threads() if os.environ.get("OMP_NUM_THREADS") else harness.pin_threads()
    print(f"Machine: {harness.machine_name()}; {threads} threads; {harness.versions()}", file=sys.stderr)
    rows = [row for seed in args.seeds for row in run(seed)]
    lines = report(rows, args.seeds)
    notes = NOTES.format(seeds=", ".join(map(str, args.seeds)), ratio=SELECTIVE_RATIO)
    print("\n".join(lines) + notes)
    harness.record_results(args, f"bench/pruning.py --seeds {' '.join(map(str, args.seeds))}",
                           "\n".join(lines) + "\n" + notes)


if __name__ == "__main__":
    main()
