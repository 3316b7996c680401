"""Report plots draw a series only where it was logged and count epochs in whole numbers."""
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from erasus.report import break_at_gaps, curve_figures, plot_curves  # noqa: E402
from erasus.strategies import STRATEGIES  # noqa: E402
from erasus.tasks import Classification  # noqa: E402


def scrub_logged_steps(epochs=3, max_steps=2):
    """The steps SCRUB reports through ``on_step``: its forget-side max-steps only, numbered among all its
    optimizer steps (the retain-side min-steps in between are not reported)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    forget = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), batch_size=4)
    retain = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=4)
    logged = []
    STRATEGIES["scrub"](max_steps=max_steps).unlearn(model, forget, retain, epochs=epochs, task=Classification(),
                                                     on_step=lambda info: logged.append((info["step"], info["loss"])))
    return [s for s, _ in logged], [v for _, v in logged]


def history(steps, losses, epochs=(1, 2, 3)):
    """A report's ``curves`` as ErasusUnlearner fills them (loss per logged step, metrics per epoch)."""
    return {"curves": {"step": steps, "loss": losses, "epoch": list(epochs), "forget": [0.9, 0.5, 0.2][:len(epochs)],
                       "retain": [0.95, 0.93, 0.92][:len(epochs)], "label": "accuracy"}, "early_stop": None}


@pytest.fixture
def figures():
    opened = []
    yield opened
    for fig in opened:
        plt.close(fig)


def drawn_segments(line):
    """Pairs of consecutive points that the line actually joins (both finite)."""
    xs, ys = (list(map(float, v)) for v in line.get_data())
    return [(xs[i], xs[i + 1]) for i in range(len(xs) - 1) if math.isfinite(ys[i]) and math.isfinite(ys[i + 1])]


def test_scrub_logs_loss_at_some_steps_only():
    steps, _ = scrub_logged_steps()
    # 3 forget batches per epoch, 4 retain batches after them, forget passes in the first 2 epochs only
    assert steps == [1, 2, 3, 8, 9, 10]


def test_loss_line_breaks_across_unlogged_steps(figures):
    steps, losses = scrub_logged_steps()
    figures.extend(curve_figures(history(steps, losses)).values())
    ax = figures[0].axes[0]
    (line,) = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    xs, ys = line.get_data()
    assert [float(x) for x, y in zip(xs, ys) if math.isfinite(y)] == steps  # every logged point, in order
    gap = list(xs).index(4)  # the first unlogged step carries a NaN: the line stops at 3, starts again at 8
    assert math.isnan(ys[gap]) and xs[gap - 1] == 3 and xs[gap + 1] == 8
    assert all(b - a == 1 for a, b in drawn_segments(line)), "a segment spans steps that were never logged"
    assert line.get_marker() not in (None, "None", "", " ")  # a lone logged step stays visible
    assert "logged" in line.get_label()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label()]


def test_contiguous_loss_is_one_unbroken_line(figures):
    steps = list(range(1, 9))
    figures.extend(curve_figures(history(steps, [1.0 / s for s in steps])).values())
    (line,) = figures[0].axes[0].get_lines()
    assert not any(math.isnan(y) for y in line.get_data()[1]) and line.get_label()


def test_break_at_gaps_marks_each_gap():
    xs, ys, gaps = break_at_gaps([1, 2, 5, 6, 9], [1.0, 2.0, 5.0, 6.0, 9.0])
    assert gaps == 2 and xs == [1, 2, 3, 5, 6, 7, 9]
    assert [math.isnan(y) for y in ys] == [False, False, True, False, False, True, False]


@pytest.mark.parametrize("epochs", [(1, 2, 3), (1, 2), (1,), (0.5, 1.0, 1.5)])
def test_epoch_axis_ticks_are_whole_epochs(figures, epochs):
    figs = curve_figures(history([1, 2, 3], [0.1, 0.2, 0.3], epochs=epochs))
    figures.extend(figs.values())
    for name in ("accuracy.png", "loss.png"):
        fig = figs[name]
        fig.canvas.draw()  # tick labels are filled in at draw time
        ax = fig.axes[0]
        low, high = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert shown and all(float(t).is_integer() for t in shown), (name, shown)
        labels = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(label.lstrip("-").isdigit() for label in labels), (name, labels)


def test_plot_curves_writes_both_pngs(tmp_path):
    steps, losses = [1, 2, 3, 8, 9, 10], [0.0, -0.1, -0.2, -0.3, -0.4, -0.5]
    open_before = set(plt.get_fignums())
    plot_curves(history(steps, losses), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "loss.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in tmp_path.iterdir())
    assert set(plt.get_fignums()) == open_before  # nothing left open
