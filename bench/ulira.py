"""Per-example vs population membership inference after unlearning: where a population MIA says "forgotten",
does U-LiRA agree?

    python bench/ulira.py              # K = 8 shadows and T = 4 targets of each kind; prints only
    python bench/ulira.py --quick      # K = 4, T = 2
    python bench/ulira.py --record     # the full run, appended to bench/RESULTS.md

Scenario: digits, forget a random 10% (seed-0 split), MLP 64-128-64-10. Every model of one kind differs only in
its seed: "unlearned" models are originals trained on the whole training set (seed s) and then unlearned by the
method (run seed s); "retrained" models are trained on the retain set only (seed s). The first K of each kind are
U-LiRA's shadows, the next T its targets (erasus.metrics.ulira: per-example Gaussians of the logit-scaled
confidence, balanced accuracy of the likelihood-ratio test; 0.5 = indistinguishable from retraining). Next to it:
SalUn's population MIA-efficacy (one attacker for all examples), as its gap between the unlearned and the
retrained targets (small = the population attack says "forgotten"), and the forget accuracy gap. The cost of the
per-example test is printed with it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import harness  # noqa: E402

from erasus.demo import (cached_model, digits_mlp, load_digits_data, retrained_model,  # noqa: E402
                         split_scenario)
from erasus.metrics import accuracy, logit_scaled_confidence, mia_efficacy, predict_logits, ulira  # noqa: E402
from erasus.training import train_classifier  # noqa: E402
from erasus.unlearner import ErasusUnlearner, ForgettingWarning  # noqa: E402

METHODS = [("finetune (retain only), full", "finetune", {"lr": 3e-3}, None, False),
           ("NPO, full forget set", "npo", {"lr": 1e-3}, None, False),
           ("NPO, verified adaptive k-center 10%", "npo", {"lr": 1e-3}, "kcenter", True)]


def signal(model, data) -> torch.Tensor:
    return logit_scaled_confidence(*predict_logits(model, data))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 4 shadows, T = 2 targets of each kind")
    harness.add_record_flag(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    harness.pin_threads()
    shadows, targets = (4, 2) if args.quick else (8, 4)
    seeds = range(shadows + targets)
    train, test = load_digits_data(0)
    forget, retain = split_scenario(train, "random", forget_fraction=0.1, seed=0)
    started = time.perf_counter()
    originals = [cached_model(f"digits-mlp-original-split0-s{s}", lambda s=s: digits_mlp(s),
                              lambda m, s=s: train_classifier(m, train, epochs=30, seed=s)) for s in tqdm(
        seeds, desc="originals", file=sys.stderr)]
    retrained = [retrained_model(retain, "random0.1-split0", seed=s) for s in tqdm(seeds, desc="retrained",
                                                                                   file=sys.stderr)]
    t_train = time.perf_counter() - started
    r_signal = torch.stack([signal(m, forget) for m in retrained])
    r_mia = [mia_efficacy(m, retain, test, forget) for m in retrained[shadows:]]
    r_ua = [1 - accuracy(m, forget) for m in retrained[shadows:]]

    lines = [f"Digits, random 10% forgotten (seed-0 split, {len(forget)} examples); K = {shadows} shadow and "
             f"T = {targets} target models of each kind, differing only in their seed. U-LiRA accuracy: balanced "
             "accuracy of the per-example likelihood-ratio test over (target, example) pairs (0.5 = "
             "indistinguishable from retraining); vulnerable: examples whose own accuracy is >= 0.75. MIA gap: "
             "|mean MIA-efficacy of the unlearned targets - of the retrained targets| (SalUn's population attack).",
             "", "| method | UA gap | MIA gap (population) | U-LiRA acc | U-LiRA AUC | TPR@1%FPR | vulnerable | "
             "unlearning s per model |", "|---|---|---|---|---|---|---|---|"]
    # the noise floor: retrained models split into two pretend kinds (shadows and targets halved)
    half_s, half_t = shadows // 2, shadows + targets // 2
    retrained_row = ulira(r_signal[:half_s], r_signal[half_s:shadows], r_signal[shadows:half_t],
                          r_signal[half_t:])
    for label, strategy, params, selector, adaptive in METHODS:
        t0 = time.perf_counter()
        signals, mias, uas = [], [], []
        for s, original in zip(tqdm(seeds, desc=label[:24], file=sys.stderr), originals):
            unlearner = ErasusUnlearner(original, strategy=strategy, strategy_params=params, selector=selector,
                                        prune_ratio=0.1 if selector else 1.0, epochs=5, copy=True, seed=s,
                                        adaptive=adaptive)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ForgettingWarning)
                model, _ = unlearner.fit(forget, retain, test=test)
            signals.append(signal(model, forget))
            if s >= shadows:
                mias.append(mia_efficacy(model, retain, test, forget))
                uas.append(1 - accuracy(model, forget))
        per_model = (time.perf_counter() - t0) / len(seeds)
        u_signal = torch.stack(signals)
        out = ulira(u_signal[:shadows], r_signal[:shadows], u_signal[shadows:], r_signal[shadows:])
        lines.append(f"| {label} | {abs(statistics.mean(uas) - statistics.mean(r_ua)):.3f} | "
                     f"{abs(statistics.mean(mias) - statistics.mean(r_mia)):.3f} | {out['accuracy']:.3f} | "
                     f"{out['auc']:.3f} | {out['tpr_at_1pct_fpr']:.3f} | {out['vulnerable_fraction']:.2f} | "
                     f"{per_model:.2f} |")
    lines.append(f"| (retrained vs retrained: the test's own noise floor) | – | – | {retrained_row['accuracy']:.3f} | "
                 f"{retrained_row['auc']:.3f} | {retrained_row['tpr_at_1pct_fpr']:.3f} | "
                 f"{retrained_row['vulnerable_fraction']:.2f} | – |")
    lines += ["", f"Cost of the per-example test: {len(seeds)} original trainings + {len(seeds)} retrainings "
              f"({t_train:.0f} s here, cached after the first run) + {len(seeds)} unlearning runs per method, "
              "each model scored forward-only on the forget set; a population MIA needs one model."]
    body = "\n".join(lines)
    print(body)
    harness.record_results(args, f"bench/ulira.py{' --quick' if args.quick else ''}", body)


if __name__ == "__main__":
    main()
