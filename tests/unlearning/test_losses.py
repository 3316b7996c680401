"""Loss formulas against values written out by hand, the training guard's snapshots, and the Pareto plot."""
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from erasus.losses import (distill_kl, gradient_ascent_loss, npo_from_logprobs, npo_loss,  # noqa: E402
                           output_anchor_loss, per_sample_cross_entropy, simnpo_loss, weight_anchor_loss)
from erasus.report import pareto_plot  # noqa: E402
from erasus.strategies import GuardTripped, TrainingGuard  # noqa: E402

LOGITS = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
REF_LOGITS = [[0.0, 1.0, 1.0], [2.0, 0.0, -0.5]]
LABELS = [1, 2]


def log_softmax_at(z, y):
    """log p(y) = z_y - log sum_j exp z_j, in plain Python floats."""
    return z[y] - math.log(sum(math.exp(v) for v in z))


def softmax(z, temperature=1.0):
    e = [math.exp(v / temperature) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softplus(v):
    return math.log1p(math.exp(v))


def close(tensor, values, rel=1e-5):
    """float32 results against float64 hand values: a few float32 roundings (KL differences cancel)."""
    assert tensor.tolist() == pytest.approx(values, rel=rel, abs=1e-7)


def test_gradient_ascent_is_minus_the_cross_entropy():
    got = gradient_ascent_loss(torch.tensor(LOGITS), torch.tensor(LABELS))
    close(got, [log_softmax_at(z, y) for z, y in zip(LOGITS, LABELS)])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_is_two_over_beta_log_one_plus_the_likelihood_ratio_to_the_beta(beta):
    got = npo_loss(torch.tensor(LOGITS), torch.tensor(REF_LOGITS), torch.tensor(LABELS), beta=beta)
    want = []
    for z, r, y in zip(LOGITS, REF_LOGITS, LABELS):
        ratio = math.exp(log_softmax_at(z, y)) / math.exp(log_softmax_at(r, y))  # pi / pi_ref
        want.append(2 / beta * math.log(1 + ratio**beta))
    close(got, want)
    # equal to the reference: (2/beta) log 2, whatever the logits
    same = npo_loss(torch.tensor(LOGITS), torch.tensor(LOGITS), torch.tensor(LABELS), beta=beta)
    close(same, [2 / beta * math.log(2)] * 2)


def test_npo_on_sequence_log_probabilities_and_simnpo():
    logp, ref = torch.tensor([-3.0, -0.5, -10.0]), torch.tensor([-2.0, -1.5, -10.0])
    close(npo_from_logprobs(logp, ref, beta=0.5),
          [4 * math.log(1 + math.exp(0.5 * (a - b))) for a, b in zip([-3.0, -0.5, -10.0], [-2.0, -1.5, -10.0])])
    mean_logp = torch.tensor([-0.2, -1.0, -4.0])
    # -(2/beta) log sigmoid(-beta m - gamma), written with the sigmoid itself
    close(simnpo_loss(mean_logp, beta=2.5, margin=0.7),
          [-(2 / 2.5) * math.log(1 / (1 + math.exp(2.5 * m + 0.7))) for m in [-0.2, -1.0, -4.0]])
    close(simnpo_loss(mean_logp), [2 / 4.5 * softplus(4.5 * m) for m in [-0.2, -1.0, -4.0]])  # beta 4.5, no margin


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distill_kl_is_t_squared_kl_of_teacher_to_student(temperature):
    got = distill_kl(torch.tensor(LOGITS), torch.tensor(REF_LOGITS), temperature=temperature)
    want = [temperature**2 * kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(LOGITS, REF_LOGITS)]
    close(got, want)


def test_output_anchor_is_kl_of_the_original_to_the_model():
    got = output_anchor_loss(torch.tensor(LOGITS), torch.tensor(REF_LOGITS))
    close(got, [kl(softmax(r), softmax(z)) for z, r in zip(LOGITS, REF_LOGITS)])
    reversed_kl = [kl(softmax(z), softmax(r)) for z, r in zip(LOGITS, REF_LOGITS)]
    assert got.tolist() != pytest.approx(reversed_kl, rel=1e-3)  # the direction matters on these logits


def test_weight_anchor_is_the_summed_squared_distance():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0, -1.0], [3.0, 0.5]])]
    refs = [torch.tensor([0.0, 2.5]), torch.tensor([[1.0, 1.0], [3.0, 0.0]])]
    # (1)^2 + (-0.5)^2 + (-1)^2 + (-2)^2 + 0 + (0.5)^2
    assert float(weight_anchor_loss(params, refs)) == pytest.approx(1 + 0.25 + 1 + 4 + 0 + 0.25)


def test_per_sample_cross_entropy_skips_ignored_positions():
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.5, 0.5, 3.0]],
                           [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 0.0]]])
    labels = torch.tensor([[0, -1, 2], [-1, -1, -1]])
    z = logits.tolist()
    first = [-log_softmax_at(z[0][0], 0), -log_softmax_at(z[0][2], 2)]
    close(per_sample_cross_entropy(logits, labels, ignore_index=-1, reduction="sum"), [sum(first), 0.0])
    close(per_sample_cross_entropy(logits, labels, ignore_index=-1), [sum(first) / 2, 0.0])  # 0 with no token
    # causal shift: position t predicts label t + 1; labels[:, 0] is never used
    shifted = torch.tensor([[7, 1, -100], [-100, 0, 2]])
    close(per_sample_cross_entropy(logits, shifted, shift=True),
          [-log_softmax_at(z[0][0], 1), (-log_softmax_at(z[1][0], 0) - log_softmax_at(z[1][1], 2)) / 2])
    # classifier logits: an ignored sample counts for nothing
    close(per_sample_cross_entropy(logits[:, 0], torch.tensor([2, 5]), ignore_index=5),
          [-log_softmax_at(z[0][0], 2), 0.0])


