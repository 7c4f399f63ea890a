"""Each eval metric on hand-computed examples: normalisation, punctuation, yes/no variants."""

from __future__ import annotations

import pytest

from lmmtune.eval.metrics import (
    canonical_closed,
    closed_correct,
    exact_match,
    is_closed,
    normalize,
    open_recall,
    score_predictions,
    token_f1,
)
from lmmtune.eval.report import metric_items


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Left lung.", "left lung"),
        ("  A  mass,in the   RIGHT kidney!! ", "mass in right kidney"),
        ("an", ""),
        ("X-ray", "x ray"),
    ],
)
def test_normalize_lowercases_and_drops_punctuation_and_articles(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("yeah", "yes"),
        ("Present", "yes"),
        ("NO!", "no"),
        ("absent", "no"),
        ("No, there is none", "no"),
        ("left", "left"),
    ],
)
def test_yes_no_variants_fold_to_yes_and_no(text, expected):
    assert canonical_closed(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("Yes.", "yes", True),
        ("yes, there is a lesion", "Yes", True),
        ("Yeah", "yes", True),
        ("no", "yes", False),
        ("Left", "left", True),
        ("left side", "left", True),
        ("right", "left", False),
        ("", "yes", False),
        ("not sure", "no", False),  # "not" is not "no"
        ("left lung", "left lung", True),
        ("left", "left lung", False),  # a multi-word reference needs all of it
    ],
)
def test_closed_correct(prediction, reference, correct):
    assert closed_correct(prediction, reference) is correct


def test_open_recall_is_the_share_of_reference_tokens_in_the_prediction():
    assert open_recall("a mass in the left lung", "left lung mass") == 1.0
    assert open_recall("left lung", "mass in left lung") == 0.5  # 2 of mass, in, left, lung
    assert open_recall("Lung, left.", "left lung") == 1.0  # order and punctuation do not matter
    assert open_recall("", "left lung") == 0.0
    assert open_recall("lung lung", "lung lung lung") == pytest.approx(2 / 3)  # each token once


def test_exact_match_after_normalisation():
    assert exact_match("The left lung.", "left lung")
    assert not exact_match("left lung mass", "left lung")
    # Punctuation splits words (SQuAD's scripts delete it: "t2weighted", no match).
    assert exact_match("T2-weighted MRI", "t2 weighted mri")
    assert token_f1("X-ray/CT", "x ray ct") == 1.0


def test_token_f1_by_hand():
    # common 2; precision 2/2, recall 2/4 -> F1 = 2 * 1 * 0.5 / 1.5
    assert token_f1("left lung", "mass in left lung") == pytest.approx(2 / 3)
    # common 1 (lung); precision 1/3, recall 1/2 -> F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1("right lung nodule", "left lung") == pytest.approx(0.4)
    assert token_f1("kidney", "left lung") == 0.0
    assert token_f1("The.", "a") == 1.0  # both empty after normalisation


def test_closed_or_open_from_the_record_type_else_from_a_yes_no_reference():
    assert is_closed("left", "closed") and is_closed("left", "CLOSED")
    assert not is_closed("yes", "open")
    assert is_closed("Yes.", None) and is_closed("no", "PRES")  # unknown type: look at the answer
    assert not is_closed("left lung", None)


def test_score_predictions_aggregates_closed_open_and_by_type():
    predictions = ["Yes.", "no", "a mass in the left lung", "kidney"]
    references = ["yes", "yes", "left lung mass", "liver"]
    types = ["closed", "closed", "open", "open"]
    metrics, scores = score_predictions(predictions, references, types)
    assert metrics["accuracy"] == 0.5  # 1 of 2 closed right
    assert metrics["open_recall"] == 0.5  # (1.0 + 0.0) / 2
    assert metrics["exact_match"] == 0.25  # only "Yes." == "yes"
    # F1: 1, 0, ("mass in left lung" vs "left lung mass": p 3/4, r 3/3 -> 6/7), 0
    assert metrics["token_f1"] == pytest.approx((1 + 0 + 6 / 7 + 0) / 4)
    assert (metrics["samples"], metrics["closed_samples"], metrics["open_samples"]) == (4, 2, 2)
    assert metrics["by_type"]["closed"]["accuracy"] == 0.5
    assert metrics["by_type"]["open"]["open_recall"] == 0.5
    assert "accuracy" not in metrics["by_type"]["open"]  # no NaN for absent questions
    assert [s.correct for s in scores] == [True, False, True, False]


def test_no_breakdown_without_question_types_and_types_inferred():
    metrics, _ = score_predictions(["yes", "left"], ["yes", "left lung"], [None, None])
    assert "by_type" not in metrics
    assert metrics["accuracy"] == 1.0 and metrics["open_recall"] == 0.5


def test_metric_names_for_mlflow_are_flat_and_safe():
    items = metric_items(
        "eval_after", {"accuracy": 0.5, "by_type": {"what's (it)": {"accuracy": 1.0}}}
    )
    assert items == {"eval_after/accuracy": 0.5, "eval_after/by_type.what_s _it_.accuracy": 1.0}
