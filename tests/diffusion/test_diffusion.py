"""Concept erasure on a tiny diffusers UNet2DConditionModel trained on the bundled digits (erasus.data.diffusion_data,
erasus.tasks.diffusion, erasus.strategies.diffusion): the model generates digits the evaluation classifier reads;
ESD and UCE, run through ErasusUnlearner, cut the erased digit's generated-image accuracy by at least half while
the kept digits' accuracy drops by at most 10 points; the task's losses and the Fréchet distance against written-out
computations; and the refusals."""
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import erasus.strategies.diffusion  # noqa: E402  registers "esd" and "uce"
from erasus import ErasusUnlearner  # noqa: E402
from erasus.data.diffusion_data import (ConceptDiffusion, ConceptImages, concept_ids,  # noqa: E402
                                        diffusion_scenario, sample_images)
from erasus.diffusion_demo import DIFFUSION_METHODS  # noqa: E402
from erasus.diffusion_demo import RUN as DEMO_RUN  # noqa: E402
from erasus.errors import EmptyInputError, ErasusError, InvalidInputError, ShapeError  # noqa: E402
from erasus.strategies.diffusion import ESD, UCE  # noqa: E402
from erasus.tasks.diffusion import Diffusion, cross_attention_layers, frechet_distance  # noqa: E402

