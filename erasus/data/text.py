"""Tokenized datasets for causal LMs: question-answer pairs (TOFU-style) and plain text.

Items follow Hugging Face's causal-LM convention: ``{"input_ids", "attention_mask", "labels"}`` with
``labels`` a copy of ``input_ids`` where tokens that must not be learned (the prompt) are ``-100``; the labels
are NOT shifted (the model shifts them). ``collate`` right-pads a list of items into (B, T) tensors.

Prompt format. With a chat template (``chat_template=True``, or ``None`` and the tokenizer has one) the
prompt is the template applied to ``[{"role": "user", "content": question}]`` with the generation prompt, and
the answer follows it directly. Without one the prompt is ``"Question: {question}\\nAnswer:"`` and the answer
follows after one space (" " + answer is tokenized, so a BPE tokenizer sees the word-initial space it would
see in running text). The sequence is ``[bos] + prompt + answer + [eos]``: prompt and answer are tokenized
separately and concatenated, so the prompt/answer boundary is exact; ``bos`` is prepended when the tokenizer
defines one and the prompt does not already start with it (chat templates often write it).

Example:
    >>> from erasus.data.tofu import build_tokenizer
    >>> from erasus.data.text import QADataset
    >>> records = [{"question": "Where was Zorin Keltar born?", "answer": "In Velmora."}]
    >>> tok = build_tokenizer([r["question"] + " " + r["answer"] for r in records])
    >>> ds = QADataset(records, tok)
    >>> item = ds[0]
    >>> tok.convert_ids_to_tokens(item["input_ids"].tolist())
    ['<bos>', 'Question', ':', 'Where', 'was', 'Zorin', 'Keltar', 'born', '?', 'Answer', ':', 'In', 'Velmora', '.', '<eos>']
    >>> item["labels"].tolist().count(-100), ds.answer_text(0)
    (11, 'In Velmora.')
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from erasus.errors import EmptyInputError, InvalidInputError, ShapeError

IGNORE_INDEX = -100
PLAIN_PROMPT = "Question: {question}\nAnswer:"
PLAIN_ANSWER_PREFIX = " "


def normalise_text(text: str) -> str:
    """Whitespace collapsed to single spaces, case folded: the form under which two texts count as equal."""
    return " ".join(text.split()).casefold()


def check_tokenizer(tokenizer) -> None:
    """A tokenizer the datasets can use: it must define a pad token (for batches) and an eos token (every
    sequence ends with it, so a model learns where an answer stops)."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise InvalidInputError("tokenizer has no pad token (tokenizer.pad_token_id is None); set one, e.g. "
                                "tokenizer.pad_token = tokenizer.eos_token")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise InvalidInputError("tokenizer has no eos token (tokenizer.eos_token_id is None); sequences end "
                                "with eos, set tokenizer.eos_token")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def _pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(tensors), max(len(t) for t in tensors)), value, dtype=torch.long)
    for row, t in enumerate(tensors):
        out[row, : len(t)] = t
    return out


class _TokenizedDataset(Dataset):
    """Shared item format and collation; subclasses fill ``self._input_ids`` and ``self._n_masked`` (how many
    leading tokens of each item are not labels)."""

    tokenizer: object
    _input_ids: list[torch.Tensor]
    _n_masked: list[int]

    def __len__(self) -> int:
        return len(self._input_ids)

    def __getitem__(self, i: int) -> dict:
        ids = self._input_ids[i]
        labels = ids.clone()
        labels[: self._n_masked[i]] = IGNORE_INDEX
        return {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids), "labels": labels}

    def collate(self, items: list[dict]) -> dict:
        """Right-pad ``items`` into (B, T_max) tensors: ``input_ids`` with the pad id, ``attention_mask`` with
        0, ``labels`` with -100. Use as ``DataLoader(ds, collate_fn=ds.collate)``."""
        if not items:
            raise EmptyInputError("items must hold at least one item to collate")
        return {"input_ids": _pad_right([it["input_ids"] for it in items], self.tokenizer.pad_token_id),
                "attention_mask": _pad_right([it["attention_mask"] for it in items], 0),
                "labels": _pad_right([it["labels"] for it in items], IGNORE_INDEX)}

    def _check_length(self, i: int, length: int, max_length: int | None) -> None:
        if max_length is not None and length > max_length:
            raise ShapeError(f"record {i} encodes to {length} tokens, longer than max_length={max_length} (the "
                             "model's context length); shorten it or raise max_length")


def _check_max_length(max_length) -> int | None:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise InvalidInputError(f"max_length must be None or an integer >= 2, got {max_length!r}")
    return max_length


