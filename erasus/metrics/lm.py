"""Metrics of causal-LM unlearning: answer NLL and perplexity, greedy QA accuracy and ROUGE-L (QA and MUSE-style
verbatim), TOFU's truth ratio and forget quality, extraction strength, and the membership-inference scores LOSS,
zlib, Min-K%, Min-K%++ and GradNorm with their AUC and MUSE's privleak.

The definitions follow OpenUnlearning (OU, locuslab/open-unlearning; see shared/reference/llm_unlearning.md §1.3);
where ours differ on an edge case the function's docstring says so.

Data: a QA dataset such as ``erasus.data.QADataset`` (or a ``torch.utils.data.Subset`` of one): ``ds[i]`` is a dict
of 1-D ``input_ids`` / ``attention_mask`` / ``labels`` (labels unshifted, -100 on the prompt: position t's logits
predict token t + 1), ``ds.collate(items)`` right-pads a batch, and ``prompt_ids(i)``, ``answer_ids(i)``,
``records[i]``, ``with_answers(answers)`` and ``tokenizer`` describe the samples. Models: any ``transformers``
causal LM whose output has ``.logits``, peft-wrapped or not.

Every function here runs the model in eval mode (no dropout) and restores its mode afterwards; none changes the
weights or the ``.grad`` fields. All but the GradNorm ones run under ``no_grad``. Batches go to the model's
device; per-sample results come back as CPU tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import zlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from erasus._device import model_device, to_device
from erasus.errors import EmptyInputError, InvalidInputError, NonFiniteError, ShapeError
from erasus.losses import per_sample_cross_entropy

IGNORE_INDEX = -100
MIA_NAMES = ("loss", "zlib", "min_k", "min_k++", "gradnorm")

# OU clamps the vocabulary variance of Min-K%++ here, so a near one-hot distribution gives a large, finite z.
_MIN_VOCAB_VARIANCE = 1e-6


# ------------------------------------------------------------------------------------------------ data access
class _QAView:
    """A QA dataset, or a (nested) Subset of one, seen through the few methods the metrics use: sample i of the
    view is sample ``indices[i]`` of the root dataset (``indices`` None: the root itself)."""

    def __init__(self, root, indices: list[int] | None, name: str = "ds"):
        self.root, self.indices, self.name = root, indices, name

    @classmethod
    def of(cls, ds, name: str) -> "_QAView":
        if isinstance(ds, _QAView):
            return ds
        if isinstance(ds, DataLoader):
            ds = ds.dataset
        indices = None
        while isinstance(ds, Subset):
            level = [int(j) for j in ds.indices]
            indices = level if indices is None else [level[j] for j in indices]
            ds = ds.dataset
        for method in ("__len__", "__getitem__", "collate"):
            if not hasattr(ds, method):
                raise InvalidInputError(f"{name} must be a QA dataset with {method}() (e.g. erasus.data.QADataset) "
                                        f"or a Subset of one, got {type(ds).__name__}")
        view = cls(ds, indices, name)
        if len(view) == 0:
            raise EmptyInputError(f"{name} holds no samples")
        return view

    def __len__(self) -> int:
        return len(self.root) if self.indices is None else len(self.indices)

    def _root_index(self, i: int) -> int:
        return i if self.indices is None else self.indices[i]

    def item(self, i: int) -> dict:
        return self.root[self._root_index(i)]

    def collate(self, items: list) -> dict:
        return self.root.collate(items)

    @property
    def tokenizer(self):
        return self.root.tokenizer

    def prompt_ids(self, i: int) -> list[int]:
        if hasattr(self.root, "prompt_ids"):
            return _as_id_list(self.root.prompt_ids(self._root_index(i)))
        return self._split_from_labels(i)[0]

    def answer_ids(self, i: int) -> list[int]:
        if hasattr(self.root, "answer_ids"):
            return _as_id_list(self.root.answer_ids(self._root_index(i)))
        return self._split_from_labels(i)[1]

    def _split_from_labels(self, i: int) -> tuple[list[int], list[int]]:
        """(prompt, answer) of a dataset without prompt_ids / answer_ids (e.g. ``erasus.data.TextDataset``, every
        token a label): the answer is the label tokens, a trailing eos left out, from position 1 at the earliest
        (the first token has nothing to be predicted from); the prompt is what precedes it."""
        item = self.item(i)
        ids = item["input_ids"].tolist()
        labels = answer_labels(item["labels"][None], getattr(self.tokenizer, "eos_token_id", None))[0]
        positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        start = max(positions[0], 1) if positions else len(ids)
        stop = positions[-1] + 1 if positions else len(ids)
        return ids[:start], ids[start:max(start, stop)]

    def record(self, i: int) -> dict:
        records = getattr(self.root, "records", None)
        return records[self._root_index(i)] if records is not None else {}

    def with_answers(self, answers: list[str]) -> "_QAView":
        """The same questions with ``answers[i]`` as sample i's answer."""
        if self.indices is None:
            return _QAView(self.root.with_answers(list(answers)), None, self.name)
        # The root re-tokenises all its questions; samples outside the view keep their own answers.
        full = [self.root.answer_text(j) for j in range(len(self.root))]
        for i, answer in enumerate(answers):
            full[self.indices[i]] = answer
        return _QAView(self.root.with_answers(full), self.indices, self.name)


