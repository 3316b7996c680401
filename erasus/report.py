"""Run reports: JSON (everything), Markdown (the table a person reads) and PNG plots, in one folder."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out_dir) -> Path:
    """Write report.json, report.md, loss.png and accuracy.png into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    plot_curves(report, out)
    return out


def markdown(report: dict) -> str:
    rows = [("unlearned", report["metrics"]), ("original", report["original"])]
    if "retrained" in report:
        rows.append(("retrained", report["retrained"]))
    keys = [k for k in ("UA", "UA_unselected", "RA", "TA", "MIA") if k in report["metrics"]]
    lines = [f"# Unlearning run: {report['strategy']}", "",
             f"Selector {report['selector']}, coreset {report['coreset_size']} of {report['forget_size']} forget "
             f"samples (prune_ratio {report['prune_ratio']}), {report['epochs']} epochs, seed {report['seed']}; "
             f"forget-side sample passes {report['forget_sample_passes']}; time {report['time_total_s']:.2f} s "
             f"(select {report['time_select_s']:.2f} s, unlearn {report['time_unlearn_s']:.2f} s).", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in keys) + " |")
    if "avg_gap" in report:
        lines += ["", f"Average gap to the retrained model (UA, RA, TA, MIA): {report['avg_gap']:.4f}"]
    guard = report["guard"]
    if guard["stopped"]:
        lines += ["", f"**Stopped by the guard:** {guard['stopped']}; the model was restored to its state at step "
                      f"{guard['events'][-1]['restored_to_step']}."]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["curves"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(curves["step"], curves["loss"])
    ax.set(xlabel="step", ylabel="loss", title="unlearning loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(curves["epoch"], curves["forget_acc"], marker="o", label="forget accuracy")
    ax.plot(curves["epoch"], curves["retain_acc"], marker="o", label="retain accuracy")
    if "retrained" in report:
        ax.axhline(1 - report["retrained"]["UA"], ls="--", c="C0", lw=0.8, label="retrained, forget")
        ax.axhline(report["retrained"]["RA"], ls="--", c="C1", lw=0.8, label="retrained, retain")
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(-0.02, 1.02), title="forget vs retain accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


def pareto_plot(runs: list[dict], path, x: str = "gap_UA", y: str = "RA", color: str = "selector",
                marker: str = "scenario", title: str = "utility vs forgetting") -> None:
    """One point per run (e.g. |UA - UA_retrained| against RA), coloured by ``color`` and shaped by ``marker``
    (keys of each run), with the non-dominated front (low x, high y) drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r[color] for r in runs))}
    markers = {v: m for v, m in zip(dict.fromkeys(r[marker] for r in runs), "o^sDv*")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in runs:
        ax.scatter(run[x], run[y], s=22, c=colours[run[color]], marker=markers[run[marker]], alpha=0.75)
    front, best = [], -float("inf")
    for run in sorted(runs, key=lambda r: (r[x], -r[y])):
        if run[y] > best:
            front.append(run)
            best = run[y]
    ax.plot([r[x] for r in front], [r[y] for r in front], c="k", lw=0.8, label="non-dominated front")
    for v, c in colours.items():
        ax.scatter([], [], c=c, label=f"{color}: {v}")
    for v, m in markers.items():
        ax.scatter([], [], c="grey", marker=m, label=f"{marker}: {v}")
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
