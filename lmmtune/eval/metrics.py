"""Answer metrics as medical VQA papers report them."""

from __future__ import annotations

import re
import string

YES = {"yes", "y", "true", "yeah", "yep", "correct", "positive", "present"}
NO = {"no", "n", "false", "nope", "incorrect", "negative", "absent", "none"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def canonical_closed(text: str) -> str:
    """Normalised answer with yes/no variants folded to `yes`/`no` (first word decides)."""
    normalized = normalize(text)
    first = normalized.split(" ", 1)[0] if normalized else ""
    if first in YES:
        return "yes"
    if first in NO:
        return "no"
    return normalized


def closed_correct(prediction: str, reference: str) -> bool:
    """A closed answer is right when its canonical form equals the reference's,
    or when the reference is a single word and it is the prediction's first word."""
    pred, ref = canonical_closed(prediction), canonical_closed(reference)
    return pred == ref or (" " not in ref and pred.split(" ", 1)[0] == ref)


def closed_accuracy(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(closed_correct(p, r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)
