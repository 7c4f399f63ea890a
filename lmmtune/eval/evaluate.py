"""Evaluate a model on held-out samples: generate answers, score them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmmtune.config import EvalConfig
from lmmtune.data.records import Sample
from lmmtune.eval.generate import generate_answers
from lmmtune.eval.metrics import closed_accuracy


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[str]


def evaluate(
    model: torch.nn.Module, processor, samples: list[Sample], eval_cfg: EvalConfig, desc: str
) -> EvalResult:
    predictions = generate_answers(
        model, processor, samples, eval_cfg.max_new_tokens, eval_cfg.batch_size, desc=desc
    )
    references = [sample.turns[-1][1] for sample in samples]
    metrics = {"accuracy": closed_accuracy(predictions, references), "samples": float(len(samples))}
    return EvalResult(metrics=metrics, predictions=predictions)
