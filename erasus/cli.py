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
               "selector_params", "prune_ratio", "epochs", "batch_size", "seed", "out_dir", "task"}
LM_CONFIG_KEYS = {"task", "arch", "model", "retrained", "data", "forget_fraction", "strategy", "strategy_params",
                  "selector", "selector_params", "prune_ratio", "epochs", "batch_size", "seed", "out_dir", "lora",
                  "save_merged", "stop_at_target", "max_length"}


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


def _typed(config: dict, key: str, kind: type, default):
    """``config[key]`` as an int or a float (``default`` when absent), or an error naming the key."""
    value = config.get(key, default)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"config key {key!r} must be {'an integer' if kind is int else 'a number'}, "
                                f"got {value!r}") from None


def _check_out_dir(config: dict) -> None:
    if "out_dir" in config and (not isinstance(config["out_dir"], str) or not config["out_dir"].strip()):
        raise InvalidInputError(f"config key 'out_dir' must name a folder, got {config['out_dir']!r}")


def _numbers(params):
    """YAML reads ``1e-3`` as a string: turn number-like strings in a parameter mapping into numbers."""
    if not isinstance(params, dict):
        return params
    return {k: _number(v) if isinstance(v, str) else v for k, v in params.items()}


def _number(text: str):
    """``text`` as an int or a float when it spells one, else unchanged."""
    if text.strip().lstrip("+-").isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def unlearn_from_config(path: str, overwrite: bool = False) -> dict:
    import yaml

    from erasus.unlearner import ErasusUnlearner

    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise InvalidInputError(f"{path}: the config must be a mapping of keys to values")
    _check_out_dir(config)
    if config.get("task") in ("causal_lm", "lm"):
        return unlearn_lm_from_config(path, config, overwrite)
    if config.get("task", "classification") != "classification":
        raise InvalidInputError(f"{path}: task must be 'classification' or 'causal_lm', got {config['task']!r}")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise InvalidInputError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    seed = _typed(config, "seed", int, 0)
    forget, retain, test, original, retrained = scenario_data(
        config.get("scenario", "class"), seed, _typed(config, "forget_class", int, 3),
        _typed(config, "forget_fraction", float, 0.1))
    unlearner = ErasusUnlearner(original, strategy=config.get("strategy", "npo"),
                                selector=config.get("selector", "kcenter"),
                                prune_ratio=_typed(config, "prune_ratio", float, 0.2),
                                strategy_params=_numbers(config.get("strategy_params")),
                                selector_params=_numbers(config.get("selector_params")), epochs=_typed(config, "epochs", int, 5),
                                batch_size=_typed(config, "batch_size", int, 32), copy=True, seed=seed,
                                out_dir=config.get("out_dir", "erasus-run"), progress=True, overwrite=overwrite)
    _, report = unlearner.fit(forget, retain, test=test, retrained=retrained)
    from erasus.report import markdown

    print(markdown(report))
    print(f"Report written to {unlearner.out_dir}")
    return report


