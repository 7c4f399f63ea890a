"""Evaluate a model on held-out samples: generate answers greedily, score them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from lmmtune.config import EvalConfig
from lmmtune.data.records import Sample
from lmmtune.eval.generate import generate_answers
from lmmtune.eval.metrics import SampleScore, score_predictions

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict
    """`accuracy` (closed questions), `open_recall`, `exact_match`, `token_f1`, counts, `by_type`."""
    predictions: list[str]
    scores: list[SampleScore] = field(default_factory=list)


def evaluate(
    model: torch.nn.Module,
    processor,
    samples: list[Sample],
    eval_cfg: EvalConfig,
    max_image_pixels: int | None,
    desc: str,
) -> EvalResult:
    predictions = generate_answers(
        model,
        processor,
        samples,
        eval_cfg.max_new_tokens,
        eval_cfg.batch_size,
        max_image_pixels,
        desc=desc,
    )
    metrics, scores = score_predictions(
        predictions, references(samples), [s.question_type for s in samples]
    )
    return EvalResult(metrics=metrics, predictions=predictions, scores=scores)


def evaluate_adapter(
    model, processor, samples: list[Sample], eval_cfg: EvalConfig, max_image_pixels: int | None
) -> tuple[EvalResult | None, EvalResult | None]:
    """Before (adapter and trained projector switched off) and after, on one PeftModel."""
    before = after = None
    if eval_cfg.before:
        with model.disable_adapter():
            before = evaluate(model, processor, samples, eval_cfg, max_image_pixels, "eval before")
        log.info("eval before (base model): %s", summary(before.metrics))
    if eval_cfg.after:
        after = evaluate(model, processor, samples, eval_cfg, max_image_pixels, "eval after")
        log.info("eval after (adapter): %s", summary(after.metrics))
    return before, after


def references(samples: list[Sample]) -> list[str]:
    """The reference answer of each sample's last question (the one generation answers)."""
    return [sample.turns[-1][1] for sample in samples]


def summary(metrics: dict) -> str:
    """One line of the headline numbers, for the log."""
    keys = ("accuracy", "open_recall", "exact_match", "token_f1")
    shown = [f"{key} {metrics[key]:.3f}" for key in keys if key in metrics]
    return ", ".join(shown) + f" on {int(metrics.get('samples', 0))} samples"
