"""Image–caption pairs from scikit-learn's bundled digits, a word-level caption tokenizer, and tiny CLIPs trained
on them from a config (no download), cached like the LM family's models.

The 1,797 real 8×8 digits are scaled to [0, 1] and upsampled to the model's image size (16×16 by default); each
image gets a caption from a few templates ("a photo of the digit three", "a picture of a handwritten three",
...). Zero-shot classification compares an image with one prompt per concept ("a photo of the digit three").
``clip_scenario`` gives forget (one digit's training pairs) / retain (the other training pairs) / test splits,
an "original" CLIP trained on forget + retain and a "retrained" gold standard trained on retain only.

Example:
    >>> from erasus.data.clip_data import CaptionTokenizer
    >>> tok = CaptionTokenizer(["a photo of the digit three"])
    >>> tok.encode("a photo of the digit three")
    [2, 3, 6, 5, 7, 4, 8, 1]
    >>> tok.encode("a photo of the digit seven")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    erasus.errors.InvalidInputError: 'seven' (in 'a photo of the digit seven') is a concept not in the text ...
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from erasus._device import model_device, to_device
from erasus.errors import EmptyInputError, InvalidInputError, NonFiniteError, ShapeError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: templates of the training captions; the first is also the zero-shot prompt
CAPTION_TEMPLATES = ("a photo of the digit {}", "a picture of a handwritten {}", "an image of the number {}")
PROMPT_TEMPLATE = CAPTION_TEMPLATES[0]
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")
# Bump when the data, the models or the training change, so that stale cache files are never loaded.
CLIP_SCENARIO_VERSION = 1
#: the tiny CLIP of the reference protocol (2-layer 64-wide towers, patch 4 on 16×16) and its training: "demo"
#: (about 99% zero-shot on its training pairs, 97% on test), and a cheaper "test" (about 95% / 94%)
CLIP_PRESETS = {
    "demo": {"hidden": 64, "n_layer": 2, "image_size": 16, "patch_size": 4, "steps": 400, "lr": 2e-3,
             "batch_size": 64},
    "test": {"hidden": 64, "n_layer": 2, "image_size": 16, "patch_size": 4, "steps": 200, "lr": 3e-3,
             "batch_size": 32},
}


class CaptionTokenizer:
    """A word-level tokenizer over a fixed caption vocabulary: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, then the
    words in sorted order. A text is lower-cased and split on spaces; a word outside the vocabulary is an
    InvalidInputError naming it (the text encoder has never seen it, so it cannot stand for a concept).
    ``eos`` is not 2 on purpose: transformers' CLIP text model treats ``eos_token_id == 2`` as a legacy config
    and pools at the highest token id instead of the first eos."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, texts: Sequence[str]):
        words = sorted({w for text in texts for w in _words(text, "texts")})
        if not words:
            raise EmptyInputError("texts: the vocabulary needs at least one word")
        self.vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + tuple(words))}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """``[bos, words..., eos]``."""
        ids = [self.bos_token_id]
        for word in _words(text, "text"):
            if word not in self.vocab:
                known = [w for w in self.vocab if w not in SPECIAL_TOKENS]
                raise InvalidInputError(f"{word!r} (in {text!r}) is a concept not in the text encoder's vocabulary "
                                        f"({len(self)} tokens: {known} and {len(SPECIAL_TOKENS)} special)")
            ids.append(self.vocab[word])
        return ids + [self.eos_token_id]

    def __call__(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` (n, L), right-padded to ``max_length`` (default: the longest)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise EmptyInputError("texts is empty")
        encoded = [self.encode(t) for t in texts]
        width = max(len(e) for e in encoded) if max_length is None else max_length
        if any(len(e) > width for e in encoded):
            raise ShapeError(f"a text has {max(len(e) for e in encoded)} tokens but max_length is {width}")
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}


def _words(text: str, name: str) -> list[str]:
    if not isinstance(text, str):
        raise InvalidInputError(f"{name} must hold strings, got {type(text).__name__}")
    return text.lower().split()


def concept_prompts(concepts: Sequence[str], tokenizer: CaptionTokenizer, template: str = PROMPT_TEMPLATE,
                    max_length: int | None = None) -> dict[str, torch.Tensor]:
    """The zero-shot prompts, one per concept (``template.format(concept)``), tokenized: ``{"input_ids",
    "attention_mask"}`` of shape (len(concepts), L). An empty list is an EmptyInputError; a word the tokenizer
    does not know is an InvalidInputError naming it."""
    if isinstance(concepts, str) or len(concepts) == 0:
        raise EmptyInputError(f"concepts must be a non-empty list of concept names, got {concepts!r}")
    if "{}" not in template:
        raise InvalidInputError(f"template must contain '{{}}' where the concept goes, got {template!r}")
    return tokenizer([template.format(c) for c in concepts], max_length=max_length)


class ImageCaptionDataset(Dataset):
    """Image–caption pairs with a concept label each, and the zero-shot prompts of every concept.

    Items are dicts ``{"pixel_values" (C, H, W), "input_ids" (L,), "attention_mask" (L,), "labels" ()}``;
    ``collate(items)`` stacks them and adds ``class_input_ids`` / ``class_attention_mask`` (K, L), the prompts
    of the K concepts that ``labels`` index, so that a batch alone says what zero-shot classifies among.
    """

    def __init__(self, pixel_values: torch.Tensor, captions: dict[str, torch.Tensor], labels: torch.Tensor,
                 prompts: dict[str, torch.Tensor], concepts: Sequence[str]):
        if len(concepts) == 0:
            raise EmptyInputError("concepts is empty: zero-shot needs at least one concept")
        if pixel_values.dim() != 4:
            raise ShapeError(f"pixel_values must be (n, channels, height, width), got {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        if captions["input_ids"].shape[0] != n or labels.shape != (n,):
            raise ShapeError(f"{n} images but {captions['input_ids'].shape[0]} captions and labels of shape "
                             f"{tuple(labels.shape)}")
        if prompts["input_ids"].shape[0] != len(concepts):
            raise ShapeError(f"{len(concepts)} concepts but {prompts['input_ids'].shape[0]} prompts")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= len(concepts)):
            raise InvalidInputError(f"labels must index the {len(concepts)} concepts, got values in "
                                    f"[{int(labels.min())}, {int(labels.max())}]")
        self.pixel_values, self.labels = pixel_values, labels
        self.input_ids, self.attention_mask = captions["input_ids"], captions["attention_mask"]
        self.class_input_ids, self.class_attention_mask = prompts["input_ids"], prompts["attention_mask"]
        self.concepts = tuple(concepts)

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "input_ids": self.input_ids[i],
                "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
        batch["class_input_ids"], batch["class_attention_mask"] = self.class_input_ids, self.class_attention_mask
        return batch

    def subset(self, indices) -> "ImageCaptionDataset":
        """A new dataset of the given rows (same concepts and prompts)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageCaptionDataset(self.pixel_values[idx], {"input_ids": self.input_ids[idx],
                                   "attention_mask": self.attention_mask[idx]}, self.labels[idx],
                                   {"input_ids": self.class_input_ids, "attention_mask": self.class_attention_mask},
                                   self.concepts)


def digit_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (1,797 real 8×8 images, no download) as (n, 1, image_size, image_size)
    float32 in [0, 1] (bilinear upsampling) and their int64 labels."""
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise InvalidInputError(f"image_size must be an integer >= 8, got {image_size!r}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(digits.target, dtype=torch.long)


def clip_splits(forget_digit: int = 3, seed: int = 0, image_size: int = 16, test_fraction: float = 0.2) -> dict:
    """The image–caption scenario: ``{"tokenizer", "concepts", "train", "forget", "retain", "test"}``.

    A stratified ``test_fraction`` of the digits (seeded) is the test set; of the rest, the pairs of
    ``forget_digit`` are the forget set and the others the retain set (``train`` is both). Each image's caption
    uses one of ``CAPTION_TEMPLATES``, drawn with the seed; every set carries the zero-shot prompts
    ``"a photo of the digit <name>"`` of the ten digits."""
    if isinstance(forget_digit, bool) or forget_digit not in range(10):
        raise InvalidInputError(f"forget_digit must be an integer digit 0..9, got {forget_digit!r}")
    if not 0 < test_fraction < 1:
        raise InvalidInputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    images, labels = digit_images(image_size)
    tokenizer = CaptionTokenizer([t.format(name) for t in CAPTION_TEMPLATES for name in DIGIT_NAMES])
    g = torch.Generator().manual_seed(seed)
    template_of = torch.randint(len(CAPTION_TEMPLATES), (len(labels),), generator=g)
    texts = [CAPTION_TEMPLATES[int(t)].format(DIGIT_NAMES[int(y)]) for t, y in zip(template_of, labels)]
    prompts = [PROMPT_TEMPLATE.format(name) for name in DIGIT_NAMES]
    width = max(len(tokenizer.encode(t)) for t in set(texts) | set(prompts))  # one width for captions and prompts
    full = ImageCaptionDataset(images, tokenizer(texts, max_length=width), labels,
                               concept_prompts(DIGIT_NAMES, tokenizer, max_length=width), DIGIT_NAMES)
    test_idx = _stratified_test_rows(labels, test_fraction, g)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test_idx] = True
    train_idx = (~is_test).nonzero().flatten()
    forget_idx = train_idx[labels[train_idx] == forget_digit]
    retain_idx = train_idx[labels[train_idx] != forget_digit]
    return {"tokenizer": tokenizer, "concepts": DIGIT_NAMES, "forget_digit": forget_digit,
            "train": full.subset(train_idx), "forget": full.subset(forget_idx), "retain": full.subset(retain_idx),
            "test": full.subset(test_idx.sort().values)}


def _stratified_test_rows(labels: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    rows = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        rows.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(rows)


def tiny_clip(vocab_size: int, *, seed: int = 0, hidden: int = 64, n_layer: int = 2, image_size: int = 16,
              patch_size: int = 4, num_channels: int = 1, max_positions: int = 16,
              tokenizer: CaptionTokenizer | None = None):
    """A randomly initialised ``transformers.CLIPModel`` from a config: text and vision towers of ``n_layer``
    layers, ``hidden`` wide (4 heads, MLP 2×hidden), projection ``hidden``, grey-scale ``image_size`` images
    cut into ``patch_size`` patches. The special token ids are the tokenizer's (``CaptionTokenizer``'s by
    default). The initial weights depend only on ``seed``; torch's global RNG is left as it was."""
    from transformers import CLIPConfig, CLIPModel

    for name, value in (("vocab_size", vocab_size), ("hidden", hidden), ("n_layer", n_layer),
                        ("image_size", image_size), ("patch_size", patch_size), ("max_positions", max_positions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    if image_size % patch_size:
        raise ShapeError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tok = tokenizer or CaptionTokenizer
    heads = 4 if hidden % 4 == 0 else 1
    tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": n_layer,
             "num_attention_heads": heads}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": vocab_size, "max_position_embeddings": max_positions,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id},
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size, "num_channels": num_channels},
        projection_dim=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config)


def train_clip(model, dataset: ImageCaptionDataset, *, steps: int = 400, lr: float = 2e-3, batch_size: int = 64,
               seed: int = 0, weight_decay: float = 0.01):
    """Train ``model`` (a CLIPModel) **in place** on image–caption pairs for ``steps`` steps with the symmetric
    contrastive loss of :func:`erasus.tasks.clip.contrastive_loss`, where every caption of an image's concept
    counts as a positive (captions repeat across images). AdamW, linear warm-up over 10% of the steps then
    cosine decay, gradients clipped at norm 1; the same seed gives the same weights. Returns it in eval mode."""
    from erasus.tasks.clip import clip_embeddings, contrastive_loss

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps must be a positive integer, got {steps!r}")
    if len(dataset) == 0:
        raise EmptyInputError("dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=dataset.collate, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise EmptyInputError(f"dataset has {len(dataset)} pairs, fewer than one batch of {batch_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    device = model_device(model)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            batch = to_device(batch, device)
            image, text, scale = clip_embeddings(model, batch)
            loss = contrastive_loss(image, text, scale, batch["labels"])
            if not torch.isfinite(loss):
                raise NonFiniteError(f"training loss became {loss.item()}; lower lr (got {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    return model.eval()


def clip_scenario(forget_digit: int = 3, seed: int = 0, *, preset: str = "demo", retrained: bool = True,
                  steps: int | None = None, hidden: int | None = None, n_layer: int | None = None,
                  lr: float | None = None, batch_size: int | None = None) -> dict:
    """The CLIP unlearning scenario on digits, trained once and cached.

    Returns :func:`clip_splits`'s dict plus ``"original"`` (a tiny CLIP trained on forget + retain) and
    ``"retrained"`` (trained on retain only from another init seed, ``seed + 1000``: the gold standard), both
    in eval mode (``retrained=False`` skips the second model: ``"retrained"`` is then None). Sizes and training
    come from ``CLIP_PRESETS[preset]``; the other arguments override them. Models are cached
    as safetensors in the erasus cache folder (``ERASUS_CACHE``), keyed by every setting; a damaged file is
    retrained with a warning (:func:`erasus.data.lm_models.cached_lm`). The original does not depend on
    ``forget_digit``, so one file serves every digit."""
    from erasus.data.lm_models import cached_lm

    if preset not in CLIP_PRESETS:
        raise InvalidInputError(f"preset must be one of {tuple(CLIP_PRESETS)}, got {preset!r}")
    s = dict(CLIP_PRESETS[preset])
    s.update({k: v for k, v in {"steps": steps, "hidden": hidden, "n_layer": n_layer, "lr": lr,
                                "batch_size": batch_size}.items() if v is not None})
    splits = clip_splits(forget_digit, seed, s["image_size"])
    tok = splits["tokenizer"]

    def build(init_seed):
        return lambda: tiny_clip(len(tok), seed=init_seed, hidden=s["hidden"], n_layer=s["n_layer"],
                                 image_size=s["image_size"], patch_size=s["patch_size"], tokenizer=tok)

    def train_on(dataset, train_seed):
        return lambda model: train_clip(model, dataset, steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"],
                                        seed=train_seed)

    sizes = (f"h{s['hidden']}-l{s['n_layer']}-i{s['image_size']}-p{s['patch_size']}-lr{s['lr']:g}"
             f"-b{s['batch_size']}-t{s['steps']}-s{seed}-v{CLIP_SCENARIO_VERSION}")
    original = cached_lm(f"clip-digits-original-{sizes}", build(seed), train_on(splits["train"], seed))
    gold = cached_lm(f"clip-digits-without{forget_digit}-{sizes}", build(seed + 1000),
                     train_on(splits["retain"], seed + 1000)) if retrained else None
    return {**splits, "original": original, "retrained": gold}