def _as_id_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]


def _batches(view: _QAView, batch_size: int, device):
    """Collated batches of the view's samples, in order, on ``device``."""
    _check_batch_size(batch_size)
    for start in range(0, len(view), batch_size):
        items = [view.item(i) for i in range(start, min(start + batch_size, len(view)))]
        yield to_device(view.collate(items), device)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")


def _eos_id(view: _QAView):
    return getattr(view.tokenizer, "eos_token_id", None)


# ------------------------------------------------------------------------------------------------ model access
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (no dropout) for the duration, then the model's own mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise InvalidInputError(f"model must be a causal LM whose output has .logits of shape (B, T, V) "
                                f"(a transformers AutoModelForCausalLM), got an output of type {type(out).__name__}")
    return logits


def answer_labels(labels: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """``labels`` (B, T) with each sample's last label token set to -100 when it is ``eos_token_id``: the labels of
    the answer proper. OU's token-wise metrics (Min-K%, Min-K%++, extraction strength, GradNorm) drop the last label
    token of every sample to skip the eos; we drop it only when it is the eos, so data without an appended eos keep
    their whole answer."""
    if eos_token_id is None:
        return labels
    valid = labels != IGNORE_INDEX
    # cumsum * valid peaks (uniquely) at the last label position; rows without labels give index 0, not valid.
    last = (valid.cumsum(dim=1) * valid).argmax(dim=1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    is_eos = valid[rows, last] & (labels[rows, last] == eos_token_id)
    out = labels.clone()
    out[rows[is_eos], last[is_eos]] = IGNORE_INDEX
    return out


@dataclasses.dataclass
class _TeacherForced:
    """What one teacher-forced pass over a dataset yields, per sample."""
    nll: torch.Tensor                      # (n,) token-mean NLL over all label tokens (eos included)
    logprobs: list[torch.Tensor]           # log p of each answer token (eos excluded)
    extraction: torch.Tensor               # (n,) extraction strength
    zscores: list[torch.Tensor] | None     # Min-K%++ token z-scores, when asked for


def _teacher_forced(model: nn.Module, view: _QAView, batch_size: int, *, vocab_stats: bool = False
                    ) -> _TeacherForced:
    """One forward per batch, every teacher-forced statistic at once (the metrics share the pass)."""
    eos = _eos_id(view)
    nll, logprobs, extraction, zscores = [], [], [], []
    with _eval_mode(model), torch.no_grad():
        for batch in _batches(view, batch_size, model_device(model)):
            logits = _logits(model, batch)
            nll.append(per_sample_cross_entropy(logits, batch["labels"], shift=True).float().cpu())
            targets = answer_labels(batch["labels"], eos)[:, 1:]
            for row in range(logits.shape[0]):
                positions = (targets[row] != IGNORE_INDEX).nonzero().squeeze(1)
                token_logits = logits[row, positions].float()       # (n_i, V): logits predicting the answer
                y = targets[row, positions]
                log_p = F.log_softmax(token_logits, dim=-1)
                token_lp = log_p.gather(1, y[:, None]).squeeze(1)
                logprobs.append(token_lp.cpu())
                extraction.append(_extraction_strength(token_logits.argmax(dim=-1), y))
                if vocab_stats:
                    zscores.append(_min_k_plus_plus_z(log_p, token_lp).cpu())
    return _TeacherForced(torch.cat(nll), logprobs, torch.tensor(extraction, dtype=torch.float32),
                          zscores if vocab_stats else None)


# ------------------------------------------------------------------------------------------------ likelihood
def answer_nll(model: nn.Module, ds, batch_size: int = 32) -> torch.Tensor:
    """Token-mean negative log-likelihood of each sample's label tokens (the answer and, if the data append one,
    its eos), teacher-forced: (n,) float32 on the CPU. A sample without label tokens scores 0.

    This is OU's ``avg_loss`` (its Probability metric is ``exp(-answer_nll)``) and the LOSS MIA score. The model
    runs in eval mode under ``no_grad``; it is not changed.

    Raises:
        EmptyInputError: ``ds`` is empty. InvalidInputError: the model's output has no ``.logits``.
    """
    return _teacher_forced(model, _QAView.of(ds, "ds"), batch_size).nll


def perplexity(model: nn.Module, ds, batch_size: int = 32) -> float:
    """``exp`` of the mean over samples of the token-mean answer NLL (:func:`answer_nll`): every sample weighs
    the same whatever its length, as in TOFU's per-sample probabilities (not the token-weighted corpus perplexity).
    The model is not changed."""
    return _perplexity(answer_nll(model, ds, batch_size))


def _perplexity(nll: torch.Tensor) -> float:
    return float(torch.exp(nll.double().mean()))


def token_logprobs(model: nn.Module, ds, batch_size: int = 32) -> list[torch.Tensor]:
    """For each sample, the teacher-forced log-probabilities ``log p(y_t | x, y_<t)`` of its answer tokens, in
    order: a list of 1-D float32 CPU tensors. The label tokens are the answer's; a trailing eos label is left out,
    as OU does for its token-wise metrics (see :func:`answer_labels`). The model is not changed."""
    return _teacher_forced(model, _QAView.of(ds, "ds"), batch_size).logprobs


# ------------------------------------------------------------------------------------------------ generation
def greedy_answers(model: nn.Module, ds, max_new_tokens: int | None = None, batch_size: int = 32
                   ) -> list[list[int]]:
    """Greedy (argmax) continuation of each sample's prompt, cut before the first eos: a list of token-id lists.

    Prompts are left-padded into batches with an attention mask and run through ``model.generate(do_sample=False)``
    with the tokenizer's pad and eos ids. Sample i gets ``max_new_tokens`` new tokens, or by default
    ``len(answer_ids(i)) + 1`` (room for the answer and its eos), and never more than the model's context length
    (``config.max_position_embeddings``) leaves after the prompt; a sample's result does not depend on the batch
    it ran in. The model runs in eval mode; it is not changed.

    Raises:
        EmptyInputError: ``ds`` is empty. InvalidInputError: ``max_new_tokens`` < 1, an empty prompt, or a model
            without ``generate`` (any transformers causal LM or peft model has one).
    """
    view = _QAView.of(ds, "ds")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise InvalidInputError(f"max_new_tokens must be a positive integer or None, got {max_new_tokens!r}")
    budgets = [max_new_tokens or len(view.answer_ids(i)) + 1 for i in range(len(view))]
    return _generate(model, view, [view.prompt_ids(i) for i in range(len(view))], budgets, batch_size)


def _generate(model: nn.Module, view: _QAView, contexts: list[list[int]], budgets: list[int], batch_size: int
              ) -> list[list[int]]:
    """Greedy continuation of each context, at most ``budgets[i]`` tokens (and never past the model's context
    length), cut before the first eos."""
    if not callable(getattr(model, "generate", None)):
        raise InvalidInputError(f"model must have generate() (a transformers causal LM, optionally peft-wrapped) "
                                f"for the generation metrics, got {type(model).__name__}")
    _check_batch_size(batch_size)
    for i, ctx in enumerate(contexts):
        if not ctx:
            raise InvalidInputError(f"{view.name}: sample {i} has an empty prompt: generation needs at least one "
                                    "prompt token")
    tokenizer = view.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    limit = _context_length(model)
    if limit is not None:
        budgets = [min(b, limit - len(c)) for b, c in zip(budgets, contexts)]
    device = model_device(model)
    answers: list[list[int]] = [[] for _ in contexts]
    with _eval_mode(model), torch.no_grad():
        for rows in _generation_batches(contexts, budgets, batch_size, limit):
            ids, mask = _left_padded([contexts[i] for i in rows], pad)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max(budgets[i] for i in rows), do_sample=False, pad_token_id=pad,
                                 eos_token_id=eos, return_dict_in_generate=False)
            new = out[:, ids.shape[1]:].cpu()
            for row, i in enumerate(rows):
                answers[i] = _cut_at_eos(new[row, :budgets[i]].tolist(), eos)
    return answers


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _generation_batches(contexts: list[list[int]], budgets: list[int], batch_size: int, limit: int | None):
    """Consecutive samples in batches of at most ``batch_size`` whose padded width plus longest budget fits the
    context: every row of a batch runs for the longest budget, and its positions grow with it. Samples with no
    budget left are not generated at all."""
    rows: list[int] = []
    width = longest = 0
    for i, (ctx, budget) in enumerate(zip(contexts, budgets)):
        if budget < 1:
            continue
        fits = limit is None or max(width, len(ctx)) + max(longest, budget) <= limit
        if rows and (len(rows) == batch_size or not fits):
            yield rows
            rows, width, longest = [], 0, 0
        rows.append(i)
        width, longest = max(width, len(ctx)), max(longest, budget)
    if rows:
        yield rows


def _left_padded(contexts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, ctx in enumerate(contexts):
        ids[row, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
        mask[row, width - len(ctx):] = 1
    return ids, mask


def _cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


def rouge_tokenize(text: str) -> list[str]:
    """Words as rouge-score's default tokenizer sees them: lower-cased runs of ``[a-z0-9]`` (other characters
    separate words). Unlike OU (rouge-score with ``use_stemmer=True``) no Porter stemming is applied."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l_recall(pred_tokens: Sequence, ref_tokens: Sequence) -> float:
    """ROUGE-L recall: length of the longest common subsequence of the two token sequences over
    ``len(ref_tokens)``; 0.0 when either is empty (as rouge-score).

    Example:
        >>> rouge_l_recall("the cat sat on the mat".split(), "the cat was on the mat".split())
        0.8333333333333334
        >>> rouge_l_recall([], ["a"])
        0.0
    """
    pred, ref = list(pred_tokens), list(ref_tokens)
    if not pred or not ref:
        return 0.0
    # One row of the LCS table at a time: O(len(pred) * len(ref)) time, O(len(pred)) memory.
    previous = [0] * (len(pred) + 1)
    for r in ref:
        current = [0]
        for j, p in enumerate(pred):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


def _decoded_words(tokenizer, ids: list[int]) -> list[str]:
    return rouge_tokenize(tokenizer.decode(ids, skip_special_tokens=True))


def _qa_scores(model: nn.Module, view: _QAView, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: exact greedy answer (0/1) and ROUGE-L recall of the greedy answer, from one generation."""
    predictions = greedy_answers(model, view, batch_size=batch_size)
    exact, rouge = [], []
    for i, pred in enumerate(predictions):
        gold = view.answer_ids(i)
        exact.append(float(pred == gold))
        rouge.append(rouge_l_recall(_decoded_words(view.tokenizer, pred), _decoded_words(view.tokenizer, gold)))
    return torch.tensor(exact), torch.tensor(rouge, dtype=torch.float64)


def qa_accuracy(model: nn.Module, ds, batch_size: int = 32) -> float:
    """Fraction of samples whose greedy answer (:func:`greedy_answers`, cut at the first eos) is exactly the gold
    answer's tokens: the model must produce the answer and then stop (emit eos) within ``len(answer) + 1`` new
    tokens. The model is not changed."""
    return float(_qa_scores(model, _QAView.of(ds, "ds"), batch_size)[0].mean())


def qa_rouge(model: nn.Module, ds, batch_size: int = 32) -> float:
    """Mean over samples of the ROUGE-L recall (:func:`rouge_l_recall` on :func:`rouge_tokenize` words) of the
    decoded greedy answer against the decoded gold answer -- OU's ``*_Q_A_ROUGE`` (rougeL_recall), with the
    generation budget ``len(answer) + 1`` and no stemming. The model is not changed."""
    return float(_qa_scores(model, _QAView.of(ds, "ds"), batch_size)[1].mean())


def verbatim_rouge(model: nn.Module, ds, prefix_fraction: float = 0.5, batch_size: int = 32) -> float:
    """MUSE-style verbatim memorisation: the model sees the prompt and the first ``floor(prefix_fraction * L)``
    tokens of each L-token answer (at most L - 1, so something is left to generate), greedily generates as many
    tokens as remain, and is scored by ROUGE-L recall against the true rest; the mean over samples. MUSE feeds a
    prefix of the forget text and compares 128 generated tokens. On a QA dataset the text is prompt + answer; on
    a plain-text dataset without ``prompt_ids`` (``erasus.data.TextDataset``) the "answer" is the text after its
    first token, as MUSE. The model is not changed.

    Raises:
        InvalidInputError: ``prefix_fraction`` outside [0, 1). EmptyInputError: ``ds`` is empty.
    """
    if not 0.0 <= prefix_fraction < 1.0:
        raise InvalidInputError(f"prefix_fraction must be in [0, 1), got {prefix_fraction!r}")
    view = _QAView.of(ds, "ds")
    contexts, budgets, rests = [], [], []
    for i in range(len(view)):
        answer = view.answer_ids(i)
        cut = min(int(prefix_fraction * len(answer)), max(len(answer) - 1, 0))
        contexts.append(view.prompt_ids(i) + answer[:cut])
        rests.append(answer[cut:])
        budgets.append(max(len(answer) - cut, 1))
    predictions = _generate(model, view, contexts, budgets, batch_size)
    scores = [rouge_l_recall(_decoded_words(view.tokenizer, pred), _decoded_words(view.tokenizer, rest))
              for pred, rest in zip(predictions, rests)]
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------ truth ratio
def _alternative_answers(view: _QAView) -> tuple[list[str], list[list[str]]]:
    paraphrased, perturbed = [], []
    for i in range(len(view)):
        record = view.record(i)
        para = record.get("paraphrased_answer")
        if not isinstance(para, str) or not para:
            raise InvalidInputError(f"{view.name}: sample {i} has no 'paraphrased_answer', which the truth ratio "
                                    "needs")
        pert = record.get("perturbed_answers")
        if isinstance(pert, str) or not pert:
            raise InvalidInputError(f"{view.name}: sample {i} has no 'perturbed_answers' (a non-empty list of "
                                    "strings), which the truth ratio needs")
        paraphrased.append(para)
        perturbed.append(list(pert))
    return paraphrased, perturbed


def _has_alternative_answers(view: _QAView) -> bool:
    try:
        _alternative_answers(view)
    except InvalidInputError:
        return False
    return True


def truth_ratio(model: nn.Module, ds, batch_size: int = 32) -> torch.Tensor:
    """TOFU's per-item truth ratio ``TR = P(perturbed) / P(paraphrased)``: (n,) float64 on the CPU.

    Probabilities are length-normalised, ``P = exp(-answer_nll)``. As OU (``aggregate_to_1D`` on the perturbed
    ``avg_loss``), the perturbed side averages the token-mean NLL over the item's perturbed answers and then
    exponentiates, i.e. it is the geometric mean of their normalised probabilities; so
    ``TR = exp(nll_paraphrased - mean_j nll_perturbed_j)`` (OU adds 1e-10 to the denominator, we need not).
    Items may have different numbers of perturbed answers. Low TR: the model prefers the true (paraphrased)
    answer. The model is not changed.

    Raises:
        InvalidInputError: a record without ``paraphrased_answer`` or ``perturbed_answers`` (named).
        EmptyInputError: ``ds`` is empty.
    """
    view = _QAView.of(ds, "ds")
    paraphrased, perturbed = _alternative_answers(view)
    nll_para = answer_nll(model, view.with_answers(paraphrased), batch_size).double()
    most = max(len(p) for p in perturbed)
    total = torch.zeros(len(view), dtype=torch.float64)
    count = torch.zeros(len(view), dtype=torch.float64)
    for j in range(most):
        has_j = torch.tensor([j < len(p) for p in perturbed], dtype=torch.float64)
        # Items with fewer perturbed answers repeat their first one here; has_j leaves it out of the mean.
        answers = [p[j] if j < len(p) else p[0] for p in perturbed]
        total += has_j * answer_nll(model, view.with_answers(answers), batch_size).double()
        count += has_j
    return torch.exp(nll_para - total / count)


def _as_1d(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).cpu()
    if t.dim() != 1:
        raise ShapeError(f"{name} must be 1-D (one value per sample), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise EmptyInputError(f"{name} is empty")
    if torch.isnan(t).any():
        raise NonFiniteError(f"{name} holds NaN")
    return t


def truth_ratio_forget_score(tr) -> float:
    """OU's forget aggregator ("closer_to_1_better"): ``mean(min(TR, 1/TR))``, in [0, 1]; 1 when the model finds
    perturbed and paraphrased answers equally likely (it no longer knows the answer)."""
    t = _as_1d(tr, "tr")
    return float(torch.minimum(t, 1.0 / t).mean())


def truth_ratio_retain_score(tr) -> float:
    """OU's retain aggregator ("true_better"): ``mean(max(0, 1 - TR))``, in [0, 1]; high when the model prefers
    the true answer."""
    return float((1.0 - _as_1d(tr, "tr")).clamp(min=0.0).mean())


def forget_quality(tr_unlearned, tr_retrained) -> float:
    """TOFU's forget quality: the p-value of the two-sample Kolmogorov-Smirnov test
    (``scipy.stats.ks_2samp``) between the per-item forget truth ratios of the unlearned model and of the model
    retrained without the forget set; 1.0 when the two distributions are the same. (OU tests ``1/TR`` in one of
    its code paths; KS is invariant to a monotone map of both samples, so the p-value is the same.)"""
    from scipy.stats import ks_2samp

    return float(ks_2samp(_as_1d(tr_unlearned, "tr_unlearned").numpy(),
                          _as_1d(tr_retrained, "tr_retrained").numpy()).pvalue)


# ------------------------------------------------------------------------------------------------ extraction
def _extraction_strength(preds: torch.Tensor, labels: torch.Tensor) -> float:
    n = labels.numel()
    if n == 0:
        return 0.0
    wrong = (preds != labels).nonzero()
    # The smallest k with preds[k:] == labels[k:] is one past the last mismatch (0 if none).
    k = int(wrong.max()) + 1 if wrong.numel() else 0
    return 1.0 - k / n


def extraction_strength(model: nn.Module, ds, batch_size: int = 32) -> torch.Tensor:
    """OU's extraction strength per sample, ``ES = 1 - k/|y|`` with ``k`` the smallest suffix start from which the
    teacher-forced argmax predictions match every remaining answer token (a trailing eos label is left out, as
    OU does): (n,) float32 on the CPU, in [0, 1]; 1 when every answer token is predicted.

    When no non-empty suffix matches (the last answer token is mispredicted) ``k = |y|`` (the empty suffix) and
    ES = 0; OU's loop stops at ``k = |y| - 1`` there and reports ``1/|y|``. A sample without answer tokens scores
    0. The model is not changed.
    """
    return _teacher_forced(model, _QAView.of(ds, "ds"), batch_size).extraction


# ------------------------------------------------------------------------------------------------ MIA scores
def _check_k(k: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
        raise InvalidInputError(f"k must be a fraction in (0, 1], got {k!r}")


def _lowest_fraction_score(values: torch.Tensor, k: float) -> float:
    """``-mean`` of the lowest ``max(1, floor(k * n))`` values; 0 for an empty sample (as OU)."""
    if values.numel() == 0:
        return 0.0
    count = max(1, int(values.numel() * k))
    return -float(values.sort().values[:count].mean())


def _min_k_plus_plus_z(log_p: torch.Tensor, token_lp: torch.Tensor) -> torch.Tensor:
    """Per position: ``(log p(x_t) - mu_t) / sigma_t`` with mu, sigma^2 the mean and variance of ``log p(v)`` for
    ``v ~ p`` over the vocabulary. The variance is the centred sum (no cancellation), and p = 0 entries (logits of
    -inf) contribute nothing."""
    p = log_p.exp()
    finite = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    mu = (p * finite).sum(dim=-1)
    variance = (p * (finite - mu[:, None]).square()).sum(dim=-1).clamp(min=_MIN_VOCAB_VARIANCE)
    return (token_lp - mu) / variance.sqrt()


def mia_loss(model: nn.Module, ds, batch_size: int = 32) -> torch.Tensor:
    """LOSS MIA score per sample: the token-mean answer NLL (:func:`answer_nll`). Higher reads "more likely a
    non-member" (OU's convention). The model is not changed."""
    return answer_nll(model, ds, batch_size)


def _label_texts(view: _QAView) -> list[str]:
    texts = []
    for i in range(len(view)):
        labels = view.item(i)["labels"]
        texts.append(view.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=True))
    return texts


def _zlib_scores(nll: torch.Tensor, view: _QAView) -> torch.Tensor:
    sizes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in _label_texts(view)], dtype=torch.float32)
    return nll / sizes


def mia_zlib(model: nn.Module, ds, batch_size: int = 32) -> torch.Tensor:
    """zlib MIA score per sample: answer NLL over ``len(zlib.compress(text))``, the text being the sample's label
    tokens decoded without special tokens (as OU). Higher: more likely a non-member. The model is not changed."""
    view = _QAView.of(ds, "ds")
    return _zlib_scores(answer_nll(model, view, batch_size), view)


def mia_min_k(model: nn.Module, ds, k: float = 0.4, batch_size: int = 32) -> torch.Tensor:
    """Min-K% Prob MIA score per sample (Shi et al. 2024): ``-mean`` of the lowest ``max(1, floor(k * n))`` of the
    n answer-token log-probabilities (:func:`token_logprobs`); TOFU uses k = 0.4. Higher: more likely a
    non-member. The model is not changed.

    Raises:
        InvalidInputError: ``k`` outside (0, 1].
    """
    _check_k(k)
    return torch.tensor([_lowest_fraction_score(lp, k) for lp in token_logprobs(model, ds, batch_size)])


def mia_min_k_plus_plus(model: nn.Module, ds, k: float = 0.4, batch_size: int = 32) -> torch.Tensor:
    """Min-K%++ MIA score per sample (Zhang et al. 2024): token z-scores ``(log p(x_t) - mu_t) / sigma_t`` with
    ``mu_t = E_{v~p}[log p(v)]`` and ``sigma_t^2 = Var_{v~p}[log p(v)]`` over the vocabulary at that position
    (sigma^2 clamped at 1e-6 as OU), then ``-mean`` of the lowest ``max(1, floor(k * n))`` of them. Higher: more
    likely a non-member. The model is not changed.

    Raises:
        InvalidInputError: ``k`` outside (0, 1].
    """
    _check_k(k)
    stats = _teacher_forced(model, _QAView.of(ds, "ds"), batch_size, vocab_stats=True)
    return torch.tensor([_lowest_fraction_score(z, k) for z in stats.zscores])


def _answer_nll_loss(eos: int | None) -> Callable:
    """``loss_fn(model, batch) -> (B,)``: token-mean NLL over the answer tokens (trailing eos left out, as OU's
    GradNorm takes ``-mean`` of its token-wise log-probs)."""
    def loss_fn(model, batch):
        return per_sample_cross_entropy(_logits(model, batch), answer_labels(batch["labels"], eos), shift=True)
    return loss_fn


def mia_gradnorm(model: nn.Module, ds, batch_size: int = 16) -> torch.Tensor:
    """GradNorm MIA score per sample: the L2 norm of the gradient of the sample's token-mean answer NLL over the
    model's trainable parameters, (n,) float32 on the CPU. Higher: more likely a non-member.

    Computed by :func:`erasus.ops.grad_norms` from one batched forward and backward per batch, never a per-sample
    loop (:func:`per_sample_loop_gradnorm` is that loop, for reference). Only parameters with
    ``requires_grad=True`` count: on a peft LoRA model whose base is frozen, the norm is over the adapters. The
    norm is the whole-model L2 norm ``sqrt(sum_i ||grad theta_i||^2)``; OU's GradNorm is instead the mean over
    parameter tensors of their per-tensor norms. The model runs in eval mode; its weights, ``.grad`` fields and
    mode are not changed.
    """
    from erasus.ops import grad_norms

    view = _QAView.of(ds, "ds")
    loss_fn = _answer_nll_loss(_eos_id(view))
    norms = []
    with _eval_mode(model):
        for batch in _batches(view, batch_size, model_device(model)):
            norms.append(grad_norms(model, loss_fn, batch).float().cpu())
    return torch.cat(norms)


def per_sample_loop_gradnorm(model: nn.Module, ds) -> torch.Tensor:
    """The definition of :func:`mia_gradnorm` computed the slow way: one sample at a time, a backward of its
    token-mean answer NLL, the L2 norm of the gradient over the trainable parameters. (n,) float32 on the CPU. The
    reference the tests hold :func:`mia_gradnorm` to, and the baseline it is timed against. Gradients are taken
    with ``torch.autograd.grad``, so the model's ``.grad`` fields, weights and mode are not changed."""
    view = _QAView.of(ds, "ds")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidInputError("model: every parameter is frozen (requires_grad=False): no gradient to measure")
    loss_fn = _answer_nll_loss(_eos_id(view))
    norms = []
    with _eval_mode(model):
        for batch in _batches(view, 1, model_device(model)):
            grads = torch.autograd.grad(loss_fn(model, batch)[0], params, allow_unused=True)
            norms.append(math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None)))
    return torch.tensor(norms, dtype=torch.float32)


