"""A tiny text-to-image-style diffusion model on scikit-learn's bundled digits, for concept erasure, offline.

The "prompts" are the concepts ``"zero" .. "nine"``: a learned concept encoder (an ``nn.Embedding`` of the ten
digits plus a null concept for classifier-free guidance) turns a concept into a two-token "text" sequence
``[start token, concept token]`` that a ``diffusers.UNet2DConditionModel`` reads through cross-attention, as
Stable Diffusion reads its CLIP text states. So the erasure methods that edit cross-attention (ESD-x, UCE) act
on the same layers (``attn2.to_k`` / ``attn2.to_v``) as on Stable Diffusion.

- :class:`ConceptDiffusion`: the UNet + concept encoder + noise schedule, one ``nn.Module`` (deep-copies,
  saves as safetensors, and is what ``ErasusUnlearner(task="diffusion")`` unlearns).
- :func:`train_diffusion`: DDPM training (noise-prediction MSE, classifier-free dropout of the concept).
- :func:`sample_images`: DDIM sampling with classifier-free guidance for a list of concepts.
- :class:`DigitsClassifier`: the evaluation classifier, a small MLP trained on the real images; its penultimate
  features give the Fréchet-distance proxy of FID.
- :class:`ConceptImages`: a dataset of (image, concept id) pairs.
- :func:`diffusion_scenario`: the trained models (cached as safetensors in ``erasus.demo.cache_dir()``) and the
  forget / retain / test splits for erasing one digit.

``diffusers`` is an optional extra (``erasus[diffusion]``): it is imported inside the functions that need it.

Example:
    >>> from erasus.data.diffusion_data import concept_ids
    >>> concept_ids(["three", 7]).tolist()
    [3, 7]
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from erasus.errors import EmptyInputError, InvalidInputError, NonFiniteError, ShapeError

CONCEPTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: the name of the unconditional concept (the empty prompt of classifier-free guidance)
NULL_CONCEPT = "null"
IMAGE_SIZE = 8
# Bump when the data, the models or the training change, so that stale cache files are never loaded.
SCENARIO_VERSION = 2
# Training sizes: "test" fits the tests' time budget on 2 shared cores, "demo" trains longer for cleaner digits.
PRESETS = {
    "test": {"steps": 300, "batch_size": 64, "lr": 5e-3},
    "demo": {"steps": 600, "batch_size": 64, "lr": 4e-3},
}


def concept_ids(concepts, names: Sequence[str] = CONCEPTS, *, argument: str = "concepts") -> torch.Tensor:
    """int64 ids of ``concepts`` (names such as ``"three"`` or integer ids). An unknown concept raises an
    InvalidInputError naming it and ``argument``; an empty list an EmptyInputError."""
    if isinstance(concepts, (str, int)) or isinstance(concepts, torch.Tensor) and concepts.dim() == 0:
        concepts = [concepts]
    concepts = list(concepts.tolist() if isinstance(concepts, torch.Tensor) else concepts)
    if not concepts:
        raise EmptyInputError(f"{argument} is empty: name at least one concept of {list(names)}")
    ids = []
    for concept in concepts:
        if isinstance(concept, str) and concept in names:
            ids.append(names.index(concept))
        elif isinstance(concept, int) and not isinstance(concept, bool) and 0 <= concept < len(names):
            ids.append(concept)
        else:
            raise InvalidInputError(f"{argument}: unknown concept {concept!r}; the model knows {list(names)} "
                                    f"(or their ids 0..{len(names) - 1})")
    return torch.tensor(ids, dtype=torch.int64)


def diffusers_module():
    """``diffusers``, or an InvalidInputError saying how to install the extra."""
    try:
        import diffusers
    except ImportError as exc:
        raise InvalidInputError("the diffusion family needs diffusers: pip install 'erasus[diffusion]'") from exc
    return diffusers


def cosine_alphas_cumprod(num_train_timesteps: int) -> torch.Tensor:
    """ᾱ_t of the cosine schedule (Nichol & Dhariwal 2021; diffusers' ``squaredcos_cap_v2``, betas capped at
    0.999): it reaches pure noise for any number of steps, unlike the linear schedule at few steps."""
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_train_timesteps) / f(i / num_train_timesteps), 0.999)
             for i in range(num_train_timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0).float()


class ConceptDiffusion(nn.Module):
    """A concept-conditioned noise predictor ``ε_θ(x_t, t, c)``: ``unet`` (a ``diffusers.UNet2DConditionModel``)
    reading the two-token sequence ``[start_token, concept_embeddings[c]]`` through its cross-attention.

    Ids ``0 .. len(concept_names) - 1`` are the concepts; id ``null_id`` (the last) is the null concept that
    classifier-free guidance uses as its unconditional branch. ``add_noise`` is the forward process of the
    cosine schedule with ``num_train_timesteps`` steps.
    """

    def __init__(self, unet: nn.Module, concept_names: Sequence[str] = CONCEPTS, num_train_timesteps: int = 1000):
        super().__init__()
        dim = unet.config.cross_attention_dim
        if not isinstance(dim, int):
            raise InvalidInputError(f"unet: cross_attention_dim must be one integer, got {dim!r}")
        self.unet = unet
        self.concept_names = tuple(concept_names)
        self.num_train_timesteps = int(num_train_timesteps)
        self.concept_embeddings = nn.Embedding(len(self.concept_names) + 1, dim)
        self.start_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.concept_embeddings.weight, std=1.0)
        nn.init.normal_(self.start_token, std=1.0)
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(self.num_train_timesteps), persistent=False)

    @property
    def null_id(self) -> int:
        return len(self.concept_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    def concept_ids(self, concepts, argument: str = "concepts") -> torch.Tensor:
        return concept_ids(concepts, self.concept_names, argument=argument)

    def encode_concepts(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, 2, d) "text" states ``[start token, concept token]`` of concept ids (B,)."""
        tokens = self.concept_embeddings(ids)
        start = self.start_token.expand_as(tokens)
        return torch.stack([start, tokens], dim=1)

    def add_noise(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` per sample."""
        a = self.alphas_cumprod.to(images.device)[timesteps].view(-1, *([1] * (images.dim() - 1)))
        return a.sqrt() * images + (1 - a).sqrt() * noise

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, concept_ids: torch.Tensor) -> torch.Tensor:
        """The predicted noise, shaped like ``sample``."""
        return self.unet(sample, timesteps, encoder_hidden_states=self.encode_concepts(concept_ids)).sample


def tiny_unet(*, seed: int = 0, channels: tuple[int, ...] = (16, 32), cross_attention_dim: int = 32,
              sample_size: int = IMAGE_SIZE, in_channels: int = 1):
    """A randomly initialised ``UNet2DConditionModel`` from a config (no download): one ResNet layer per block,
    cross-attention transformer blocks (8-wide heads) in the lowest-resolution down block and in the middle block,
    plain up blocks (cross-attention there as well cost 30% more time per training step for no better digits).
    The weights depend only on ``seed``; torch's global RNG is left as it was."""
    UNet2DConditionModel = diffusers_module().UNet2DConditionModel
    levels = len(channels)
    down = ("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
            block_out_channels=tuple(channels), down_block_types=down, up_block_types=("UpBlock2D",) * levels,
            mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cross_attention_dim,
            attention_head_dim=8, norm_num_groups=8)


def tiny_concept_diffusion(seed: int = 0, **unet_args) -> ConceptDiffusion:
    """:class:`ConceptDiffusion` over :func:`tiny_unet` (its arguments), with the ten digit concepts."""
    unet = tiny_unet(seed=seed, **unet_args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return ConceptDiffusion(unet)


def digit_images(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (images, labels), "test": (images, labels)}``: the 1,797 bundled digits as float32
    (n, 1, 8, 8) images in [-1, 1] and int64 labels, split 80/20 stratified by ``seed``."""
    from erasus.demo import load_digits_data

    out = {}
    for split, ds in zip(("train", "test"), load_digits_data(seed)):
        x, y = ds.tensors
        out[split] = (x.view(-1, 1, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1, y)
    return out


class ConceptImages(Dataset):
    """Images with the concept id each shows, for diffusion training and unlearning. Items are
    ``(image, concept_id)``; ``collate`` stacks them into ``(images, concept_ids)``. (The loaders of
    ``erasus.tasks.diffusion.Diffusion`` add each batch's noise and timesteps, drawn from the loader's seeded
    generator.)"""

    def __init__(self, images: torch.Tensor, concept_ids: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ShapeError(f"images must be a (n, channels, height, width) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise InvalidInputError(f"images must be floating point (scaled to [-1, 1]), got {images.dtype}")
        if not isinstance(concept_ids, torch.Tensor) or concept_ids.dim() != 1 or concept_ids.is_floating_point():
            raise InvalidInputError("concept_ids must be a 1-D integer tensor")
        if len(images) != len(concept_ids):
            raise ShapeError(f"images ({len(images)}) and concept_ids ({len(concept_ids)}) differ in length")
        if len(images) == 0:
            raise EmptyInputError("images is empty")
        if not torch.isfinite(images).all():
            raise NonFiniteError("images hold NaN or inf")
        self.images, self.concept_ids = images, concept_ids.long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.concept_ids[i]

    @staticmethod
    def collate(items):
        images = torch.stack([torch.as_tensor(item[0]) for item in items])
        ids = torch.stack([torch.as_tensor(item[1]) for item in items]).long()
        return images, ids


def train_diffusion(model: ConceptDiffusion, images: torch.Tensor, labels: torch.Tensor, *, steps: int,
                    batch_size: int = 64, lr: float = 2e-3, cfg_dropout: float = 0.1, seed: int = 0
                    ) -> ConceptDiffusion:
    """DDPM training **in place**: AdamW on the noise-prediction MSE at uniform timesteps, each sample's concept
    replaced by the null concept with probability ``cfg_dropout`` (so one model gives both branches of
    classifier-free guidance), lr warmed up over 5% of the steps then cosine-decayed, gradients clipped at 1.
    The same seed gives the same weights. Returns the model in eval mode."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps must be a positive integer, got {steps!r}")
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    n = len(images)
    for _ in range(steps):
        idx = torch.randint(n, (batch_size,), generator=generator)
        x0, c = images[idx], labels[idx].clone()
        c[torch.rand(batch_size, generator=generator) < cfg_dropout] = model.null_id
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(model.num_train_timesteps, (batch_size,), generator=generator)
        loss = F.mse_loss(model(model.add_noise(x0, noise, t), t, c), noise)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"diffusion training loss became {loss.item()}; lower lr (got {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def sample_images(model: ConceptDiffusion, concepts, n_per_concept: int = 16, *, steps: int = 10,
                  guidance: float = 3.0, seed: int = 0, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, concept_ids)``: ``n_per_concept`` images per concept (names or ids) by deterministic DDIM
    (eta 0, ``steps`` steps, trailing spacing, samples clipped to [-1, 1]) with classifier-free guidance
    ``ε_∅ + guidance (ε_c − ε_∅)`` (``guidance=1`` is plain conditional sampling). The starting noise depends only
    on ``seed``, the concept's position and the sample index, so the same seed compares models image by image.
    Does not change the model; runs it in eval mode and restores its mode."""
    DDIMScheduler = diffusers_module().DDIMScheduler
    ids = model.concept_ids(concepts)
    if isinstance(n_per_concept, bool) or not isinstance(n_per_concept, int) or n_per_concept < 1:
        raise InvalidInputError(f"n_per_concept must be a positive integer, got {n_per_concept!r}")
    scheduler = DDIMScheduler(num_train_timesteps=model.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    device = next(model.parameters()).device
    labels = ids.repeat_interleave(n_per_concept)
    noise = torch.randn((len(labels), *model.image_shape), generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    try:
        chunks = [_ddim(model, scheduler, noise[i:i + batch_size].to(device), labels[i:i + batch_size].to(device),
                        guidance) for i in range(0, len(labels), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).cpu(), labels


def _ddim(model, scheduler, x, labels, guidance):
    null = torch.full_like(labels, model.null_id)
    for t in scheduler.timesteps:
        timesteps = torch.full((len(x),), int(t), device=x.device)
        if guidance == 1:
            eps = model(x, timesteps, labels)
        else:  # one call on the doubled batch: conditional and unconditional branches
            both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([labels, null]))
            cond, uncond = both.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


class DigitsClassifier(nn.Module):
    """The evaluation classifier: an MLP on (B, 1, 8, 8) images in [-1, 1] (an MLP, not a CNN: it trains in a
    second or two on 2 cores and reads the 8x8 digits as well, 99% test accuracy); ``features`` is its
    penultimate (64-d) representation, the space of the Fréchet-distance proxy."""

    def __init__(self, n_classes: int = len(CONCEPTS), image_size: int = IMAGE_SIZE):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, 256), nn.ReLU(),
                                  nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _cache_key(name: str, seed: int, **settings) -> str:
    fields = "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in settings.items())
    return f"digits-diffusion-{name}-{fields}-s{seed}-v{SCENARIO_VERSION}"


def digits_classifier(seed: int = 0, epochs: int = 8) -> DigitsClassifier:
    """The evaluation classifier trained on the real training digits and their one-pixel shifts (so it also reads
    slightly off-centre generated digits): Adam, 8 epochs, cached. About 98% accuracy on the test digits. Eval
    mode."""
    from erasus.data.lm_models import cached_lm
    from erasus.training import train_classifier

    images, labels = digit_images(seed)["train"]

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DigitsClassifier()

    def train(model):
        shifted = _shifted_copies(images)
        data = torch.utils.data.TensorDataset(shifted, labels.repeat(len(shifted) // len(labels)))
        train_classifier(model, data, epochs=epochs, lr=3e-3, batch_size=128, seed=seed)

    return cached_lm(_cache_key("classifier", seed, e=epochs), build, train)


def _shifted_copies(images: torch.Tensor) -> torch.Tensor:
    """The images and their one-pixel shifts left/right/up/down (background -1 fills the gap)."""
    out = [images]
    for dim, step in ((-1, 1), (-1, -1), (-2, 1), (-2, -1)):
        shifted = torch.roll(images, step, dims=dim)
        edge = [slice(None)] * images.dim()
        edge[dim] = slice(0, 1) if step > 0 else slice(-1, None)
        shifted[tuple(edge)] = -1.0
        out.append(shifted)
    return torch.cat(out)


def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((classifier(images).argmax(-1) == labels).float().mean())


def trained_diffusion(seed: int = 0, preset: str = "test", exclude: Sequence = ()) -> ConceptDiffusion:
    """The tiny concept diffusion model trained on the training digits (without the concepts in ``exclude``:
    the retrained gold standard), cached as safetensors. Eval mode."""
    from erasus.data.lm_models import cached_lm

    if preset not in PRESETS:
        raise InvalidInputError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    settings = PRESETS[preset]
    images, labels = digit_images(seed)["train"]
    excluded = sorted(concept_ids(list(exclude), argument="exclude").tolist()) if len(exclude) else []
    keep = ~torch.isin(labels, torch.tensor(excluded, dtype=torch.int64))
    name = "original" if not excluded else "without" + "".join(map(str, excluded))
    init_seed = seed if not excluded else seed + 1000

    def train(model):
        train_diffusion(model, images[keep], labels[keep], seed=init_seed, **settings)

    key = _cache_key(name, seed, **{k[0]: v for k, v in settings.items()})
    return cached_lm(key, lambda: tiny_concept_diffusion(init_seed), train)


def diffusion_scenario(forget: str | int = "three", seed: int = 0, *, preset: str = "test",
                       retrained: bool = False) -> dict:
    """Erase one digit concept: ``{"original"`` (trained on every digit), ``"classifier"`` (the evaluation CNN),
    ``"forget"`` (ConceptImages of the forget digit's training images), ``"retain"`` (the other training
    images), ``"test"`` (the test images), ``"forget_id"``, and ``"retrained"`` (trained without the digit,
    another init seed) when ``retrained``}. Models are cached; calling again loads them."""
    forget_id = int(concept_ids(forget, argument="forget")[0])
    data = digit_images(seed)
    images, labels = data["train"]
    mask = labels == forget_id
    out = {
        "original": trained_diffusion(seed, preset),
        "classifier": digits_classifier(seed),
        "forget": ConceptImages(images[mask], labels[mask]),
        "retain": ConceptImages(images[~mask], labels[~mask]),
        "test": ConceptImages(*data["test"]),
        "forget_id": forget_id,
    }
    if retrained:
        out["retrained"] = trained_diffusion(seed, preset, exclude=[forget_id])
    return out
