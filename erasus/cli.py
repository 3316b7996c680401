"""The ``erasus`` command: ``erasus demo`` and ``erasus unlearn --config run.yaml``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from erasus.errors import ErasusError, InvalidInputError

DEMO_METHODS = [  # (label, strategy, params, selector, prune_ratio, epochs)
    ("NPO, k-center coreset 20%", "npo", {"lr": 1e-3}, "kcenter", 0.2, 5),
    ("NPO, random coreset 20%", "npo", {"lr": 1e-3}, "random", 0.2, 5),
    ("NPO, full forget set", "npo", {"lr": 5e-4}, None, 1.0, 5),
    ("SCRUB, full forget set", "scrub", {}, None, 1.0, 5),
    ("SSD (alpha 5), full", "ssd", {"alpha": 5.0}, None, 1.0, 1),
]

CONFIG_KEYS = {"scenario", "forget_class", "forget_fraction", "strategy", "strategy_params", "selector",
               "selector_params", "prune_ratio", "epochs", "batch_size", "seed", "out_dir"}


def scenario_data(scenario: str, seed: int = 0, forget_class: int = 3, forget_fraction: float = 0.1):
    """Digits split for a scenario: (forget, retain, test, original model, retrained model). For the class
    scenario, the test set leaves the forgotten class out (TA on the other classes, as SalUn reports it)."""
    from erasus.demo import load_digits_data, original_model, retrained_model, split_scenario

    train, test = load_digits_data(seed)
    forget, retain = split_scenario(train, scenario, forget_class=forget_class, forget_fraction=forget_fraction,
                                    seed=seed)
    if scenario == "class":
        test = Subset(test, (test.tensors[1] != forget_class).nonzero().flatten().tolist())
    key = f"class{forget_class}" if scenario == "class" else f"random{forget_fraction}"
    return forget, retain, test, original_model(train, seed), retrained_model(retain, f"{key}-split{seed}", seed)


def demo(out_dir: str | None = None) -> list[dict]:
    """Train (or load) the digits MLP, forget a class and a random 10%, print UA/RA/TA/MIA/time vs retrain."""
    from erasus.metrics import accuracy, mia_efficacy
    from erasus.unlearner import ErasusUnlearner

    started = time.perf_counter()
    rows = []
    header = f"{'scenario':<8} {'method':<28} {'UA':>6} {'RA':>6} {'TA':>6} {'MIA':>6} {'gap':>6} {'time s':>7}"
    print("Erasus demo: scikit-learn digits, MLP 64-128-64-10; UA = 1 - forget accuracy; gap = mean |metric - "
          "retrained| over UA, RA, TA, MIA\n")
    print(header)
    print("-" * len(header))
    for scenario in ("class", "random"):
        forget, retain, test, original, retrained = scenario_data(scenario)
        for label, model in (("original", original), ("retrained (gold)", retrained)):
            m = {"UA": 1 - accuracy(model, forget), "RA": accuracy(model, retain), "TA": accuracy(model, test),
                 "MIA": mia_efficacy(model, retain, test, forget)}
            rows.append({"scenario": scenario, "method": label, **m, "gap": float("nan"), "time_s": float("nan")})
            print(f"{scenario:<8} {label:<28} {m['UA']:6.3f} {m['RA']:6.3f} {m['TA']:6.3f} {m['MIA']:6.3f} "
                  f"{'':>6} {'':>7}")
        for label, strategy, params, selector, ratio, epochs in DEMO_METHODS:
            run_dir = Path(out_dir) / scenario / strategy / (selector or "full") if out_dir else None
            unlearner = ErasusUnlearner(original, strategy=strategy, selector=selector, prune_ratio=ratio,
                                        strategy_params=params, epochs=epochs, copy=True, out_dir=run_dir)
            _, report = unlearner.fit(forget, retain, test=test, retrained=retrained)
            m = report["metrics"]
            rows.append({"scenario": scenario, "method": label, **m, "gap": report["avg_gap"],
                         "time_s": report["time_total_s"]})
            print(f"{scenario:<8} {label:<28} {m['UA']:6.3f} {m['RA']:6.3f} {m['TA']:6.3f} {m['MIA']:6.3f} "
                  f"{report['avg_gap']:6.3f} {report['time_total_s']:7.2f}")
    print(f"\nDone in {time.perf_counter() - started:.1f} s (models cached in the erasus cache folder; "
          "ERASUS_CACHE overrides it).")
    return rows


def unlearn_from_config(path: str) -> dict:
    import yaml

    from erasus.unlearner import ErasusUnlearner

    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise InvalidInputError(f"{path}: the config must be a mapping of keys to values")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise InvalidInputError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    seed = int(config.get("seed", 0))
    forget, retain, test, original, retrained = scenario_data(
        config.get("scenario", "class"), seed, int(config.get("forget_class", 3)),
        float(config.get("forget_fraction", 0.1)))
    unlearner = ErasusUnlearner(original, strategy=config.get("strategy", "npo"),
                                selector=config.get("selector", "kcenter"),
                                prune_ratio=float(config.get("prune_ratio", 0.2)),
                                strategy_params=config.get("strategy_params"),
                                selector_params=config.get("selector_params"), epochs=int(config.get("epochs", 5)),
                                batch_size=int(config.get("batch_size", 32)), copy=True, seed=seed,
                                out_dir=config.get("out_dir", "erasus-run"), progress=True)
    _, report = unlearner.fit(forget, retain, test=test, retrained=retrained)
    from erasus.report import markdown

    print(markdown(report))
    print(f"Report written to {unlearner.out_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erasus", description="Machine unlearning with coreset-driven forgetting.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="forget a class and a random 10%% of digits; print a table vs retrain")
    p_demo.add_argument("--out-dir", default=None, help="also write each run's report here")
    p_run = sub.add_parser("unlearn", help="run one strategy x selector x scenario from a YAML config")
    p_run.add_argument("--config", required=True, help="YAML file (see README)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        if args.command == "demo":
            demo(args.out_dir)
        else:
            unlearn_from_config(args.config)
    except ErasusError as exc:
        print(f"erasus: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
