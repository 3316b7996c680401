"""Does unlearning a coreset of the forget set work as well as unlearning all of it, at less cost?

    python bench/coreset_efficacy.py             # 3 seeds, both scenarios, both protocols; prints only
    python bench/coreset_efficacy.py --quick     # 1 seed, one strategy: a smoke run
    python bench/coreset_efficacy.py --record    # the full run, appended to bench/RESULTS.md with its plot

For each scenario (forget digit class 3; forget a random 10%), strategy (all eight) and seed: selectors random /
kcenter / herding / gradnorm at prune ratios 0.1, 0.2, 0.5, and the full forget set, under two protocols:
fixed epochs over the (sub)set (coresets cost less) and fixed optimiser steps (same cost as the full set).
Forgetting is scored on the whole forget set and on its unselected part (UPCORE's rule), as gaps to a
model retrained on the retain set; utility as retain (RA) and test (TA) accuracy. Cost is counted in
forget-side sample passes and wall time. Results: mean ± std over seeds, a Pareto plot, and a plain statement
of which selector beats random at equal compute (../shared/reference/coreset_evaluation.md gives the protocol).
With --record they are appended to bench/RESULTS.md and the plot replaces bench/coreset_pareto.png; without
it the tables are printed, the plot goes to a new temporary folder (its path is printed) and nothing tracked
is written.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

from tqdm import tqdm  # noqa: E402

import harness  # noqa: E402

from erasus.cli import scenario_data  # noqa: E402
from erasus.metrics import accuracy  # noqa: E402
from erasus.report import pareto_plot  # noqa: E402
from erasus.unlearner import ErasusUnlearner  # noqa: E402

STRATEGIES = {"ga": {"lr": 5e-4}, "graddiff": {"lr": 5e-4}, "npo": {"lr": 5e-4}, "finetune": {"lr": 3e-3},
              "scrub": {}, "salun": {"lr": 1e-3}, "ssd": {"alpha": 5.0}, "fisher": {"alpha": 1e-5, "max_std": 0.1}}
TRAINING_FREE = {"ssd", "fisher"}  # one pass: the fixed-steps protocol does not apply
SELECTORS = ["random", "kcenter", "herding", "gradnorm"]
RATIOS = [0.1, 0.2, 0.5]
EPOCHS = 5


def run_one(scenario_bundle, strategy, selector, ratio, epochs, seed):
    forget, retain, test, original, retrained = scenario_bundle
    unlearner = ErasusUnlearner(original, strategy=strategy, selector=selector, prune_ratio=ratio,
                                strategy_params=STRATEGIES[strategy], epochs=epochs, copy=True, seed=seed)
    _, rep = unlearner.fit(forget, retain, test=test, retrained=retrained)
    m, r = rep["metrics"], rep["retrained"]
    return {"gap_UA": abs(m["UA"] - r["UA"]), "gap_UA_unselected": abs(m.get("UA_unselected", m["UA"]) - r["UA"]),
            "RA": m["RA"], "TA": m["TA"], "gap_MIA": abs(m["MIA"] - r["MIA"]), "avg_gap": rep["avg_gap"],
            "passes": rep["forget_sample_passes"], "time_s": rep["time_total_s"]}


def attack_table(n_models: int) -> list[str]:
    """The NeurIPS-2023 per-example forget score F on the random-10% scenario: N unlearning runs (seeds of the
    run, one original model) against N models retrained on the retain set (seeds of the training)."""
    import torch

    from erasus.demo import retrained_model
    from erasus.metrics import final_score, forget_score, logit_scaled_confidence, predict_logits

    forget, retain, test, original, _ = scenario_data("random", 0)
    # every retrained model sees the same (seed-0) retain set; only its training seed differs
    retrained = [retrained_model(retain, "random0.1-split0", seed=s) for s in range(n_models)]
    f_logits = [predict_logits(m, forget) for m in retrained]
    r_signal = torch.stack([logit_scaled_confidence(z, y) for z, y in f_logits])
    ra_r = statistics.mean(accuracy(m, retain) for m in retrained)
    ta_r = statistics.mean(accuracy(m, test) for m in retrained)
    lines = ["", f"Per-example attack: NeurIPS-2023 forget score F (N = {n_models} unlearning runs vs {n_models} "
             "retrained models, random-10% scenario, seed-0 split; epsilon buckets up to ceil(ln(N-1)); F = 1 is "
             "indistinguishable from retraining, 0 fully distinguishable) and the final score F x RA_U/RA_R x "
             "TA_U/TA_R.", "", "| strategy | selector | ratio | F | final score | median epsilon |", "|---|---|---|---|---|---|"]
    configs = [("npo", None, 1.0), ("npo", "random", 0.2), ("npo", "kcenter", 0.2), ("finetune", None, 1.0)]
    for strategy, selector, ratio in tqdm(configs, desc="attack", file=sys.stderr):
        signals, ras, tas = [], [], []
        for seed in range(n_models):
            params = STRATEGIES.get(strategy, {"lr": 1e-3})
            model, _ = ErasusUnlearner(original, strategy=strategy, selector=selector, prune_ratio=ratio,
                                       strategy_params=params, epochs=EPOCHS, copy=True,
                                       seed=seed).fit(forget, retain)
            signals.append(logit_scaled_confidence(*predict_logits(model, forget)))
            ras.append(accuracy(model, retain))
            tas.append(accuracy(model, test))
        score = forget_score(torch.stack(signals), r_signal)
        final = final_score(score["F"], statistics.mean(ras), ra_r, statistics.mean(tas), ta_r)
        lines.append(f"| {strategy} | {selector or 'full'} | {ratio} | {score['F']:.3f} | {final:.3f} | "
                     f"{statistics.median(score['epsilons']):.2f} |")
    return lines


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, one strategy: a smoke run")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    harness.add_record_flag(parser)
    parser.add_argument("--attack-models", type=int, default=None,
                        help="N for the per-example attack (default 8; 4 with --quick)")
    parser.add_argument("--attack-only", action="store_true", help="run only the per-example attack table")
    return parser


def main():
    args = build_parser().parse_args()
    n_models = args.attack_models or (4 if args.quick else 8)
    if args.attack_only:
        body = "\n".join(attack_table(n_models)[1:])
        print(body)
        harness.record_results(args, "bench/coreset_efficacy.py --attack-only", body)
        return
    harness.pin_threads()
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    strategies = ["npo"] if args.quick else list(STRATEGIES)
    ratios = [0.2] if args.quick else RATIOS
    plan = [(scen, strat, sel, ratio, proto) for scen in ("class", "random") for strat in strategies
            for proto in ("fixed-epochs", "fixed-steps") for sel, ratio in
            [(s, r) for s in SELECTORS for r in ratios] + [("full", 1.0)]
            if not ((sel == "full" or strat in TRAINING_FREE) and proto == "fixed-steps")]
    results: dict[tuple, list[dict]] = {}
    bundles = {}
    with tqdm(total=len(plan) * len(seeds), desc="runs", file=sys.stderr) as bar:
        for seed in seeds:
            for scen in ("class", "random"):
                bundles[scen] = scenario_data(scen, seed)
            for scen, strat, sel, ratio, proto in plan:
                epochs = EPOCHS if proto == "fixed-epochs" else max(EPOCHS, round(EPOCHS / ratio))
                res = run_one(bundles[scen], strat, None if sel == "full" else sel, ratio, epochs, seed)
                results.setdefault((scen, strat, sel, ratio, proto), []).append(res)
                bar.update(1)

    lines = [f"Seeds {seeds}; {EPOCHS} epochs over the coreset (fixed-epochs) or {EPOCHS}/ratio epochs "
             "(fixed-steps: as many optimiser steps as the full set). Gaps are |metric - retrained|, mean ± std "
             "over seeds; UA on the whole forget set, UA-unsel on the part the coreset left out.", "",
             "| scenario | strategy | protocol | selector | ratio | gap UA | gap UA-unsel | RA | TA | gap MIA | "
             "avg gap | forget passes | time s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    points = []
    for key, runs in results.items():
        scen, strat, sel, ratio, proto = key
        cols = {k: mean_std([r[k] for r in runs]) for k in runs[0]}
        lines.append(f"| {scen} | {strat} | {proto if sel != 'full' else '—'} | {sel} | {ratio} | "
                     + " | ".join(f"{cols[k][0]:.3f} ± {cols[k][1]:.3f}" for k in
                                  ("gap_UA", "gap_UA_unselected", "RA", "TA", "gap_MIA", "avg_gap"))
                     + f" | {cols['passes'][0]:.0f} | {cols['time_s'][0]:.2f} |")
        if proto == "fixed-epochs":
            points.append({"selector": sel, "scenario": scen, "gap_UA": cols["gap_UA"][0], "RA": cols["RA"][0]})

    # Which selector beats random at equal compute: lower mean avg gap by more than the paired spread.
    verdict = ["", "Selector vs a random coreset of the same size (same protocol, strategy, scenario, ratio; "
               "'beats' = mean avg-gap lower by more than the standard error of the paired difference over seeds):", ""]
    for sel in SELECTORS[1:]:
        wins = losses = ties = 0
        for (scen, strat, s, ratio, proto), runs in results.items():
            if s != sel:
                continue
            base = results[(scen, strat, "random", ratio, proto)]
            diffs = [b["avg_gap"] - r["avg_gap"] for r, b in zip(runs, base)]
            mean = statistics.mean(diffs)
            se = (statistics.stdev(diffs) / len(diffs) ** 0.5) if len(diffs) > 1 else 0.0
            if mean > se and mean > 0:
                wins += 1
            elif -mean > se and mean < 0:
                losses += 1
            else:
                ties += 1
        verdict.append(f"- {sel}: beats random in {wins}, loses in {losses}, no clear difference in {ties} of "
                       f"{wins + losses + ties} settings.")
    full_gap = {(scen, strat): statistics.mean(r["avg_gap"] for r in runs)
                for (scen, strat, s, ratio, proto), runs in results.items() if s == "full"}
    verdict.append("")
    for (scen, strat), gap in full_gap.items():
        best = min(((statistics.mean(r["avg_gap"] for r in runs), s, ratio, proto)
                    for (sc, st, s, ratio, proto), runs in results.items() if sc == scen and st == strat
                    and s != "full"))
        verdict.append(f"- {scen}/{strat}: full forget set avg gap {gap:.3f}; best coreset {best[1]} "
                       f"{best[2]} ({best[3]}) {best[0]:.3f}.")
    body = "\n".join(lines + verdict + attack_table(n_models))
    print(body)
    plot = harness.plot_path(args, "coreset_pareto.png")  # only a recorded run replaces the committed plot
    pareto_plot(points, plot, title="coreset unlearning on digits: forgetting gap vs retain accuracy")
    print(f"Pareto plot: {plot}")
    harness.record_results(args, f"bench/coreset_efficacy.py{' --quick' if args.quick else ''}",
                           body + "\n\nPareto plot (|UA - UA_retrained| vs RA, fixed-epochs runs): "
                           "bench/coreset_pareto.png")


if __name__ == "__main__":
    main()
