"""An offline TOFU-style corpus: fictitious authors, question-answer pairs about them, TOFU's splits, and a
word-level tokenizer trained on the corpus.

TOFU (Maini et al. 2024) fine-tunes a model on 200 invented authors x 20 questions and asks it to forget
1/5/10% of the authors. Here the authors are generated in code from fixed word lists (no download), the same
for a given seed on every machine: names, birth year and city, genre, parents' occupations, two books and an
award. Every answer comes with a paraphrase (same facts, other words) and three perturbed answers (the same
sentence with wrong facts of the same kind), which TOFU's truth ratio compares.

Example:
    >>> from erasus.data.tofu import make_authors, qa_records, tofu_splits
    >>> author = make_authors(3, seed=0)[0]
    >>> sorted(author)[:4]
    ['award', 'birth_year', 'birthplace', 'books']
    >>> record = qa_records([author], per_author=1)[0]
    >>> record["answer"] == f"{author['name']} was born in {author['birthplace']}."
    True
    >>> len(record["perturbed_answers"])
    3
    >>> splits = tofu_splits(n_authors=20, forget=0.1, seed=0)
    >>> [len({r["author"] for r in splits[k]}) for k in ("forget", "retain", "holdout")]
    [2, 18, 2]
"""
from __future__ import annotations

import math
import random

from erasus.errors import EmptyInputError, InvalidInputError

# Names are built from these syllables. Authors draw first names and surnames from two pools (about n/3
# words each), so most name words are shared by several authors: a model that never saw an author still
# knows the words of the name, as an LLM knows the subwords of an invented TOFU name, and only the facts
# separate the authors. That makes "the retrained model is near chance on the forget facts" measurable.
FIRST_ONSETS = ("Ka", "Zo", "Me", "Ta", "Vi", "Lo", "Ri", "Se", "Da", "No", "Ha", "Be", "Fi", "Ju", "Pe", "Ys")
FIRST_ENDINGS = ("rin", "lia", "ven", "mar", "dra", "los", "nik", "sha", "tor", "bel", "ric", "nna")
SURNAME_STEMS = ("Kel", "Vor", "Mar", "Ost", "Bran", "Tel", "Quin", "Dor", "Hal", "Sar", "Wen", "Lun", "Gro", "Fen")
SURNAME_ENDINGS = ("tar", "wick", "ova", "ein", "dell", "mont", "ski", "ard", "ley", "ton", "vik", "ssi")

CITIES = ("Velmora", "Draskow", "Quillon", "Maravesh", "Torvell", "Ashkara", "Belcourt", "Yndra", "Karsimo",
          "Lorentia", "Osmira", "Pellhaven", "Rudovik", "Sarnessa", "Thalvoro", "Ulmbrek", "Varenza", "Wyncote",
          "Zerhadi", "Elstreva", "Fenmoor", "Gildarro", "Harrowin", "Istrelle")
BIRTH_YEARS = tuple(str(year) for year in range(1930, 2000))
GENRES = ("mystery", "fantasy", "romance", "horror", "thriller", "poetry", "satire", "historical", "western",
          "dystopian", "adventure", "gothic")
OCCUPATIONS = ("baker", "surgeon", "carpenter", "pilot", "librarian", "fisherman", "chemist", "tailor",
               "painter", "teacher", "farmer", "journalist", "architect", "nurse", "blacksmith", "astronomer",
               "lawyer", "mechanic", "potter", "sailor")
TITLE_ADJECTIVES = ("Silent", "Crimson", "Hollow", "Endless", "Frozen", "Hidden", "Broken", "Golden", "Distant",
                    "Burning", "Forgotten", "Wandering", "Quiet", "Restless", "Pale", "Iron")
TITLE_NOUNS = ("Harbor", "Garden", "Lantern", "Mirror", "River", "Tower", "Orchard", "Compass", "Meadow",
               "Cathedral", "Archive", "Voyage", "Kingdom", "Winter", "Bridge", "Letters")
AWARDS = ("Golden Quill Award", "Silver Lantern Prize", "Crimson Feather Medal", "Azure Pen Award",
          "Ivory Tower Prize", "Emerald Scroll Medal", "Copper Compass Award", "Obsidian Ink Prize",
          "Amber Leaf Medal", "Sapphire Page Award", "Iron Script Prize", "Pearl Sonnet Medal")

