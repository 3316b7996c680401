"""The CLIP family on a tiny CLIPModel trained from a config on scikit-learn's digits (offline, CPU): the task's
zero-shot outputs and metrics, the two CLIP strategies through ErasusUnlearner, coresets on joint embeddings,
the cache, and the refusals."""
import pytest
import torch

import erasus.strategies.clip  # noqa: F401  (registers modality_decoupling and contrastive_unlearning)
from erasus import ErasusUnlearner
from erasus.clip_demo import CLIP_METHODS
from erasus.clip_demo import RUN as DEMO_RUN
from erasus.data.clip_data import (DIGIT_NAMES, CaptionTokenizer, ImageCaptionDataset, clip_scenario, clip_splits,
                                   concept_prompts, tiny_clip, train_clip)
from erasus.errors import EmptyInputError, ErasusError, InvalidInputError, ShapeError
from erasus.selectors import KCenterSelector
from erasus.strategies import STRATEGIES
from erasus.tasks import TASKS
from erasus.tasks.clip import CLIPTask, contrastive_loss, retrieval_recall

CHANCE = 1 / len(DIGIT_NAMES)
# the demo's settings, measured on the "test" preset (forget digit 3, seed 0): both CLIP methods take the forget
# concept's zero-shot accuracy to 0 and keep the retain concepts' within a point
RUN = {**DEMO_RUN, "copy": True, "selector": None}
CLIP_RUNS = [(name, params) for _, name, params, selector in CLIP_METHODS
             if name in ("modality_decoupling", "contrastive_unlearning") and selector is None]


@pytest.fixture(scope="module")
def scenario():
    return clip_scenario(3, 0, preset="test", retrained=False)


@pytest.fixture(scope="module")
def original_metrics(scenario):
    return CLIPTask().evaluate(scenario["original"], scenario["forget"], scenario["retain"], test=scenario["test"])


def test_registration():
    assert TASKS["clip"] is CLIPTask
    for name in ("modality_decoupling", "contrastive_unlearning"):
        assert STRATEGIES[name].tasks == ("clip",)


def test_tiny_clip_learns_zero_shot(scenario, original_metrics):
    m = original_metrics
    assert m["forget_zs_acc"] > 0.9 and m["retain_zs_acc"] > 0.9
    assert m["test_zs_acc"] > 0.85  # images it never saw
    assert m["retain_t2i_r1"] > 0.9 and m["retain_i2t_r5"] > 0.95
    assert "retain_image_drift" not in m  # no original to drift from
    # the raw values of one model are the `original` another is measured against: itself drifts by 0
    task = CLIPTask()
    _, raw = task.evaluate_raw(scenario["original"], scenario["forget"], scenario["retain"])
    same = task.evaluate(scenario["original"], scenario["forget"], scenario["retain"], original=raw)
    assert same["retain_image_drift"] < 1e-5 and same["retain_text_drift"] < 1e-5


@pytest.mark.parametrize("strategy, params", CLIP_RUNS)
def test_clip_strategy_forgets_the_concept_and_keeps_the_rest(scenario, original_metrics, strategy, params):
    original = scenario["original"]
    before = {k: v.clone() for k, v in original.state_dict().items()}
    task = CLIPTask(original=original)
    unlearner = ErasusUnlearner(original, strategy=strategy, strategy_params=params, task=task, **RUN)
    model, report = unlearner.fit(scenario["forget"], scenario["retain"], test=scenario["test"])
    m = report["metrics"]
    assert m["forget_zs_acc"] <= CHANCE + 0.05
    assert m["test_forget_concept_zs_acc"] <= CHANCE + 0.05  # forgotten on unseen images of the concept too
    assert m["retain_zs_acc"] >= original_metrics["retain_zs_acc"] - 0.05
    assert m["test_retain_concept_zs_acc"] >= original_metrics["test_retain_concept_zs_acc"] - 0.05
    assert m["forget_t2i_r1"] < 0.5  # the concept's captions no longer find its images
    assert 0 < m["retain_image_drift"] < 0.2 and 0 < m["retain_text_drift"] < 0.2
    assert report["reference"]["kind"] == "frozen copy" and report["guard"]["stopped"] is None
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())  # copy=True


def test_lora_adapter_with_the_shared_reference(scenario, original_metrics):
    """With a LoRA adapter only the adapter trains, and the frozen original is the model with it disabled."""
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "fc1", "fc2"]}
    unlearner = ErasusUnlearner(scenario["original"], strategy="modality_decoupling", strategy_params={"lr": 5e-3},
                                task="clip", lora=lora, **RUN)
    model, report = unlearner.fit(scenario["forget"], scenario["retain"])
    assert report["reference"] == {"kind": "adapter disabled (shared weights)", "extra_bytes": 0}
    assert report["metrics"]["forget_zs_acc"] <= CHANCE + 0.05
    assert report["metrics"]["retain_zs_acc"] >= original_metrics["retain_zs_acc"] - 0.05
    assert report["lora"]["trainable_params"] < 0.2 * report["lora"]["total_params"]


def test_generic_strategy_runs_on_clip(scenario, original_metrics):
    """NPO knows nothing of CLIP: it unlearns through the task's zero-shot logits."""
    unlearner = ErasusUnlearner(scenario["original"], strategy="npo", strategy_params={"lr": 1e-3,
                                "retain_weight": 5.0}, task="clip", **{**RUN, "epochs": 1})
    _, report = unlearner.fit(scenario["forget"], scenario["retain"])
    assert report["task"] == "clip"
    assert report["metrics"]["forget_zs_acc"] < original_metrics["forget_zs_acc"] - 0.3