def unlearn_lm_from_config(path: str, config: dict, overwrite: bool = False) -> dict:
    """A causal-LM run: a local model folder (``model:``, loaded offline with its tokenizer) or the embedded
    tiny scenario (``arch:``), on QA data from JSON-lines files (``data: {forget:, retain:, holdout:}``, records
    with "question" and "answer") or the generated TOFU-style corpus (``forget_fraction``)."""
    from erasus.data.text import QADataset
    from erasus.report import markdown
    from erasus.unlearner import ErasusUnlearner

    unknown = set(config) - LM_CONFIG_KEYS
    if unknown:
        raise InvalidInputError(f"{path}: unknown keys {sorted(unknown)}; known for task causal_lm: "
                                f"{sorted(LM_CONFIG_KEYS)}")
    seed = _typed(config, "seed", int, 0)
    if config.get("model") is not None:
        from erasus.tasks.loading import load_causal_lm

        model, tokenizer = load_causal_lm(config["model"])
        retrained = load_causal_lm(config["retrained"])[0] if config.get("retrained") else None
        if not config.get("data"):
            raise InvalidInputError(f"{path}: a local model needs data: {{forget: ..., retain: ..., holdout: ...}} "
                                    "(JSON-lines files of question/answer records)")
    else:
        from erasus.data.lm_models import lm_scenario

        scenario = lm_scenario(config.get("arch", "gpt2"), _typed(config, "forget_fraction", float, 0.1), seed=seed)
        model, tokenizer, retrained = scenario["original"], scenario["tokenizer"], scenario["retrained"]
    context = getattr(model.config, "max_position_embeddings", None)
    max_length = config.get("max_length", context)
    if config.get("data"):
        data = config["data"]
        if not isinstance(data, dict) or not {"forget", "retain"} <= set(data):
            raise InvalidInputError(f"{path}: data must map forget, retain (and optionally holdout) to files")
        sets = {k: QADataset(_read_jsonl(v, k), tokenizer, max_length=max_length) for k, v in data.items()
                if k in ("forget", "retain", "holdout")}
    else:
        sets = {k: scenario[k] for k in ("forget", "retain", "holdout")}
    unlearner = ErasusUnlearner(model, strategy=config.get("strategy", "npo"), selector=config.get("selector"),
                                prune_ratio=_typed(config, "prune_ratio", float, 1.0),
                                strategy_params=_numbers(config.get("strategy_params")),
                                selector_params=_numbers(config.get("selector_params")), epochs=_typed(config, "epochs", int, 5),
                                batch_size=_typed(config, "batch_size", int, 8), copy=True, seed=seed,
                                out_dir=config.get("out_dir", "erasus-run"), progress=True, task="causal_lm",
                                lora=config.get("lora"), save_merged=bool(config.get("save_merged", False)),
                                stop_at_target=bool(config.get("stop_at_target", False)), overwrite=overwrite)
    _, report = unlearner.fit(sets["forget"], sets["retain"], test=sets.get("holdout"), retrained=retrained)
    print(markdown(report))
    print(f"Report written to {unlearner.out_dir}")
    return report


def _read_jsonl(path, name: str) -> list[dict]:
    """Records from a JSON-lines file (one JSON object per line, blank lines skipped)."""
    import json

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidInputError(f"data.{name}: cannot read {path!r}: {exc}") from exc
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"data.{name}: {path}:{number} is not JSON: {exc}") from exc
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erasus", description="Machine unlearning with coreset-driven forgetting.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="forget a class and a random 10%% of digits; print a table vs retrain")
    p_demo.add_argument("--out-dir", default=None, help="also write each run's report here")
    p_demo.add_argument("--task", choices=("classification", "lm"), default="classification",
                        help="classification: digits MLP (default); lm: tiny causal LM on fictitious authors")
    p_demo.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2", help="the LM demo's architecture")
    p_run = sub.add_parser(
        "unlearn", help="run one strategy x selector x scenario from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (classification, the digits scenarios): " + ", ".join(sorted(CONFIG_KEYS))
        + "\nconfig keys (task: causal_lm): " + ", ".join(sorted(LM_CONFIG_KEYS))
        + "\nnumbers written as strings in YAML (lr: 1e-3) are read as numbers; see README for each key")
    p_run.add_argument("--config", required=True, help="YAML file (see README)")
    p_run.add_argument("--overwrite", action="store_true", help="replace a previous run in out_dir")
    args = parser.parse_args(argv)
    if args.command == "unlearn" and not Path(args.config).is_file():
        print(f"erasus: error: config file {args.config!r} not found", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        if args.command == "demo" and args.task == "lm":
            from erasus.lm_demo import lm_demo

            lm_demo(args.out_dir, arch=args.arch)
        elif args.command == "demo":
            demo(args.out_dir)
        else:
            unlearn_from_config(args.config, overwrite=args.overwrite)
    except ErasusError as exc:
        print(f"erasus: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
