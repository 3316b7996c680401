"""The embedded CLIP default: a tiny CLIPModel (built from a config) learns image–caption pairs of scikit-learn's
digits; each method makes it forget one digit as a concept (its images, its captions and its zero-shot prompt)
while the other nine stay, against a CLIP retrained without that digit. Offline, a few minutes on 2 cores.

``clip_demo()`` prints one row per run: the two CLIP strategies (``erasus.strategies.clip``), the generic ones
that unlearn through the task's zero-shot logits, and a k-center coreset in the joint embedding space.
"""
from __future__ import annotations

import time
from pathlib import Path

#: label, strategy, params, coreset selector. Measured on clip_scenario(3, 0, preset="test") (tests/clip): every
#: run takes the forget digit's zero-shot accuracy to 0; they differ in what they cost the rest.
CLIP_METHODS = [
    ("modality decoupling", "modality_decoupling", {"lr": 1e-3}, None),
    ("contrastive unlearning", "contrastive_unlearning", {"lr": 5e-4}, None),
    ("GA + output anchor", "ga", {"lr": 1e-3, "anchor": "outputs", "anchor_weight": 5.0}, None),
    ("GradDiff", "graddiff", {"lr": 1e-3, "retain_weight": 5.0}, None),
    ("NPO", "npo", {"lr": 1e-3, "retain_weight": 5.0}, None),
    ("modality decoupling, k-center 25%", "modality_decoupling", {"lr": 1e-3}, "kcenter"),
]
#: the run settings shared by the demo and the tests
RUN = {"epochs": 2, "batch_size": 16, "retain_batch_size": 32}
COLUMNS = [("forget_zs_acc", "fZS"), ("retain_zs_acc", "rZS"), ("test_forget_concept_zs_acc", "tfZS"),
           ("test_retain_concept_zs_acc", "trZS"), ("forget_t2i_r1", "fT2I@1"), ("retain_i2t_r1", "rI2T@1"),
           ("retain_image_drift", "imgDrift"), ("retain_text_drift", "txtDrift")]


def _row(label: str, m: dict, seconds: float | None, gap: float | None) -> str:
    cells = " ".join(f"{m[k]:8.3f}" if k in m else f"{'-':>8}" for k, _ in COLUMNS)
    gap_cell = f"{gap:7.3f}" if gap is not None else f"{'-':>7}"
    return f"{label:<36} {cells} {gap_cell} {seconds if seconds is not None else float('nan'):7.1f}"


def clip_demo(out_dir: str | None = None, forget_digit: int = 3, seed: int = 0, preset: str = "demo") -> list[dict]:
    """Train (or load from the cache) the original and retrained tiny CLIPs, run every method of
    ``CLIP_METHODS`` through ``ErasusUnlearner(task=CLIPTask(original=...))`` on a copy of the original, and
    print the table: zero-shot accuracy on the forget pairs, the retain pairs and the test images of the forgotten
    and kept digits, text→image recall@1 of the forget captions, image→text recall@1 of the retain pairs, the
    drift of the retain image and text embeddings from the original's, the average gap to the retrained model
    and the time. ``out_dir`` gets each run's report and weights, and ``predictions.png``: two test images per
    digit titled with each model's zero-shot prediction (default folder ``./erasus-clip-demo``). Returns the
    rows. The original is not changed.
    """
    from erasus.data.clip_data import clip_scenario
    import erasus.strategies.clip  # noqa: F401  (registers the CLIP strategies)
    from erasus.selectors import KCenterSelector
    from erasus.tasks.clip import CLIPTask
    from erasus.unlearner import ErasusUnlearner

    started = time.perf_counter()
    s = clip_scenario(forget_digit, seed, preset=preset)
    digit = s["concepts"][forget_digit]
    print(f"Erasus CLIP demo: tiny CLIP on {len(s['train'])} digit image-caption pairs; forget the concept "
          f"{digit!r} ({len(s['forget'])} pairs), keep {len(s['retain'])}, test {len(s['test'])}; scenario ready in "
          f"{time.perf_counter() - started:.1f} s")
    print("fZS / rZS zero-shot accuracy on forget / retain pairs, tfZS / trZS on test images of the forgotten / kept "
          "digits, fT2I@1 text->image R@1 of forget captions, rI2T@1 image->text R@1 of retain pairs, drift = "
          "1 - cos to the original's retain embeddings, gap = mean |metric - retrained|\n")
    header = (f"{'method':<36} " + " ".join(f"{short:>8}" for _, short in COLUMNS) + f" {'gap':>7} {'time s':>7}")
    print(header)
    print("-" * len(header))
    task = CLIPTask(original=s["original"])
    shown = _two_per_digit(s["test"])
    predictions = {"original": task.embed(s["original"], shown, captions=False)["zs_pred"]}
    rows = []
    for i, (label, name, params, selector) in enumerate(CLIP_METHODS):
        run_dir = Path(out_dir) / (name + (f"-{selector}" if selector else "")) if out_dir else None
        chosen = KCenterSelector(embed=task.joint_embedder(s["original"])) if selector == "kcenter" else None
        unlearner = ErasusUnlearner(s["original"], strategy=name, selector=chosen, prune_ratio=0.25 if chosen else 1.0,
                                    strategy_params=params, copy=True, seed=seed, out_dir=run_dir, task=task, **RUN)
        t0 = time.perf_counter()
        model, report = unlearner.fit(s["forget"], s["retain"], test=s["test"], retrained=s["retrained"])
        seconds = time.perf_counter() - t0
        predictions[label] = task.embed(model, shown, captions=False)["zs_pred"]
        if i == 0:
            for ref_label, key in (("original", "original"), ("retrained (gold)", "retrained")):
                print(_row(ref_label, report[key], None, None))
                rows.append({"method": ref_label, **report[key]})
        print(_row(label, report["metrics"], seconds, report["avg_gap"]), flush=True)
        rows.append({"method": label, **report["metrics"], "avg_gap": report["avg_gap"], "time_s": seconds,
                     "stopped": report["guard"]["stopped"]})
    out = Path(out_dir) if out_dir else Path("erasus-clip-demo")
    out.mkdir(parents=True, exist_ok=True)
    path = save_prediction_grid(shown, predictions, s["concepts"], out / "predictions.png")
    print(f"\nZero-shot predictions before/after: {path}. Done in {time.perf_counter() - started:.1f} s (models "
          "cached in the erasus cache folder; ERASUS_CACHE overrides it).")
    return rows


def _two_per_digit(test):
    """Two test images of every digit, in digit order (the same images in every row of the grid)."""
    labels = test.labels.tolist()
    rows = [i for digit in sorted(set(labels)) for i in [j for j, y in enumerate(labels) if y == digit][:2]]
    return test.subset(rows)


def save_prediction_grid(shown, predictions: dict, concepts, path: Path) -> Path:
    """One row per model, one column per test image: the image, titled with the concept the model's zero-shot
    head gives it (red when wrong). Saved as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = shown.pixel_values, shown.labels
    fig, axes = plt.subplots(len(predictions), len(labels), figsize=(len(labels) * 0.6, len(predictions) * 0.85),
                             squeeze=False)
    for r, (label, predicted) in enumerate(predictions.items()):
        for c in range(len(labels)):
            ax = axes[r][c]
            ax.imshow(images[c].float().mean(dim=0).numpy(), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            right = int(predicted[c]) == int(labels[c])
            ax.set_title(concepts[int(predicted[c])], fontsize=6, color="black" if right else "red")
            if c == 0:
                ax.set_ylabel(label[:22], rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
