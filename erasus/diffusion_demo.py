"""The embedded diffusion default: a tiny diffusers UNet2DConditionModel learns to draw the bundled digits from
the concepts "zero" .. "nine" (a learned concept encoder read through cross-attention); ESD-x, ESD-u and UCE
erase one digit, and a classifier trained on the real digits reads what each model draws. Offline, a few
minutes on 2 cores the first time (models then cached)."""
from __future__ import annotations

import time
from pathlib import Path

#: label, strategy, params, epochs. Tuned on diffusion_scenario("three", seed=0) (tests/diffusion/test_diffusion.py):
#: ESD-u moves every UNet weight but cross-attention, so it needs the preservation term to keep the other digits
#: (without it, lr 1e-3: kept-digit accuracy 0.98 -> 0.60; retain_weight 5: 0.96, erased 0.80 -> 0.10).
DIFFUSION_METHODS = [
    ("ESD-x", "esd", {"variant": "esd-x", "lr": 1e-3}, 2),
    ("ESD-u", "esd", {"variant": "esd-u", "lr": 7e-4, "retain_weight": 5.0}, 2),
    ("UCE", "uce", {}, 1),
]
#: the run settings shared by the demo and the tests (a forget batch of 16: 10 batches per epoch for one digit)
RUN = {"selector": None, "batch_size": 16, "task": "diffusion", "copy": True}
COLUMNS = [("forget_gen_acc", "erased acc"), ("retain_gen_acc", "kept acc"), ("fd_retain", "FD kept"),
           ("forget_mse", "fMSE")]


def _row(label: str, metrics: dict, seconds: float | None) -> str:
    cells = " ".join(f"{metrics[k]:>10.3f}" if k in metrics else f"{'-':>10}" for k, _ in COLUMNS)
    return f"{label:<18} {cells} {seconds if seconds is not None else float('nan'):>7.1f}"


def diffusion_demo(out_dir: str | Path | None = None, forget: str = "three", seed: int = 0, preset: str = "demo",
                   retrained: bool = False) -> list[dict]:
    """Train (or load) the tiny concept diffusion model and its evaluation classifier, erase ``forget`` with
    ESD-x, ESD-u and UCE (each on a copy), and print one row per model: the classifier's accuracy on images
    generated for the erased digit (↓) and for the kept digits (↑), the Fréchet distance of the kept digits'
    images to the real ones in the classifier's features (↓), the forget noise MSE and the time. ``retrained``
    adds the gold standard, a model trained without the digit (one more training run). Saves ``samples.png``
    (two samples per digit, the same starting noise in every row) and each run's report into ``out_dir``
    (default ``./erasus-diffusion-demo``). Runs torch on one intra-op thread (restored afterwards). Returns the
    rows."""
    import torch

    threads = torch.get_num_threads()
    # The model is tiny (200k parameters, 8x8 images): a second intra-op thread saves nothing, and when other
    # processes share the cores, OpenMP threads waiting on each other slow every step down several times.
    torch.set_num_threads(1)
    try:
        return _demo(out_dir, forget, seed, preset, retrained)
    finally:
        torch.set_num_threads(threads)


def _demo(out_dir, forget, seed, preset, retrained):
    import erasus.strategies.diffusion  # noqa: F401  registers "esd" and "uce"
    from erasus.data.diffusion_data import CONCEPTS, diffusion_scenario, sample_images
    from erasus.unlearner import ErasusUnlearner

    out = Path(out_dir if out_dir is not None else "erasus-diffusion-demo")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    s = diffusion_scenario(forget, seed=seed, preset=preset, retrained=retrained)
    print(f"Erasus diffusion demo: a tiny UNet2DConditionModel drawing 8x8 digits from the concepts 'zero'..'nine'; "
          f"erase {forget!r} ({len(s['forget'])} training images; {len(s['retain'])} kept); models ready in "
          f"{time.perf_counter() - started:.1f} s")
    print("erased / kept acc: the real-digit classifier's accuracy on generated images; FD kept: Fréchet distance "
          "of the kept digits' images to real ones in its features; fMSE: noise MSE on the forget images\n")
    header = f"{'model':<18} " + " ".join(f"{short:>10}" for _, short in COLUMNS) + f" {'time s':>7}"
    print(header)
    print("-" * len(header))
    rows, grids = [], {}

    def samples(model):
        return sample_images(model, list(range(len(CONCEPTS))), 2, steps=10, guidance=2.0, seed=seed + 7)[0]

    grids["original"] = samples(s["original"])
    for i, (label, name, params, epochs) in enumerate(DIFFUSION_METHODS):
        unlearner = ErasusUnlearner(s["original"], strategy=name, strategy_params=params, epochs=epochs, seed=seed,
                                    out_dir=out / label.lower(), overwrite=True, **RUN)
        t0 = time.perf_counter()
        model, report = unlearner.fit(s["forget"], s["retain"], test=s["test"], retrained=s.get("retrained"))
        seconds = time.perf_counter() - t0
        if i == 0:
            print(_row("original", report["original"], None))
            rows.append({"method": "original", **report["original"]})
            if "retrained" in report:
                print(_row("retrained (gold)", report["retrained"], None))
                rows.append({"method": "retrained (gold)", **report["retrained"]})
        print(_row(label, report["metrics"], seconds), flush=True)
        rows.append({"method": label, **report["metrics"], "time_s": seconds, "stopped": report["guard"]["stopped"]})
        grids[label] = samples(model)
    path = save_sample_grid(grids, out / "samples.png", CONCEPTS)
    print(f"\nSamples before/after: {path}. Done in {time.perf_counter() - started:.1f} s (models cached in the "
          "erasus cache folder; ERASUS_CACHE overrides it).")
    return rows


def save_sample_grid(grids: dict, path: Path, concepts) -> Path:
    """One row of images per model (``grids``: label -> (10 * k, 1, H, W) images in [-1, 1], k per concept in
    concept order), one column per image, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = len(next(iter(grids.values())))
    per_concept = per_row // len(concepts)
    fig, axes = plt.subplots(len(grids), per_row, figsize=(per_row * 0.55, len(grids) * 0.75), squeeze=False)
    for r, (label, images) in enumerate(grids.items()):
        for c in range(per_row):
            ax = axes[r][c]
            ax.imshow(images[c, 0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and c % per_concept == 0:
                ax.set_title(concepts[c // per_concept], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
