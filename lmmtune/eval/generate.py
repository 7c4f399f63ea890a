"""Evaluate a model: batched greedy answers to held-out questions, scored.

Each sample's last question is answered greedily, `batch_size` prompts at a time (left
padding). The batch is `BatchBuilder`'s: the prompt training used (Vicuna v1, image
tokens expanded) and images padded to a square the same way. Questions about one image
start from its prompt prefix, run once (`lmmtune.eval.image_prefix`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from lmmtune.config import EvalConfig
from lmmtune.data.batches import BatchBuilder
from lmmtune.data.records import Sample
from lmmtune.eval.image_prefix import ImagePrefixes, plan_answers
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
    share_image_prefix: bool = True,
) -> list[str]:
    """Each sample's greedy answer to its last question, in input order, `batch_size`
    prompts at a time; with `share_image_prefix`, the questions about one image together
    (`lmmtune.eval.image_prefix`)."""
    build = BatchBuilder(processor, max_length=10**9, max_image_pixels=max_image_pixels)
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    answers = [""] * len(samples)
    # disable=None: a bar on a terminal, none in a file or pipe
    with tqdm(total=len(samples), desc=desc, leave=False, disable=None) as bar:
        for indices, batch, cache in answer_batches(
            model, build, samples, batch_size, share_image_prefix
        ):
            output = model.generate(
                **batch,
                **({} if cache is None else {"cache": cache, "use_cache": True}),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(indices, texts, strict=True):
                answers[index] = text.strip()
            bar.update(len(indices))
    model.train(was_training)
    return answers


def answer_batches(
    model, build: BatchBuilder, samples: list[Sample], batch_size: int, share_image_prefix: bool
) -> Iterator[tuple[list[int], dict, DynamicCache | None]]:
    """(sample indices, their batch on the model's device, the cache it continues or None)
    for every sample: per question in input order, then the questions about each image."""
    plan = plan_answers(samples, share_image_prefix)
    for start in range(0, len(plan.per_question), batch_size):
        indices = plan.per_question[start : start + batch_size]
        yield (
            indices,
            to_model(model, build.batch([samples[i] for i in indices], prompt=True)),
            None,
        )
    if plan.per_image:
        yield from per_image_batches(
            model, ImagePrefixes(build, samples, plan.per_image), batch_size
        )


def per_image_batches(
    model, prefixes: ImagePrefixes, batch_size: int
) -> Iterator[tuple[list[int], dict, DynamicCache | None]]:
    """The questions image by image, `batch_size` at a time; each image's prefix runs once
    (the first batch that asks about it), the images new to a batch together."""
    order, build = prefixes.order, prefixes.build
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        if prefixes.length is None:  # nothing to share: whole prompts
            samples = [prefixes.samples[i] for i in indices]
            yield indices, to_model(model, build.batch(samples, prompt=True)), None
            continue
        if new := prefixes.missing(indices):
            prefill = to_model(model, prefixes.prefix_batch(new))
            prefixes.keep(new, model(**prefill, use_cache=True, logits_to_keep=1).cache)
        batch = to_model(model, prefixes.continuation_batch(indices))
        yield indices, batch, prefixes.cache_for(indices)
        prefixes.forget_before(indices[-1])


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
        share_image_prefix=eval_cfg.share_image_prefix,
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
