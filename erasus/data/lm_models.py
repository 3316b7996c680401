"""Tiny causal LMs built from configs (no download), trained to memorise the TOFU-style corpus, and cached.

``lm_scenario`` is the causal-LM counterpart of the digits demo: an "original" model fine-tuned on forget +
retain authors and a "retrained" gold standard trained on retain authors only (another init seed), both
cached as safetensors in ``erasus.demo.cache_dir()`` and rebuilt, with a warning, if a cache file is damaged.

Example:
    >>> from erasus.data.lm_models import tiny_causal_lm
    >>> model = tiny_causal_lm("llama", vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    >>> type(model).__name__, model.config.num_hidden_layers, model.config.max_position_embeddings
    ('LlamaForCausalLM', 2, 64)
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader

from erasus._device import model_device, to_device
from erasus.data.text import IGNORE_INDEX, QADataset
from erasus.data.tofu import SPLITS, corpus_texts, tofu_splits, tofu_tokenizer
from erasus.errors import EmptyInputError, InvalidInputError, NonFiniteError

ARCHS = ("gpt2", "llama")
# Bump when the corpus, the models or the training change, so that stale cache files are never loaded.
SCENARIO_VERSION = 2
# Sizes measured to memorise (greedy exact match >= 0.9 on forget and retain) on 2 CPU cores: the default
# for the demo, and a small one for the tests. See lm_scenario.
SCENARIO_PRESETS = {
    "demo": {"n_authors": 50, "per_author": 8, "hidden": 64, "n_layer": 2, "epochs": 40, "lr": 3e-3,
             "batch_size": 32},
    "test": {"n_authors": 12, "per_author": 8, "hidden": 64, "n_layer": 2, "epochs": 60, "lr": 3e-3,
             "batch_size": 16},
}


def tiny_causal_lm(arch: str, vocab_size: int, *, seed: int = 0, n_layer: int = 2, hidden: int = 64,
                   max_positions: int = 64, pad_token_id: int | None = None, bos_token_id: int | None = None,
                   eos_token_id: int | None = None):
    """A randomly initialised causal LM from a config: ``"gpt2"`` (``GPT2LMHeadModel``, tied input/output
    embeddings, dropout off so that it memorises) or ``"llama"`` (``LlamaForCausalLM``, 4 heads, MLP width
    4 x hidden). The initial weights depend only on ``seed``; torch's global RNG is left as it was.
    Pass the tokenizer's ``pad_token_id`` / ``bos_token_id`` / ``eos_token_id``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch not in ARCHS:
        raise InvalidInputError(f"arch must be one of {ARCHS}, got {arch!r}")
    for name, value in (("vocab_size", vocab_size), ("n_layer", n_layer), ("hidden", hidden),
                        ("max_positions", max_positions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    n_head = 4 if hidden % 4 == 0 else 1
    special = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        model_class = GPT2LMHeadModel
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                             max_position_embeddings=max_positions, **special)
        model_class = LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over every label that is not -100 in the batch (labels unshifted, as in HF)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def train_causal_lm(model, dataset, *, epochs: int, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
                    weight_decay: float = 0.0):
    """Fine-tune ``model`` **in place** on ``dataset`` (items with ``labels``, and a ``collate`` method):
    AdamW on the token-mean NLL of the labels, learning rate warmed up linearly over the first 10% of the
    steps then decayed linearly to 0, gradients clipped at norm 1. The same seed gives the same weights. Returns the model in eval mode."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidInputError(f"epochs must be a positive integer, got {epochs!r}")
    if len(dataset) == 0:
        raise EmptyInputError("dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=dataset.collate,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * len(loader)
    warmup = max(1, total_steps // 10)  # a short warm-up keeps Adam's first steps at a high lr stable
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warmup, (total_steps - step) / (total_steps - warmup + 1)))
    device = model_device(model)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            batch = to_device(batch, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = token_mean_nll(logits, batch["labels"])
            if not torch.isfinite(loss):
                raise NonFiniteError(f"training loss became {loss.item()}; lower lr (got {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def greedy_answers(model, dataset: QADataset, max_new_tokens: int | None = None, *,
                   batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt of ``dataset`` (``prompt_ids(i)``), stopped at eos (left out) or
    after ``max_new_tokens`` tokens (default: the longest answer + 1) or at the model's context length.

    Prompts are batched left-padded, with the attention mask and positions counted from each prompt's first
    real token, so a batch decodes exactly as each prompt alone. Does not change the model; runs it in eval
    mode and restores its mode.
    """
    tokenizer = dataset.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    n = len(dataset)
    if max_new_tokens is None:
        max_new_tokens = max(len(dataset.answer_ids(i)) for i in range(n)) + 1
    context = getattr(model.config, "max_position_embeddings", None)
    device = model_device(model)
    was_training = model.training
    model.eval()
    answers: list[list[int]] = []
    try:
        for start in range(0, n, batch_size):
            prompts = [dataset.prompt_ids(i) for i in range(start, min(start + batch_size, n))]
            answers += _greedy_batch(model, prompts, max_new_tokens, context, pad, eos, device)
    finally:
        model.train(was_training)
    return answers


def _greedy_batch(model, prompts, max_new_tokens, context, pad, eos, device) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    steps = max_new_tokens if context is None else min(max_new_tokens, context - width)
    for _ in range(max(0, steps)):
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        next_token = logits.argmax(dim=-1)
        done |= next_token == eos
        for row in (~done).nonzero().flatten().tolist():
            generated[row].append(int(next_token[row]))
        if bool(done.all()):
            break
        # Finished rows get a masked pad: their later outputs are never read.
        ids = torch.cat([ids, torch.where(done, pad, next_token)[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
    return generated


def exact_match(model, dataset: QADataset) -> float:
    """The fraction of records whose greedy answer is exactly the reference answer's tokens."""
    generated = greedy_answers(model, dataset)
    return sum(g == dataset.answer_ids(i).tolist() for i, g in enumerate(generated)) / len(dataset)


def _cache_path(key: str) -> Path:
    from erasus.demo import cache_dir

    return cache_dir() / f"{key}.safetensors"


def cached_lm(key: str, build: Callable[[], torch.nn.Module], train: Callable[[torch.nn.Module], object]):
    """The model ``build()`` with weights from the cache file ``<key>.safetensors``, or trained by ``train`` and
    written there (atomically: a crash never leaves a half-written file under the key). A file that does not
    load (truncated, corrupt, other shapes) or holds NaN/inf is replaced by a fresh training run, with a
    warning. Returns the model in eval mode."""
    path = _cache_path(key)
    if path.exists():
        model = build()
        try:
            _load_checked(model, path)
            return model.eval()
        except Exception as err:  # any failure to read the file means: rebuild it
            warnings.warn(f"erasus: cached model {path} could not be loaded ({type(err).__name__}: {err}); "
                          "training it again", stacklevel=2)
    model = build()
    train(model)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)
    return model.eval()


def _load_checked(model, path: Path) -> None:
    missing, unexpected = load_model(model, str(path), strict=True)
    if missing or unexpected:
        raise InvalidInputError(f"cache file keys do not match the model: missing {missing}, unexpected "
                                f"{unexpected}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteError("cache file holds NaN or inf weights")


def _scenario_settings(n_authors, preset, overrides) -> dict:
    if preset not in SCENARIO_PRESETS:
        raise InvalidInputError(f"preset must be one of {tuple(SCENARIO_PRESETS)}, got {preset!r}")
    settings = dict(SCENARIO_PRESETS[preset])
    if n_authors is not None:
        settings["n_authors"] = n_authors
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def lm_scenario(arch: str = "gpt2", forget: float = 0.1, n_authors: int | None = None, seed: int = 0, *,
                preset: str = "demo", per_author: int | None = None, epochs: int | None = None,
                hidden: int | None = None, n_layer: int | None = None, lr: float | None = None,
                batch_size: int | None = None, max_positions: int = 64) -> dict:
    """The TOFU-style unlearning scenario on a tiny causal LM, trained once and cached.

    Returns ``{"tokenizer", "forget", "retain", "holdout"`` (``QADataset`` with ``max_length`` the model's
    context), ``"original"`` (trained on forget + retain), ``"retrained"`` (trained on retain only from
    another init seed, ``seed + 1000``), ``"records"`` (the split dict of ``tofu_splits``)}.

    ``preset="demo"`` (50 authors x 8 questions, hidden 64, 2 layers, 40 epochs) or ``"test"`` (12 authors,
    60 epochs) gives the sizes; any argument given overrides it. The original does not depend on ``forget``
    (the training authors are the same for every fraction), so one cache file serves every forget split; the
    cache keys name the architecture, split, sizes, seed, epochs and training settings. Models are in eval
    mode; calling again loads them from the cache.
    """
    s = _scenario_settings(n_authors, preset, {"per_author": per_author, "epochs": epochs, "hidden": hidden,
                                               "n_layer": n_layer, "lr": lr, "batch_size": batch_size})
    if arch not in ARCHS:
        raise InvalidInputError(f"arch must be one of {ARCHS}, got {arch!r}")
    records = tofu_splits(s["n_authors"], forget, seed, s["per_author"])
    tokenizer = tofu_tokenizer(s["n_authors"], seed)
    data = {split: QADataset(records[split], tokenizer, max_length=max_positions) for split in SPLITS}
    n_retain_authors = len({r["author"] for r in records["retain"]})

    def build(init_seed):
        return lambda: tiny_causal_lm(arch, len(tokenizer), seed=init_seed, n_layer=s["n_layer"],
                                      hidden=s["hidden"], max_positions=max_positions,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)

    def train_on(dataset, train_seed):
        return lambda model: train_causal_lm(model, dataset, epochs=s["epochs"], lr=s["lr"],
                                             batch_size=s["batch_size"], seed=train_seed)

    sizes = (f"a{s['n_authors']}-q{s['per_author']}-h{s['hidden']}-l{s['n_layer']}-p{max_positions}"
             f"-lr{s['lr']:g}-b{s['batch_size']}-e{s['epochs']}-s{seed}-v{SCENARIO_VERSION}")
    train_all = QADataset(records["retain"] + records["forget"], tokenizer, max_length=max_positions)
    original = cached_lm(f"tofu-{arch}-original-{sizes}", build(seed), train_on(train_all, seed))
    retrained = cached_lm(f"tofu-{arch}-retain{n_retain_authors}-{sizes}", build(seed + 1000),
                          train_on(data["retain"], seed + 1000))
    return {"tokenizer": tokenizer, **data, "original": original, "retrained": retrained, "records": records}

