"""Run reports: JSON (everything), Markdown (the table a person reads) and PNG plots, in one folder."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out_dir) -> Path:
    """Write report.json, report.md, loss.png and accuracy.png into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "report.md", markdown(report))
    plot_curves(report, out)
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it: a reader never sees half a file."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    rows = [("unlearned", report["metrics"]), ("original", report["original"])]
    if "retrained" in report:
        rows.append(("retrained", report["retrained"]))
    keys = list(report["metrics"])
    params = ", ".join(f"{k}={v}" for k, v in (report.get("strategy_params") or {}).items())
    if report["selector"] is None:
        data = f"the full forget set ({report['forget_size']} samples)"
    else:
        data = (f"a {report['selector']} coreset of {report['coreset_size']} of {report['forget_size']} forget "
                f"samples (prune_ratio {report['prune_ratio']})")
    schedule = "one training-free pass" if report.get("training_free") else \
        f"{report['epochs']} epochs ({report.get('steps', 0)} steps)"
    lora = report.get("lora")
    facts = report.get("scenario") or {}
    scenario = ("Scenario: " + ", ".join(f"{k} {v}" for k, v in facts.items()) + "; " if facts else "") + \
        (f"forget {report['forget_size']} of {report['forget_size'] + report['retain_size']} training samples "
         f"({100 * report['forget_fraction']:.1f}%)." if "forget_fraction" in report else "")
    lines = [f"# Unlearning run: {report['strategy']} ({report.get('task', 'classification')})", "", scenario, "",
             f"Strategy {report['strategy']}({params}) on {data}, {schedule}, seed {report['seed']}; "
             + (f"LoRA adapter r={lora['r']} on {lora['target_modules']} ({lora['trainable_params']} trainable of "
                f"{lora['total_params']} parameters); " if lora else "")
             + f"forget-side sample passes {report['forget_sample_passes']}; time {report['time_total_s']:.2f} s "
             f"(select {report['time_select_s']:.2f} s, unlearn {report['time_unlearn_s']:.2f} s).", "",
             "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in keys) + " |")
    if "avg_gap" in report:
        lines += ["", f"Average gap to the retrained model: {report['avg_gap']:.4f}"]
    stop = report.get("early_stop")
    if stop and stop.get("target"):
        lines += ["", f"Target: {stop['target']['source']}, forget {report['curves']['label']} "
                      f"{stop['target']['value']:.4f}; " + (f"reached at epoch {stop['at_epoch']:.2f} "
                                                           f"(step {stop['at_step']})." if stop["reached"]
                                                           else "not reached.")]
    verdict = report.get("verdict")
    if verdict and verdict.get("target"):
        label = report["curves"]["label"]
        lines += ["", f"**Verdict:** the whole forget set {'reached' if verdict['reached'] else 'did NOT reach'} "
                      f"the target ({verdict['target']['source']}, forget {label} {verdict['target']['value']:.4f}): "
                      f"{verdict['original_forget']:.4f} before, {verdict['final_forget']:.4f} after, "
                      f"{100 * verdict['progress']:.0f}% of the way."]
    elif verdict:
        lines += ["", f"**Verdict:** none: {verdict['note']}."]
    adaptive = report.get("adaptive")
    if adaptive:
        lines += ["", f"Verified adaptive coreset: {'verified' if adaptive['verified'] else 'NOT verified'} after "
                      f"{len(adaptive['rounds'])} rounds; {adaptive['forget_sample_passes']} forget-side backward "
                      f"sample passes, {adaptive['forward_scoring_passes']} forward scoring passes.", "",
                  "| round | coreset | forget | still remembered | backward passes so far |", "|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['coreset_size']} | {r['forget']:.4f} | {r['remembered']} | "
                  f"{r['forget_sample_passes']} |" for r in adaptive["rounds"]]
    guard = report["guard"]
    if guard["stopped"]:
        lines += ["", f"**Stopped by the guard:** {guard['stopped']}; the model was restored to its state at step "
                      f"{guard['events'][-1]['restored_to_step']}."]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, out: Path) -> None:
    """Write loss.png (if any loss was logged) and accuracy.png (if any epoch was evaluated) into ``out``."""
    import os

    plt = _pyplot()
    figures = curve_figures(report)
    try:
        for name, fig in figures.items():
            tmp = out / (name + ".tmp")  # renamed into place, as atomic_write_text does
            fig.savefig(tmp, dpi=110, format="png")
            os.replace(tmp, out / name)
    finally:
        for fig in figures.values():
            plt.close(fig)


def curve_figures(report: dict) -> dict:
    """The report's plots as open matplotlib figures, keyed by file name ("loss.png", "accuracy.png"); a plot
    with nothing to draw is left out. The caller closes them (``plt.close``)."""
    figures = {}
    curves = report["curves"]
    if curves["step"]:
        figures["loss.png"] = loss_figure(curves["step"], curves["loss"])
    if curves["epoch"]:
        figures["accuracy.png"] = metric_figure(report)
    return figures


def loss_figure(steps: list, losses: list):
    """Loss against optimizer step, drawn only where it was logged: a strategy may log some steps only (SCRUB
    logs its forget-side max-steps, not the retain-side min-steps between them), and a line straight across
    the unlogged steps would show values that were never measured."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    x, y, gaps = break_at_gaps(steps, losses)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    # markers keep a run of one logged step visible once the line is broken around it
    ax.plot(x, y, marker="." if gaps else None, ms=3,
            label="loss at logged steps (breaks: steps not logged)" if gaps else "loss at every step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlabel="step", ylabel="loss", title="unlearning loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def break_at_gaps(steps: list, values: list) -> tuple[list, list, int]:
    """``steps`` and ``values`` with a NaN value at the first missing step wherever consecutive logged steps
    are more than one apart, so matplotlib breaks the line there; also returns the number of gaps."""
    xs, ys, gaps = [], [], 0
    for i, (step, value) in enumerate(zip(steps, values)):
        if i and step - steps[i - 1] > 1:
            xs.append(steps[i - 1] + 1)
            ys.append(float("nan"))
            gaps += 1
        xs.append(step)
        ys.append(value)
    return xs, ys, gaps


def metric_figure(report: dict):
    """Forget and retain metric (accuracy, or the task's curve label) at each evaluated epoch."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    curves = report["curves"]
    label = curves.get("label", "accuracy")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(curves["epoch"], curves["forget"], marker="o", label=f"forget {label}")
    ax.plot(curves["epoch"], curves["retain"], marker="o", label=f"retain {label}")
    stop = report.get("early_stop")
    if stop and stop.get("target"):
        ax.axhline(stop["target"]["value"], ls="--", c="C0", lw=0.8, label=f"target ({stop['target']['source']})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are counted: no 1.5 tick
    ax.set(xlabel="epoch", ylabel=label, title=f"forget vs retain {label}")
    if label == "accuracy":
        ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _pyplot():
    """matplotlib.pyplot on the Agg backend: reports are written without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(runs: list[dict], path, x: str = "gap_UA", y: str = "RA", color: str = "selector",
                marker: str = "scenario", title: str = "utility vs forgetting") -> None:
    """One point per run (e.g. |UA - UA_retrained| against RA), coloured by ``color`` and shaped by ``marker``
    (keys of each run), with the non-dominated front (low x, high y) drawn as a line."""
    plt = _pyplot()
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