# --- TrainingGuard ------------------------------------------------------------------------------------------

class Tracked(nn.Module):
    """A linear layer and a buffer, both set to the step number by the fake training loop below."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.register_buffer("seen", torch.zeros(()))

    def set_step(self, step):
        with torch.no_grad():
            self.layer.weight.fill_(float(step))
            self.layer.bias.fill_(float(step))
            self.seen.fill_(float(step))


def run_until_tripped(guard, model, bad_step, bad="loss"):
    """Steps 1, 2, ... set the model to the step number and report a finite loss, until ``bad_step``."""
    for step in range(1, bad_step + 1):
        model.set_step(step)
        loss = 1.0
        if step == bad_step and bad == "loss":
            loss = float("nan")
        if step == bad_step and bad == "weight":
            with torch.no_grad():
                model.layer.weight[0, 1] = float("inf")
        guard.check(torch.tensor(loss))
    raise AssertionError("the guard did not trip")


@pytest.mark.parametrize("bad_step, restored", [(5, 3), (7, 6), (2, 0)])
def test_guard_restores_the_last_snapshot_not_the_previous_step(bad_step, restored):
    model = Tracked()
    model.set_step(0)
    guard = TrainingGuard(model, snapshot_every=3)
    with pytest.raises(GuardTripped, match="loss is nan"):
        run_until_tripped(guard, model, bad_step)
    assert model.layer.weight.tolist() == [[float(restored)] * 2]
    assert model.layer.bias.tolist() == [float(restored)] and float(model.seen) == float(restored)
    assert guard.events == [{"step": bad_step, "reason": "loss is nan", "restored_to_step": restored}]


def test_guard_catches_a_non_finite_weight_with_a_finite_loss():
    model = Tracked()
    guard = TrainingGuard(model, snapshot_every=2)
    with pytest.raises(GuardTripped, match="a weight became NaN or infinite"):
        run_until_tripped(guard, model, 5, bad="weight")
    assert model.layer.weight.tolist() == [[4.0, 4.0]] and float(model.seen) == 4.0
    assert guard.events[0]["restored_to_step"] == 4


# --- Pareto plot --------------------------------------------------------------------------------------------

RUNS = [
    {"gap_UA": 0.10, "RA": 0.80, "selector": "kcenter", "scenario": "class"},
    {"gap_UA": 0.05, "RA": 0.70, "selector": "random", "scenario": "class"},
    {"gap_UA": 0.20, "RA": 0.90, "selector": "kcenter", "scenario": "random"},
    {"gap_UA": 0.15, "RA": 0.60, "selector": "herding", "scenario": "random"},  # dominated by (0.10, 0.80)
    {"gap_UA": 0.30, "RA": 0.85, "selector": "random", "scenario": "class"},    # dominated by (0.20, 0.90)
]


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures pareto_plot closes, kept open for inspection (and closed afterwards)."""
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plt.close(fig)


def test_pareto_plot_writes_a_png_of_exactly_the_given_points(tmp_path, kept_figures):
    path = tmp_path / "pareto.png"
    pareto_plot(RUNS, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (462, 704)  # 6.4 x 4.2 in at 110 dpi
    (fig,) = kept_figures
    ax = fig.axes[0]
    drawn = [c for c in ax.collections if len(c.get_offsets())]  # the legend's proxies hold no points
    points = sorted(tuple(map(float, c.get_offsets()[0])) for c in drawn)
    assert points == sorted((r["gap_UA"], r["RA"]) for r in RUNS)
    colour = {tuple(map(float, c.get_offsets()[0])): tuple(c.get_facecolor()[0]) for c in drawn}
    by_selector = {}
    for run in RUNS:
        by_selector.setdefault(run["selector"], set()).add(colour[(run["gap_UA"], run["RA"])])
    assert all(len(c) == 1 for c in by_selector.values())  # one colour per selector ...
    assert len(set.union(*by_selector.values())) == 3      # ... and a different one for each
    (front,) = [line for line in ax.lines if line.get_label() == "non-dominated front"]
    assert list(zip(*map(list, front.get_data()))) == [(0.05, 0.70), (0.10, 0.80), (0.20, 0.90)]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("gap_UA", "RA")


def test_pareto_plot_reads_the_keys_it_is_given(tmp_path, kept_figures):
    runs = [{"forget": r["gap_UA"], "utility": r["RA"], "method": r["selector"], "data": r["scenario"]}
            for r in RUNS[:3]]
    pareto_plot(runs, tmp_path / "p.png", x="forget", y="utility", color="method", marker="data", title="t")
    ax = kept_figures[0].axes[0]
    points = sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections if len(c.get_offsets()))
    assert points == [(0.05, 0.70), (0.10, 0.80), (0.20, 0.90)]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("forget", "utility", "t")