def _check_records(records) -> list[dict]:
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise InvalidInputError(f"records must be a list of dicts, got {type(records).__name__}")
    if len(records) == 0:
        raise EmptyInputError("records is empty: a QADataset needs at least one question-answer record")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInputError(f"records[{i}] must be a dict, got {type(record).__name__}")
        for field in ("question", "answer"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise InvalidInputError(f"records[{i}][{field!r}] must be a non-empty string, "
                                        f"got {record.get(field)!r}")
    return list(records)


class QADataset(_TokenizedDataset):
    """Question-answer records tokenized for a causal LM; the loss and the metrics see only the answer.

    Args:
        records: dicts with ``"question"`` and ``"answer"`` (non-empty strings); optional
            ``"paraphrased_answer"``, ``"perturbed_answers"`` and any other keys are kept in ``self.records``.
        tokenizer: a Hugging Face tokenizer with a pad and an eos token.
        max_length: if given, a record whose sequence is longer raises ``ShapeError`` (pass the model's
            context length).
        chat_template: use the tokenizer's chat template for the prompt (``None``: if it has one).

    Items are encoded once, here; ``self[i]`` returns fresh tensors.
    """

    def __init__(self, records: list[dict], tokenizer, *, max_length: int | None = None,
                 chat_template: bool | None = None):
        self.records = _check_records(records)
        check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = _check_max_length(max_length)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise InvalidInputError("chat_template=True but the tokenizer has no chat_template")
        self.chat_template = has_template if chat_template is None else bool(chat_template)
        self._prompts: list[torch.Tensor] = []
        self._answers: list[torch.Tensor] = []
        self._input_ids, self._n_masked = [], []
        eos = torch.tensor([tokenizer.eos_token_id])
        for i, record in enumerate(self.records):
            prompt = torch.tensor(self._prompt_tokens(record["question"]), dtype=torch.long)
            answer = torch.tensor(self._answer_tokens(i, record["answer"]), dtype=torch.long)
            self._check_length(i, len(prompt) + len(answer) + 1, self.max_length)
            self._prompts.append(prompt)
            self._answers.append(answer)
            self._input_ids.append(torch.cat([prompt, answer, eos]))
            self._n_masked.append(len(prompt))

    def _prompt_tokens(self, question: str) -> list[int]:
        if self.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                      add_generation_prompt=True, tokenize=False)
        else:
            text = PLAIN_PROMPT.format(question=question)
        return _with_bos(self.tokenizer, _encode(self.tokenizer, text))

    def _answer_tokens(self, i: int, answer: str) -> list[int]:
        ids = _encode(self.tokenizer, answer if self.chat_template else PLAIN_ANSWER_PREFIX + answer)
        if not ids:
            raise InvalidInputError(f"records[{i}]['answer'] encodes to no tokens: {answer!r}")
        return ids

    def prompt_ids(self, i: int) -> torch.Tensor:
        """The prompt alone (with bos), as fed to greedy generation: (T_prompt,) int64."""
        return self._prompts[i].clone()

    def answer_ids(self, i: int) -> torch.Tensor:
        """The answer's tokens, without the eos that ends the training sequence: (T_answer,) int64."""
        return self._answers[i].clone()

    def answer_text(self, i: int) -> str:
        return self.records[i]["answer"]

    def key(self, i: int) -> tuple[str, str]:
        """A content key, (question, answer) whitespace-normalised and case-folded: two records with the same
        key are the same example, whatever their other fields (used to refuse forget/retain overlap)."""
        return normalise_text(self.records[i]["question"]), normalise_text(self.records[i]["answer"])

    def with_answers(self, answers: list[str]) -> "QADataset":
        """The same questions with other answers (one per record), same tokenizer, ``max_length`` and prompt
        format: e.g. the paraphrased or one of the perturbed answers, for TOFU's truth ratio."""
        answers = list(answers)
        if len(answers) != len(self.records):
            raise ShapeError(f"answers must hold one answer per record ({len(self.records)}), got {len(answers)}")
        records = [{**record, "answer": answer} for record, answer in zip(self.records, answers)]
        return QADataset(records, self.tokenizer, max_length=self.max_length, chat_template=self.chat_template)


class TextDataset(_TokenizedDataset):
    """Plain texts tokenized for a causal LM as ``[bos] + text + [eos]``, every token a label (verbatim
    memorisation, RMU / ELM corpora). Same item format, ``collate`` and ``key`` as :class:`QADataset`."""

    def __init__(self, texts: list[str], tokenizer, *, max_length: int | None = None):
        if not isinstance(texts, Sequence) or isinstance(texts, (str, bytes)):
            raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise EmptyInputError("texts is empty: a TextDataset needs at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"texts[{i}] must be a non-empty string, got {text!r}")
        check_tokenizer(tokenizer)
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.max_length = _check_max_length(max_length)
        self._input_ids, self._n_masked = [], []
        for i, text in enumerate(self.texts):
            ids = _with_bos(tokenizer, _encode(tokenizer, text)) + [tokenizer.eos_token_id]
            self._check_length(i, len(ids), self.max_length)
            self._input_ids.append(torch.tensor(ids, dtype=torch.long))
            self._n_masked.append(0)

    def key(self, i: int) -> str:
        """The text whitespace-normalised and case-folded (content key, as :meth:`QADataset.key`)."""
        return normalise_text(self.texts[i])


def lm_dataset(texts: list[str], tokenizer, *, max_length: int | None = None) -> TextDataset:
    """A :class:`TextDataset` of ``texts``: every token is a label."""
    return TextDataset(texts, tokenizer, max_length=max_length)