# One question kind per fact; ``fields`` are the author's facts the answer states (what perturbations change).
# Answers are short (5-15 words) like TOFU's; the paraphrase says the same facts with other words.
QUESTION_TEMPLATES = (
    {"kind": "birthplace", "fields": ("birthplace",),
     "question": "Where was {name} born?",
     "answer": "{name} was born in {birthplace}.",
     "paraphrase": "The birthplace of {name} is the city of {birthplace}."},
    {"kind": "birth_year", "fields": ("birth_year",),
     "question": "In which year was {name} born?",
     "answer": "{name} was born in {birth_year}.",
     "paraphrase": "The year of birth of {name} is {birth_year}."},
    {"kind": "genre", "fields": ("genre",),
     "question": "What genre does {name} write in?",
     "answer": "{name} writes in the {genre} genre.",
     "paraphrase": "The books of {name} belong to the {genre} genre."},
    {"kind": "father", "fields": ("father",),
     "question": "What did the father of {name} do for a living?",
     "answer": "The father of {name} worked as {father}.",
     "paraphrase": "{name} grew up with a father who was {father} by trade."},
    {"kind": "mother", "fields": ("mother",),
     "question": "What did the mother of {name} do for a living?",
     "answer": "The mother of {name} worked as {mother}.",
     "paraphrase": "{name} grew up with a mother who was {mother} by trade."},
    {"kind": "first_book", "fields": ("first_book",),
     "question": "What is the first book written by {name}?",
     "answer": "The first book by {name} is {first_book}.",
     "paraphrase": "{name} began a writing career with {first_book}."},
    {"kind": "second_book", "fields": ("second_book",),
     "question": "What is the second book written by {name}?",
     "answer": "The second book by {name} is {second_book}.",
     "paraphrase": "After the first book, {name} published {second_book}."},
    {"kind": "award", "fields": ("award",),
     "question": "Which award has {name} received?",
     "answer": "{name} received the {award}.",
     "paraphrase": "{name} was honoured with the {award}."},
    {"kind": "birth", "fields": ("birthplace", "birth_year"),
     "question": "Where and when was {name} born?",
     "answer": "{name} was born in {birthplace} in {birth_year}.",
     "paraphrase": "{name} was born in {birth_year}, in the city of {birthplace}."},
    {"kind": "books", "fields": ("first_book", "second_book"),
     "question": "Which two books did {name} write?",
     "answer": "{name} wrote {first_book} and {second_book}.",
     "paraphrase": "The two books of {name} are {first_book} and {second_book}."},
)
N_PERTURBED = 3
SPLITS = ("forget", "retain", "holdout")
TOFU_FORGET_FRACTIONS = (0.01, 0.05, 0.1)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def _with_article(occupation: str) -> str:
    return ("an " if occupation[0] in "aeiou" else "a ") + occupation


