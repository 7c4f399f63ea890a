"""Answer metrics as medical VQA papers (LLaVA-Med, on VQA-RAD, SLAKE, PathVQA) report them.

- closed questions (yes/no and other fixed choices): accuracy, after normalisation and
  with yes/no variants folded ("Yes.", "yeah" -> yes);
- open questions: recall, the share of the reference's tokens found in the prediction;
- every question: exact match and token F1 (SQuAD-style, on normalised tokens).

A question is closed when its record says so (`question_type` "closed"/"open"), else when
its reference answer is yes or no.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

YES = {"yes", "y", "true", "yeah", "yep", "correct", "positive", "present"}
NO = {"no", "n", "false", "nope", "incorrect", "negative", "absent", "none"}
CLOSED_TYPES = {"closed", "close", "yes/no", "yesno", "yes_no"}
OPEN_TYPES = {"open", "other", "free", "free-form"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def canonical_closed(text: str) -> str:
    """Normalised answer with yes/no variants folded to `yes`/`no` (the first word decides)."""
    normalized = normalize(text)
    first = normalized.split(" ", 1)[0] if normalized else ""
    if first in YES:
        return "yes"
    if first in NO:
        return "no"
    return normalized


def is_closed(reference: str, question_type: str | None = None) -> bool:
    """Closed when the record's type says so; without a closed/open type, when the reference is yes/no."""
    kind = (question_type or "").strip().lower()
    if kind in CLOSED_TYPES:
        return True
    if kind in OPEN_TYPES:
        return False
    return normalize(reference) in ("yes", "no")


def closed_correct(prediction: str, reference: str) -> bool:
    """Right when the canonical forms are equal, or the one-word reference is the prediction's first word."""
    pred, ref = canonical_closed(prediction), canonical_closed(reference)
    return pred == ref or (bool(ref) and " " not in ref and pred.split(" ", 1)[0] == ref)


def open_recall(prediction: str, reference: str) -> float:
    """Share of the reference's tokens present in the prediction (each prediction token counts once)."""
    ref, pred = Counter(tokens(reference)), Counter(tokens(prediction))
    if not ref:
        return float(not pred)
    return sum((ref & pred).values()) / sum(ref.values())


# Own EM/F1, not torchmetrics' `squad`: it deletes punctuation ("X-ray" -> "xray", EM 0 against
# "x ray"), we split on it; `evaluate` loads its SQuAD script from the Hub (not offline).
def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD); 1.0 when both are empty."""
    ref, pred = Counter(tokens(reference)), Counter(tokens(prediction))
    if not ref or not pred:
        return float(ref == pred)
    common = sum((ref & pred).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


@dataclass
class SampleScore:
    closed: bool
    correct: bool
    """Closed: `closed_correct`; open: every reference token is in the prediction (recall 1)."""
    exact_match: bool
    token_f1: float
    recall: float


def score_sample(prediction: str, reference: str, question_type: str | None = None) -> SampleScore:
    closed = is_closed(reference, question_type)
    recall = open_recall(prediction, reference)
    return SampleScore(
        closed=closed,
        correct=closed_correct(prediction, reference) if closed else recall == 1.0,
        exact_match=exact_match(prediction, reference),
        token_f1=token_f1(prediction, reference),
        recall=recall,
    )


def aggregate(scores: list[SampleScore]) -> dict[str, float]:
    """`accuracy` (closed questions), `open_recall` (open ones), `exact_match`, `token_f1`, counts.

    A metric whose questions are absent (no open question: no `open_recall`) is left out
    rather than written as NaN.
    """
    closed = [s for s in scores if s.closed]
    opened = [s for s in scores if not s.closed]
    metrics: dict[str, float] = {}
    if closed:
        metrics["accuracy"] = _mean(s.correct for s in closed)
    if opened:
        metrics["open_recall"] = _mean(s.recall for s in opened)
    if scores:
        metrics["exact_match"] = _mean(s.exact_match for s in scores)
        metrics["token_f1"] = _mean(s.token_f1 for s in scores)
    metrics.update(
        samples=float(len(scores)),
        closed_samples=float(len(closed)),
        open_samples=float(len(opened)),
    )
    return metrics


def score_predictions(
    predictions: list[str], references: list[str], question_types: list[str | None]
) -> tuple[dict, list[SampleScore]]:
    """Overall metrics, a `by_type` breakdown when the data names question types, and per-sample scores."""
    scores = [
        score_sample(p, r, t)
        for p, r, t in zip(predictions, references, question_types, strict=True)
    ]
    metrics: dict = aggregate(scores)
    if any(t is not None for t in question_types):
        groups: dict[str, list[SampleScore]] = {}
        for score, kind in zip(scores, question_types, strict=True):
            groups.setdefault(kind if kind is not None else "unknown", []).append(score)
        metrics["by_type"] = {kind: aggregate(group) for kind, group in sorted(groups.items())}
    return metrics, scores


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)
