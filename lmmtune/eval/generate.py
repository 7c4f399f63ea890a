"""Evaluate a model: batched greedy answers to held-out questions, scored.

Batched greedy answers to each sample's last question (left padding).

The batch is `BatchBuilder`'s: the prompt training used (Vicuna v1, image tokens
expanded) and images padded to a square the same way.

Evaluate a model on held-out samples: generate answers greedily, score them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lmmtune.config import EvalConfig
from lmmtune.data.batches import BatchBuilder
from lmmtune.data.records import Sample
from lmmtune.eval.metrics import SampleScore, score_predictions


def to_model(model: torch.nn.Module, batch: dict) -> dict:
    """Move a batch to the model's device, and the pixels to the vision tower's dtype."""
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    vision_dtype = next(
        (
            p.dtype
            for n, p in model.named_parameters()
            if "vision_tower" in n and p.is_floating_point()
        ),
        model.get_input_embeddings().weight.dtype,
    )
    moved = {key: value.to(device) for key, value in batch.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(vision_dtype)
    return moved


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor,
    samples: list[Sample],
    max_new_tokens: int,
    batch_size: int,
    max_image_pixels: int | None,
    desc: str = "generating",
) -> list[str]:
    """Each sample's greedy answer to its last question, `batch_size` prompts at a time."""
    build = BatchBuilder(processor, max_length=10**9, max_image_pixels=max_image_pixels)
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    answers: list[str] = []
    bars = tqdm(range(0, len(samples), batch_size), desc=desc, leave=False, disable=None)
    for start in bars:  # disable=None: a bar on a terminal, none in a file or pipe
        batch = to_model(model, build.batch(samples[start : start + batch_size], prompt=True))
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers.extend(
            text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        )
    model.train(was_training)
    return answers


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
