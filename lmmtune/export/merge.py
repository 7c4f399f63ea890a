"""Merge a (Q)LoRA adapter into an unquantized base, and check the merge by its logits.

The adapter trained on a 4-bit base is attached to the same base loaded unquantized
(bf16/fp16/fp32) and merged there: merging into 4-bit layers would round the weights.
Parity compares the saved, reloaded merged model with the adapter on that same
unquantized base, so it covers the merge, the trained projector and the save.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmmtune.data.batches import BatchBuilder
from lmmtune.data.records import Sample
from lmmtune.eval.generate import to_model
from lmmtune.finished_run import FinishedRun, load_merged_model

log = logging.getLogger(__name__)

PARITY_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
"""Largest logit difference relative to the largest logit, by dtype of the merged weights:
float32 only reorders sums; half precision rounds every merged weight once."""


@dataclass
class Parity:
    max_abs_diff: float
    """Largest |merged - adapter| logit over the checked tokens."""
    logit_scale: float
    """Largest |adapter| logit: what the difference is measured against."""
    relative_diff: float
    argmax_agreement: float
    """Share of tokens where both models predict the same next token."""
    tolerance: float
    samples: int
    tokens: int

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def parity_batch(processor, samples: list[Sample], max_image_pixels: int | None) -> dict:
    """Whole conversations (prompt and answer) with their images, right-padded; no labels
    (only the logits are compared)."""
    batch = BatchBuilder(processor, 10**9, max_image_pixels).batch(samples)
    del batch["labels"]
    return batch


@torch.no_grad()
def token_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Float32 logits of the real (unpadded) tokens, on the CPU: [tokens, vocab]."""
    model.eval()
    logits = model(**to_model(model, batch)).logits
    keep = batch["attention_mask"].bool()
    return logits[keep.to(logits.device)].float().cpu()


def compare_logits(
    reference: torch.Tensor, candidate: torch.Tensor, tolerance: float, samples: int
) -> Parity:
    diff = (candidate - reference).abs().max().item()
    scale = reference.abs().max().item()
    agreement = (candidate.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return Parity(
        max_abs_diff=diff,
        logit_scale=scale,
        relative_diff=diff / max(scale, 1e-12),
        argmax_agreement=agreement,
        tolerance=tolerance,
        samples=samples,
        tokens=reference.shape[0],
    )


def merge_and_save(
    run: FinishedRun, dtype: str, target: Path, processor, batch: dict | None
) -> torch.Tensor | None:
    """Load the run's base unquantized in `dtype`, attach and merge the adapter, save it.

    Returns the adapter model's logits on `batch` (taken before merging), for parity.
    """
    from lmmtune.model import torch_dtype

    model = run.load_model(unquantized_dtype=dtype)
    reference = token_logits(model, batch) if batch is not None else None
    merged = model.merge_and_unload()  # LoRA folded into the weights, projector copies swapped in
    merged.to(torch_dtype(dtype))
    merged.save_pretrained(target)
    processor.save_pretrained(target)
    log.info("merged %s into %s (%s) and saved %s", run.adapter, run.base_model, dtype, target)
    del merged, model
    gc.collect()
    return reference


def load_exported(path: Path, dtype: str):
    """The export as a user loads it (plain transformers, no lmmtune code involved), in `dtype`."""
    from lmmtune.model import torch_dtype

    return load_merged_model(path, torch_dtype(dtype))