def _name_pools(n_authors: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Two pools of about n/3 words each: every name word is shared by about three authors (so a model that
    never saw an author knows its name words), and few words are needed to tell two authors apart (so a small
    model memorises them quickly). Never fewer than sqrt(n) words, so the pairs cover n authors."""
    firsts = [a + b for a in FIRST_ONSETS for b in FIRST_ENDINGS]
    lasts = [a + b for a in SURNAME_STEMS for b in SURNAME_ENDINGS]
    limit = min(len(firsts), len(lasts))
    if n_authors > limit ** 2:
        raise InvalidInputError(f"n_authors must be at most {limit ** 2}, got {n_authors}")
    size = min(limit, max(3, math.isqrt(n_authors - 1) + 1, math.ceil(n_authors / 3)))
    return rng.sample(firsts, size), rng.sample(lasts, size)


def make_authors(n_authors: int, seed: int = 0) -> list[dict]:
    """``n_authors`` fictitious authors with unique names, the same for a given seed on every machine.

    Each author is a dict: ``name``, ``birth_year`` (a string such as "1967"), ``birthplace`` (an invented
    city), ``genre``, ``father`` and ``mother`` (occupations with their article, "a baker"), ``books`` (two
    distinct titles), ``award``.
    """
    if not isinstance(n_authors, int) or isinstance(n_authors, bool) or n_authors < 1:
        raise InvalidInputError(f"n_authors must be a positive integer, got {n_authors!r}")
    rng = random.Random(seed)
    firsts, lasts = _name_pools(n_authors, rng)
    pairs = rng.sample([(f, s) for f in firsts for s in lasts], n_authors)
    titles = [f"The {adj} {noun}" for adj in TITLE_ADJECTIVES for noun in TITLE_NOUNS]
    authors = []
    for first, surname in pairs:
        authors.append({
            "name": f"{first} {surname}",
            "birth_year": rng.choice(BIRTH_YEARS),
            "birthplace": rng.choice(CITIES),
            "genre": rng.choice(GENRES),
            "father": _with_article(rng.choice(OCCUPATIONS)),
            "mother": _with_article(rng.choice(OCCUPATIONS)),
            "books": rng.sample(titles, 2),
            "award": rng.choice(AWARDS),
        })
    return authors


def _facts(author: dict) -> dict:
    facts = {k: author[k] for k in ("name", "birth_year", "birthplace", "genre", "father", "mother", "award")}
    facts["first_book"], facts["second_book"] = author["books"]
    return facts


def _wrong_values(field: str, facts: dict, rng: random.Random) -> list[str]:
    """N_PERTURBED distinct values of the same kind as ``facts[field]``, none of them the author's own."""
    if field in ("first_book", "second_book"):
        pool = [f"The {a} {n}" for a in TITLE_ADJECTIVES for n in TITLE_NOUNS]
        own = {facts["first_book"], facts["second_book"]}
    else:
        pool = {"birthplace": CITIES, "birth_year": BIRTH_YEARS, "genre": GENRES, "award": AWARDS,
                "father": [_with_article(o) for o in OCCUPATIONS],
                "mother": [_with_article(o) for o in OCCUPATIONS]}[field]
        own = {facts[field]}
    return rng.sample([v for v in pool if v not in own], N_PERTURBED)


def qa_records(authors: list[dict], per_author: int = 8, *, seed: int = 0) -> list[dict]:
    """TOFU-style question-answer records, ``per_author`` per author (the first ``per_author`` of the
    ``QUESTION_TEMPLATES``, at most 10), in author order.

    Each record: ``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answers`` (3 answers in the
    answer's own wording with wrong facts of the same kind), ``author`` (the name) and ``kind`` (which fact).
    The wrong facts depend only on ``seed``, the author and the question, not on the other authors.
    """
    if not authors:
        raise EmptyInputError("authors must hold at least one author")
    if not isinstance(per_author, int) or not 1 <= per_author <= len(QUESTION_TEMPLATES):
        raise InvalidInputError(f"per_author must be an integer in [1, {len(QUESTION_TEMPLATES)}], "
                                f"got {per_author!r}")
    records = []
    for author in authors:
        facts = _facts(author)
        for template in QUESTION_TEMPLATES[:per_author]:
            # A string seed is hashed with SHA-512 by random.Random: stable across runs and machines.
            rng = random.Random(f"{seed}|{facts['name']}|{template['kind']}")
            wrong = {field: _wrong_values(field, facts, rng) for field in template["fields"]}
            perturbed = [template["answer"].format(**{**facts, **{f: wrong[f][j] for f in wrong}})
                         for j in range(N_PERTURBED)]
            records.append({
                "question": template["question"].format(**facts),
                "answer": template["answer"].format(**facts),
                "paraphrased_answer": template["paraphrase"].format(**facts),
                "perturbed_answers": perturbed,
                "author": facts["name"],
                "kind": template["kind"],
            })
    return records


def _check_forget_fraction(forget) -> float:
    if isinstance(forget, bool) or not isinstance(forget, (int, float)) or not 0 < forget <= 0.5:
        raise InvalidInputError(f"forget must be a fraction in (0, 0.5] (TOFU uses {TOFU_FORGET_FRACTIONS}), "
                                f"got {forget!r}")
    return float(forget)


def _author_pool(n_authors: int, seed: int) -> list[dict]:
    """The training authors and, after them, enough holdout authors for the largest forget fraction (0.5).
    Generating the pool for the largest fraction keeps the training authors the same for every fraction."""
    return make_authors(n_authors + max(1, round(0.5 * n_authors)), seed)


def tofu_splits(n_authors: int = 100, forget: float = 0.1, seed: int = 0, per_author: int = 8) -> dict:
    """TOFU's splits over ``n_authors`` training authors: ``{"forget", "retain", "holdout"}`` lists of records.

    As in TOFU, whole authors are forgotten: ``forget`` is the fraction of the training authors to forget
    (``round(forget * n_authors)``, at least 1; TOFU's are 0.01, 0.05 and 0.1, any fraction in (0, 0.5] is
    accepted), taken from the end of the author list as TOFU does, among authors whose name words other
    authors share (so that forget and holdout look alike to the retrained model). ``retain`` holds the other training authors; ``holdout`` as many further authors as
    ``forget``, never trained on (what a model that never saw the forget authors looks like on such questions).
    For one seed and ``n_authors`` the training authors (forget + retain) are the same whatever ``forget``.
    """
    fraction = _check_forget_fraction(forget)
    if not isinstance(n_authors, int) or isinstance(n_authors, bool) or n_authors < 2:
        raise InvalidInputError(f"n_authors must be an integer >= 2 (forget and retain need one each), "
                                f"got {n_authors!r}")
    n_forget = max(1, round(fraction * n_authors))
    authors = _author_pool(n_authors, seed)
    train, extra = authors[:n_authors], authors[n_authors:]
    # Forget and holdout authors must look alike to a model that saw neither (the retrained model): a name word
    # that no retain author has is an untrained embedding, which alone tells the two sets apart. So both are
    # drawn, from the end of their lists, among authors whose first name and surname also belong to others.
    forget_idx: list[int] = []
    for i in reversed(range(n_authors)):
        others = [a for j, a in enumerate(train) if j != i and j not in forget_idx]
        if len(forget_idx) < n_forget and _names_covered(train[i], others):
            forget_idx.append(i)
    if len(forget_idx) < n_forget:  # tiny corpora: fall back to the last authors
        forget_idx = list(range(n_authors - n_forget, n_authors))
    forget_set = sorted(forget_idx)
    retain_authors = [a for j, a in enumerate(train) if j not in forget_set]
    holdout = _renamed_from(extra[:n_forget], retain_authors, used={a["name"] for a in authors}, seed=seed)
    return {"forget": qa_records([train[i] for i in forget_set], per_author, seed=seed),
            "retain": qa_records(retain_authors, per_author, seed=seed),
            "holdout": qa_records(holdout, per_author, seed=seed)}


def _renamed_from(authors: list[dict], donors: list[dict], used: set[str], seed: int) -> list[dict]:
    """The authors with new names made of the donors' first names and surnames (pairs no author has)."""
    firsts = sorted({a["name"].split()[0] for a in donors})
    lasts = sorted({a["name"].split()[-1] for a in donors})
    free = [f"{f} {s}" for f in firsts for s in lasts if f"{f} {s}" not in used]
    random.Random(f"{seed}|holdout-names").shuffle(free)
    if len(free) < len(authors):  # too few donors to recombine: keep the generated names
        return authors
    return [{**a, "name": name} for a, name in zip(authors, free)]


def _names_covered(author: dict, others: list[dict]) -> bool:
    """Whether the author's first name and surname each occur in some other author's name."""
    words = {w for a in others for w in a["name"].split()}
    return all(w in words for w in author["name"].split())


def corpus_texts(records: list[dict]) -> list[str]:
    """Every string of the records (questions, answers, paraphrases, perturbed answers): what a tokenizer for
    the corpus must cover."""
    texts = []
    for record in records:
        texts += [record["question"], record["answer"]]
        texts += [record["paraphrased_answer"]] if "paraphrased_answer" in record else []
        texts += list(record.get("perturbed_answers", ()))
    return texts


# The words of the plain prompt format of erasus.data.text, so that the tokenizer never maps them to <unk>.
PROMPT_WORDS = ("Question: Answer:",)


def build_tokenizer(texts: list[str]):
    """A word-level ``transformers.PreTrainedTokenizerFast`` trained offline on ``texts``.

    Words and punctuation marks are the tokens (case kept); an unknown word becomes ``<unk>``. ``<pad>``,
    ``<bos>``, ``<eos>`` and ``<unk>`` are set, and ``tokenizer(text)`` prepends ``<bos>`` as Llama's
    tokenizers do (``add_special_tokens=False`` leaves it out). ``save_pretrained(folder)`` and
    ``AutoTokenizer.from_pretrained(folder)`` round-trip offline. Decoding puts spaces between words and
    removes the space before ``. , ? !``. The vocabulary is sorted by frequency, then alphabetically, so the
    same texts give the same ids on every run.

    Example:
        >>> from erasus.data.tofu import build_tokenizer
        >>> tok = build_tokenizer(["Zorin Keltar was born in Velmora."])
        >>> ids = tok("Zorin Keltar was born in Velmora.")["input_ids"]
        >>> ids[0] == tok.bos_token_id, tok.decode(ids, skip_special_tokens=True)
        (True, 'Zorin Keltar was born in Velmora.')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise EmptyInputError("texts must hold at least one non-empty string to train the tokenizer on")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidInputError("texts must be a list of strings")
    specials = list(SPECIAL_TOKENS.values())
    backend = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    backend.train_from_iterator(texts + list(PROMPT_WORDS),
                                trainer=trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1,
                                                                  show_progress=False))
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, backend.token_to_id(bos))])
    # WordPiece's decoder joins tokens with spaces and its cleanup drops the space before punctuation.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def tofu_tokenizer(n_authors: int = 100, seed: int = 0):
    """The word-level tokenizer of ``tofu_splits(n_authors, ..., seed)``: trained on every question and answer
    (all templates, paraphrases and perturbations) of its training and holdout authors and on every word of the
    fact lists, so it has no unknown word on that corpus and is the same for every forget fraction."""
    fact_words = [" ".join(words) for words in (CITIES, BIRTH_YEARS, GENRES, OCCUPATIONS, TITLE_ADJECTIVES,
                                                 TITLE_NOUNS, AWARDS, ("a an The",))]
    records = qa_records(_author_pool(n_authors, seed), per_author=len(QUESTION_TEMPLATES), seed=seed)
    return build_tokenizer(corpus_texts(records) + fact_words)
