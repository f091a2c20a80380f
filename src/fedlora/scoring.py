"""Scorers of a causal LM's held-out answers: one registry, pure functions of text (torch-free, so the config
can list the names). `eval.scorer` (and `fedlora eval --scorer`) picks one; docs/configuration.md defines each.

Generation scorers compare a greedy generation with the reference answer and give 0..1 per example:
- ``label-match`` (the default, unchanged from before scorers existed): the normalised generation equals the
  normalised answer or starts with it followed by a space ("positive review" matches "positive").
- ``exact-match``: the two are equal after `normalise_answer` (case, punctuation, articles, whitespace, numbers).
- ``rouge-l``: ROUGE-L F1 (longest common subsequence of words), from Google's `rouge-score` package.
``multiple-choice`` generates nothing: it compares the log-likelihood of each option as the completion of the
prompt (the lm-evaluation-harness way) and reports acc and acc_norm; tasks/choice_scoring.py computes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from fedlora.errors import UserError

ARTICLES = frozenset({"a", "an", "the"})
# A number: optional sign (not after a word or a digit: "3-4" is two numbers), thousands groups or digits, an
# optional decimal part. Tried before words, so "1,000.50" is one token.
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
_TOKEN = re.compile(rf"{_NUMBER}|[^\W_]+")


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: how label-match compares answers (as before scorers)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def label_match(generated: str, answer: str) -> float:
    g, a = normalise(generated), normalise(answer)
    return float(bool(a) and (g == a or g.startswith(a + " ")))


def canonical_number(token: str) -> str:
    """'1,000' -> '1000', '3.50' -> '3.5', '2.0' -> '2', '-0' -> '0': one spelling per value."""
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return token
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def normalise_answer(text: str) -> str:
    """exact-match's normal form: lower case; numbers in one spelling (`canonical_number`); every other
    character that is not a letter or digit (punctuation, underscores, symbols) is a separator; the articles
    a/an/the dropped; words joined by single spaces. SQuAD's normalisation plus numbers."""
    tokens = _TOKEN.findall(text.lower())
    words = [canonical_number(t) if t[-1].isdigit() else t for t in tokens]
    return " ".join(w for w in words if w not in ARTICLES)


def exact_match(generated: str, answer: str) -> float:
    a = normalise_answer(answer)
    return float(bool(a) and normalise_answer(generated) == a)


def rouge_l(generated: str, answer: str) -> float:
    """ROUGE-L F1 of the generation against the answer (rouge-score's tokenizer: lower case, letters and
    digits only; no stemming)."""
    return _rouge_scorer().score(answer, generated)["rougeL"].fmeasure


_ROUGE: list = []


def _rouge_scorer():
    if not _ROUGE:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise UserError("eval.scorer=rouge-l needs the rouge-score package: pip install 'fedlora[instruct]'") \
                from None
        _ROUGE.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False))
    return _ROUGE[0]


GENERATION_SCORERS: dict[str, Callable[[str, str], float]] = {
    "label-match": label_match,
    "exact-match": exact_match,
    "rouge-l": rouge_l,
}
LIKELIHOOD_SCORERS = ("multiple-choice",)
SCORER_NAMES = (*GENERATION_SCORERS, *LIKELIHOOD_SCORERS)
DEFAULT_SCORER = "label-match"


def generation_scorer(name: str) -> Callable[[str, str], float]:
    if name not in GENERATION_SCORERS:
        raise UserError(f"{name!r} is not a generation scorer; known: {', '.join(GENERATION_SCORERS)}")
    if name == "rouge-l":
        _rouge_scorer()  # a missing package is refused before any generation runs
    return GENERATION_SCORERS[name]


def check_scorer(name: str) -> str:
    if name not in SCORER_NAMES:
        raise UserError(f"unknown scorer {name!r}; known: {', '.join(SCORER_NAMES)}")
    return name