#: the demo's runs (tuned on seed 0, forget digit 3): ESD-x, ESD-u (2 epochs of 10 forget batches of 16), UCE
METHODS = {label: (name, params, epochs) for label, name, params, epochs in DIFFUSION_METHODS}
RUN = {**DEMO_RUN, "epochs": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: a second intra-op thread saves nothing and slows down badly when other processes share
    the 2 cores (see tests/lm/test_elm.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenario():
    return diffusion_scenario("three", seed=0, preset="test")


@pytest.fixture(scope="module")
def task():
    return Diffusion()


@pytest.fixture(scope="module")
def original_metrics(scenario, task):
    return task.evaluate(scenario["original"], scenario["forget"], scenario["retain"])


def no_cross_attention_model():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
                                cross_attention_dim=32, norm_num_groups=8)
    return ConceptDiffusion(unet)


# ------------------------------------------------------------------------------------------------ the model
def test_the_tiny_unet_generates_digits_the_classifier_reads(scenario, original_metrics):
    assert original_metrics["retain_gen_acc"] >= 0.7  # chance is 0.1
    assert original_metrics["forget_gen_acc"] >= 0.5
    assert original_metrics["fd_retain"] > 0
    assert len(cross_attention_layers(scenario["original"].unet)) == 2


def test_the_forward_process_is_diffusers_cosine_schedule(scenario):
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.allclose(scenario["original"].alphas_cumprod, reference, atol=1e-6)


def test_sampling_is_seeded_and_leaves_the_model_alone(scenario):
    model = scenario["original"]
    before = copy.deepcopy(model.state_dict())
    a, labels = sample_images(model, ["one", 7], 2, steps=3, seed=5)
    b, _ = sample_images(model, [1, "seven"], 2, steps=3, seed=5)
    assert labels.tolist() == [1, 1, 7, 7] and a.shape == (4, 1, 8, 8)
    assert torch.equal(a, b) and a.abs().max() <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ the task
def test_a_batch_carries_its_noise_so_model_and_reference_see_the_same_input(scenario, task):
    model = scenario["original"]
    batch = next(iter(task.loader(scenario["forget"], 4, shuffle=True, generator=torch.Generator().manual_seed(1))))
    again = next(iter(task.loader(scenario["forget"], 4, shuffle=True, generator=torch.Generator().manual_seed(1))))
    assert len(batch) == 4 and all(torch.equal(a, b) for a, b in zip(batch, again))  # a rerun: the same noise
    pred = task.outputs(model, batch)
    ref = task.outputs(copy.deepcopy(model), batch)
    assert torch.equal(task.output_kl(pred, ref, batch), torch.zeros(4))
    images, ids, noise, u = batch
    t = (u * model.num_train_timesteps).long()
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ((model(a.sqrt() * images + (1 - a).sqrt() * noise, t, ids) - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(task.per_sample_loss(pred, batch), expected, atol=1e-6)
    assert torch.equal(task.sequence_logprob(pred, batch), -task.per_sample_loss(pred, batch))
    # a batch without noise gets the same noise every time (a digest of its content)
    pair = (images, ids)
    assert torch.equal(task.outputs(model, pair), task.outputs(model, pair))


def test_random_targets_are_other_concepts(task):
    ids = torch.arange(10).repeat(20)
    batch = (torch.zeros(200, 1, 8, 8), ids)
    relabelled = task.with_random_targets(None, batch, torch.Generator().manual_seed(0))
    new = relabelled[1]
    assert (new != ids).all() and new.min() >= 0 and new.max() <= 9
    assert len(set(new.tolist())) == 10


def test_frechet_distance_matches_the_formula_with_scipy():
    from scipy.linalg import sqrtm

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    b = 2 * torch.randn(200, 5, generator=gen, dtype=torch.float64) + 1
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ShapeError, match="features_a"):
        frechet_distance(a[:1], b)


# ------------------------------------------------------------------------------------------------ erasure
def check_erased(report, original_metrics):
    metrics = report["metrics"]
    for key in ("forget_gen_acc", "retain_gen_acc", "fd_retain", "UA_gen", "forget_mse", "retain_mse"):
        assert key in metrics and key in report["original"]
    assert report["task"] == "diffusion"
    assert metrics["forget_gen_acc"] <= original_metrics["forget_gen_acc"] / 2
    assert metrics["retain_gen_acc"] >= original_metrics["retain_gen_acc"] - 0.10
    assert report["guard"]["stopped"] is None


@pytest.mark.parametrize("label", ["ESD-x", "ESD-u"])
def test_esd_erases_the_digit_and_keeps_the_others(scenario, original_metrics, label):
    name, params, epochs = METHODS[label]
    unlearner = ErasusUnlearner(scenario["original"], strategy=name, strategy_params=params,
                                **{**RUN, "epochs": epochs})
    model, report = unlearner.fit(scenario["forget"], scenario["retain"])
    check_erased(report, original_metrics)
    assert report["steps"] == 20 and report["metrics"]["forget_mse"] > report["original"]["forget_mse"]
    assert model is not scenario["original"]


def test_uce_erases_the_digit_and_keeps_the_others(scenario, original_metrics, tmp_path):
    unlearner = ErasusUnlearner(scenario["original"], strategy="uce", out_dir=tmp_path, **RUN)
    _, report = unlearner.fit(scenario["forget"], scenario["retain"], test=scenario["test"])
    check_erased(report, original_metrics)
    assert report["training_free"] and report["log"]["erased"] == [3] and report["log"]["edited_projections"] == 4
    assert "test_mse" in report["metrics"]
    assert (tmp_path / "report.json").exists() and (tmp_path / "model.safetensors").exists()


def test_uce_edits_only_the_cross_attention_keys_and_values_in_place(scenario):
    model = copy.deepcopy(scenario["original"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    UCE(concepts=["three"]).unlearn(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    # the preserved concepts' keys and values are kept, the erased one's now match the null concept's
    _, attention = cross_attention_layers(model.unet)[0]
    table, w_old = model.concept_embeddings.weight.detach(), before[
        [k for k in before if ".attn2.to_v." in k][0]]
    w_new = attention.to_v.weight.detach()
    assert torch.allclose(w_new @ table[7], w_old @ table[7], atol=0.05 * float((w_old @ table[7]).norm()))
    erased_gap = (w_new @ table[3] - w_old @ table[model.null_id]).norm()
    assert erased_gap < 0.1 * (w_old @ table[3] - w_old @ table[model.null_id]).norm()


@pytest.mark.parametrize("variant,allowed", [
    ("esd-x", lambda name: ".attn2." in name),
    ("esd-u", lambda name: ".attn2." not in name),
    ("esd-x-strict", lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name),
    ("esd-all", lambda name: True)], ids=["esd-x", "esd-u", "esd-x-strict", "esd-all"])
def test_esd_variants_train_their_parameters_only(scenario, task, variant, allowed):
    model = copy.deepcopy(scenario["original"])
    before = {k: v.clone() for k, v in model.named_parameters()}
    batches = [next(iter(task.loader(scenario["forget"], 8)))]
    ESD(variant=variant, lr=1e-2).unlearn(model, batches, task=task)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(allowed(k) and k.startswith("unet.") for k in changed)  # the concept encoder is frozen
    if variant in ("esd-u", "esd-all"):
        assert any(".resnets." in k for k in changed)
    assert all(p.requires_grad for p in model.parameters())  # put back after the run


# ------------------------------------------------------------------------------------------------ refusals
def test_unknown_and_empty_concepts_are_refused(scenario):
    model = copy.deepcopy(scenario["original"])
    with pytest.raises(InvalidInputError, match="'eleven'"):
        UCE(concepts=["eleven"]).unlearn(model)
    with pytest.raises(EmptyInputError, match="concepts"):
        UCE(concepts=[])
    with pytest.raises(InvalidInputError, match="guide"):
        UCE(concepts=["three"], guide="twelve").unlearn(model)
    with pytest.raises(InvalidInputError, match="both erased and preserved"):
        UCE(concepts=["three"], preserve=["three", "four"]).unlearn(model)
    with pytest.raises(InvalidInputError, match="'ten'"):
        concept_ids(["one", "ten"])
    with pytest.raises(InvalidInputError, match="variant"):
        ESD(variant="esd-z")


def test_a_unet_without_cross_attention_is_refused(scenario):
    model = no_cross_attention_model()
    with pytest.raises(InvalidInputError, match="cross-attention"):
        UCE(concepts=["three"]).unlearn(model)
    with pytest.raises(InvalidInputError, match="cross-attention"):
        ErasusUnlearner(model, strategy="esd", **RUN).fit(scenario["forget"], scenario["retain"])
    with pytest.raises(InvalidInputError, match="cross-attention"):
        ESD().unlearn(model, [scenario["forget"].collate([scenario["forget"][0]])], task="diffusion")


def test_bad_data_is_refused(scenario):
    model = scenario["original"]
    big = ConceptImages(torch.zeros(3, 1, 16, 16), torch.tensor([3, 3, 3]))
    with pytest.raises(ShapeError, match="forget"):
        ErasusUnlearner(model, strategy="uce", **RUN).fit(big, scenario["retain"])
    with pytest.raises(InvalidInputError, match="concept ids"):
        ErasusUnlearner(model, strategy="uce", **RUN).fit((torch.zeros(2, 1, 8, 8), torch.tensor([3, 12])),
                                                          scenario["retain"])
    with pytest.raises(InvalidInputError, match="classification"):
        ErasusUnlearner(model, strategy="uce", selector=None)  # the task is not inferred from a diffusion model
    with pytest.raises(ErasusError, match="guidance"):
        Diffusion(guidance=0.5)
    with pytest.raises(ShapeError):
        ConceptImages(torch.zeros(3, 8, 8), torch.tensor([1, 2, 3]))
