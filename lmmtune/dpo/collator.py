"""Pairs -> the batch TRL's DPOTrainer computes on, tokenized exactly as SFT tokenizes.

TRL's own vision collator renders prompts with the processor's chat template, which
is not the Vicuna v1 prompt LLaVA 1.5 was trained on. Here each side of a pair goes
through SFT's `BatchBuilder`, so a DPO stage on an SFT adapter sees the same
ids; the completion is the last answer (its `</s>` included), as SFT labels it.
"""

from __future__ import annotations

import torch

from lmmtune.data.dataset import BatchBuilder, PaddingCollator
from lmmtune.data.pairs import as_rejected
from lmmtune.data.records import Sample
from lmmtune.data.template import IGNORE_INDEX

PAIR = "pair"
"""Column of the index table TRL iterates over: the pair's position in the sample list."""


def last_answer_labels(labels: list[int]) -> list[int]:
    """SFT's labels with every answer but the last masked: the completion DPO scores."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [label if start <= i <= end else IGNORE_INDEX for i, label in enumerate(labels)]


class PreferenceCollator:
    """Index rows -> `input_ids`, `attention_mask`, `completion_mask` ([chosen..., rejected...])
    and `pixel_values` (each image twice), the layout DPOTrainer's loss reads."""

    def __init__(
        self,
        samples: list[Sample],
        processor,
        max_length: int,
        max_image_pixels: int | None,
    ):
        self.samples = samples
        self.build = BatchBuilder(processor, max_length, max_image_pixels)
        self.pad = PaddingCollator(processor.tokenizer.pad_token_id)

    def sequence(self, sample: Sample, pixel_values: torch.Tensor | None) -> dict:
        """SFT's item of one side of a pair, only its last answer labelled."""
        item = self.build.item(sample, pixel_values=pixel_values)
        item["labels"] = last_answer_labels(item["labels"])
        return item

    def __call__(self, rows: list[dict]) -> dict:
        pairs = [self.samples[int(row[PAIR])] for row in rows]
        images = [self.build.load_image(s) if s.image is not None else None for s in pairs]
        chosen = [self.sequence(s, image) for s, image in zip(pairs, images, strict=True)]
        rejected = [
            self.sequence(as_rejected(s), image) for s, image in zip(pairs, images, strict=True)
        ]
        batch = self.pad(chosen + rejected)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        return batch