def mia_auc(forget_scores, holdout_scores) -> float:
    """ROC-AUC of an MIA score with OU's labels: forget samples label 0, holdout samples label 1
    (``sklearn.metrics.roc_auc_score`` on the raw scores, where higher means "non-member"). 1.0: every forget
    sample scores lower (looks more like a member) than every holdout sample -- the forget set is still
    remembered; 0.5: indistinguishable, the retrained model's expected value.

    Example:
        >>> mia_auc([0.1, 0.2], [0.8, 0.9]), mia_auc([1.0, 1.0], [1.0, 1.0])
        (1.0, 0.5)
    """
    from sklearn.metrics import roc_auc_score

    forget = _as_1d(forget_scores, "forget_scores")
    holdout = _as_1d(holdout_scores, "holdout_scores")
    labels = [0] * forget.numel() + [1] * holdout.numel()
    return float(roc_auc_score(labels, torch.cat([forget, holdout]).numpy()))


def privleak(auc: float, auc_retrained: float = 0.5) -> float:
    """MUSE's PrivLeak as OU computes it from :func:`mia_auc` values:
    ``((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) * 100`` with ``AUC_ref`` the retrained model's (default 0.5).
    0 is the retrained model; strongly negative (down to -100) means the forget set is still distinguishable as
    members (under-unlearning), positive means over-unlearning.

    Example:
        >>> privleak(1.0), privleak(0.5), privleak(0.25)
        (-100.0, 0.0, 50.0)
    """
    for name, value in (("auc", auc), ("auc_retrained", auc_retrained)):
        if not 0.0 <= value <= 1.0:
            raise InvalidInputError(f"{name} must be in [0, 1], got {value!r}")
    if auc_retrained == 1.0:
        raise InvalidInputError("auc_retrained must be below 1: privleak divides by 1 - auc_retrained")
    return ((1.0 - auc) - (1.0 - auc_retrained)) / (1.0 - auc_retrained) * 100.0