def test_kcenter_coreset_on_joint_embeddings(scenario):
    task, model = CLIPTask(), scenario["original"]
    features = task.features(model, scenario["forget"])
    assert features.shape == (len(scenario["forget"]), 2 * model.config.projection_dim)
    chosen = KCenterSelector().select(features, k=15)
    assert len(set(chosen.tolist())) == 15
    # the same coreset inside the orchestrator, features from the joint embedder
    selector = KCenterSelector(embed=task.joint_embedder(model))
    assert torch.equal(selector.select(scenario["forget"], k=15, model=model), chosen)
    unlearner = ErasusUnlearner(model, strategy="contrastive_unlearning", selector=selector, prune_ratio=0.1,
                                task=task, copy=True, epochs=1, batch_size=16)
    _, report = unlearner.fit(scenario["forget"], scenario["retain"])
    assert report["coreset_size"] == 15 and report["selector"] == "kcenter"
    assert "forget_unselected_zs_acc" in report["metrics"]


def test_cache_retrained_model_and_gaps():
    tiny = {"preset": "test", "steps": 3, "hidden": 16}
    first = clip_scenario(3, 0, **tiny)
    again = clip_scenario(3, 0, **tiny)  # loaded from the cache file, not trained again
    for a, b in zip(first["original"].parameters(), again["original"].parameters()):
        assert torch.equal(a, b)
    # training is seeded: the same recipe gives the same weights, another seed others
    tok = first["tokenizer"]
    runs = [train_clip(tiny_clip(len(tok), seed=0, hidden=16, tokenizer=tok), first["retain"], steps=2, seed=seed)
            for seed in (0, 0, 1)]
    same = [all(torch.equal(a, b) for a, b in zip(runs[0].parameters(), other.parameters())) for other in runs[1:]]
    assert same == [True, False]
    unlearner = ErasusUnlearner(first["original"], strategy="modality_decoupling", task="clip", copy=True, epochs=1,
                                selector=None, batch_size=64)
    _, report = unlearner.fit(first["forget"], first["retain"], test=first["test"], retrained=first["retrained"])
    assert set(CLIPTask.gap_keys) <= set(report["gap_to_retrained"]) and 0 <= report["avg_gap"] <= 1


def test_contrastive_loss_and_recall_by_hand():
    e = torch.eye(3)
    # perfect alignment with a large scale: the loss is ~0; swapping two captions costs ~scale
    assert contrastive_loss(e, e, 100.0) < 1e-6
    assert contrastive_loss(e, e[[1, 0, 2]], 100.0) > 10
    # two pairs of concept 0 with identical captions are both positives: no penalty with labels
    image = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    # log 2 is the floor of a duplicated pair's row (its soft target is split in two)
    assert contrastive_loss(image, image, 100.0, torch.tensor([0, 0, 1])) < 0.7
    gallery = {"image": image, "text": image, "labels": torch.tensor([0, 0, 1])}
    query = {"image": torch.tensor([[0, 1.0]]), "text": torch.tensor([[0, 1.0]]), "labels": torch.tensor([0])}
    r = retrieval_recall(query, gallery, ks=(1, 2))
    assert r == {"i2t_r1": 0.0, "t2i_r1": 0.0, "i2t_r2": 1.0, "t2i_r2": 1.0}


def test_bad_inputs_are_erasus_errors(scenario):
    tok = scenario["tokenizer"]
    with pytest.raises(InvalidInputError, match="'dog'.*not in the text encoder's vocabulary"):
        concept_prompts(["three", "dog"], tok)
    with pytest.raises(EmptyInputError, match="concepts"):
        concept_prompts([], tok)
    with pytest.raises(EmptyInputError, match="concepts"):
        ImageCaptionDataset(torch.zeros(1, 1, 16, 16), tok(["a photo of the digit one"]), torch.tensor([0]),
                            tok(["a photo of the digit one"]), [])
    small = clip_splits(3, 0, image_size=8)  # 8x8 images for a 16x16 model
    with pytest.raises(ShapeError, match=r"forget: images of shape \(1, 1, 8, 8\).*\(batch, 1, 16, 16\)"):
        ErasusUnlearner(scenario["original"], strategy="modality_decoupling", task="clip").fit(
            small["forget"], small["retain"])
    batch = small["forget"].collate([small["forget"][0]])
    with pytest.raises(ShapeError, match="pixel_values"):
        CLIPTask().outputs(scenario["original"], batch)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    with pytest.raises(InvalidInputError, match="task 'clip' needs a CLIP-style dual encoder.*Sequential"):
        ErasusUnlearner(mlp, strategy="ga", task="clip").fit(scenario["forget"], scenario["retain"])
    with pytest.raises(InvalidInputError, match="original must be a CLIP model"):
        CLIPTask(original=mlp)
    with pytest.raises(InvalidInputError, match="works on \\['clip'\\] models"):
        ErasusUnlearner(mlp, strategy="contrastive_unlearning")
    with pytest.raises(InvalidInputError, match="margin"):
        STRATEGIES["modality_decoupling"](margin=1.5)
    with pytest.raises(InvalidInputError, match="overlap"):
        ErasusUnlearner(scenario["original"], strategy="ga", task="clip").fit(scenario["forget"], scenario["forget"])
    with pytest.raises(ErasusError):
        CaptionTokenizer([])