# ------------------------------------------------------------------------------------------------ all at once
def _mia_scores(name: str, model: nn.Module, view: _QAView, stats: _TeacherForced, batch_size: int
                ) -> torch.Tensor:
    if name == "loss":
        return stats.nll
    if name == "zlib":
        return _zlib_scores(stats.nll, view)
    if name == "min_k":
        return torch.tensor([_lowest_fraction_score(lp, 0.4) for lp in stats.logprobs])
    if name == "min_k++":
        return torch.tensor([_lowest_fraction_score(z, 0.4) for z in stats.zscores])
    return mia_gradnorm(model, view, batch_size=min(batch_size, 16))


def evaluate_lm(model: nn.Module, forget, retain, holdout=None, *, retrained_truth_ratio=None,
                mias: Sequence[str] = MIA_NAMES, generation: bool = True, batch_size: int = 32,
                return_raw: bool = False):
    """Every causal-LM unlearning metric in one flat dict of floats.

    Keys: ``forget_nll``, ``retain_nll`` (and ``holdout_nll``): mean token-mean answer NLL; ``forget_ppl``,
    ``retain_ppl`` (:func:`perplexity`); with ``generation``: ``forget_qa_acc``, ``retain_qa_acc``,
    ``forget_rouge``, ``retain_rouge`` (:func:`qa_accuracy`, :func:`qa_rouge`); ``forget_truth_ratio`` (forget
    aggregator) and ``retain_truth_ratio`` (retain aggregator) for the sets whose records have paraphrased and
    perturbed answers (skipped otherwise); ``forget_quality`` when ``retrained_truth_ratio`` (the retrained
    model's per-item forget truth ratios) is given; ``forget_es`` (mean extraction strength); and with a holdout
    set, ``mia_<name>_auc`` (forget vs holdout, :func:`mia_auc`) for each name in ``mias`` (``"loss"``,
    ``"zlib"``, ``"min_k"``, ``"min_k++"`` with k = 0.4, ``"gradnorm"``).

    One teacher-forced pass per set serves NLL, extraction strength and the forward MIAs; one generation pass per
    set serves accuracy and ROUGE. With ``return_raw=True`` returns ``(metrics, raw)``, ``raw`` holding the
    per-sample CPU tensors (``forget_nll``, ``retain_nll``, ``forget_es``, ``forget_truth_ratio`` -- keep it from
    the retrained model to pass as ``retrained_truth_ratio`` --, ``retain_truth_ratio``, ``holdout_nll``,
    ``mia_<name>_forget`` / ``mia_<name>_holdout``). The model is not changed.

    Raises:
        EmptyInputError: an empty set. InvalidInputError: an unknown MIA name, or ``retrained_truth_ratio`` given
            while ``forget`` has no paraphrased / perturbed answers.
    """
    unknown = [m for m in mias if m not in MIA_NAMES]
    if unknown:
        raise InvalidInputError(f"mias: unknown MIA {unknown[0]!r}; choose from {MIA_NAMES}")
    views = {"forget": _QAView.of(forget, "forget"), "retain": _QAView.of(retain, "retain")}
    if holdout is not None:
        views["holdout"] = _QAView.of(holdout, "holdout")
    run_mias = tuple(mias) if holdout is not None else ()
    metrics: dict[str, float] = {}
    raw: dict[str, torch.Tensor] = {}
    stats = {}
    for split, view in views.items():
        needs_z = split in ("forget", "holdout") and "min_k++" in run_mias
        stats[split] = _teacher_forced(model, view, batch_size, vocab_stats=needs_z)
        raw[f"{split}_nll"] = stats[split].nll
        metrics[f"{split}_nll"] = float(stats[split].nll.mean())
    for split in ("forget", "retain"):
        metrics[f"{split}_ppl"] = _perplexity(stats[split].nll)
    if generation:
        for split in ("forget", "retain"):
            exact, rouge = _qa_scores(model, views[split], batch_size)
            metrics[f"{split}_qa_acc"] = float(exact.mean())
            metrics[f"{split}_rouge"] = float(rouge.mean())
    if retrained_truth_ratio is not None or _has_alternative_answers(views["forget"]):
        raw["forget_truth_ratio"] = truth_ratio(model, views["forget"], batch_size)
        metrics["forget_truth_ratio"] = truth_ratio_forget_score(raw["forget_truth_ratio"])
        if retrained_truth_ratio is not None:
            metrics["forget_quality"] = forget_quality(raw["forget_truth_ratio"], retrained_truth_ratio)
    if _has_alternative_answers(views["retain"]):
        raw["retain_truth_ratio"] = truth_ratio(model, views["retain"], batch_size)
        metrics["retain_truth_ratio"] = truth_ratio_retain_score(raw["retain_truth_ratio"])
    raw["forget_es"] = stats["forget"].extraction
    metrics["forget_es"] = float(stats["forget"].extraction.mean())
    for name in run_mias:
        scores = {split: _mia_scores(name, model, views[split], stats[split], batch_size)
                  for split in ("forget", "holdout")}
        raw[f"mia_{name}_forget"], raw[f"mia_{name}_holdout"] = scores["forget"], scores["holdout"]
        metrics[f"mia_{name}_auc"] = mia_auc(scores["forget"], scores["holdout"])
    return (metrics, raw) if return_raw else metrics
