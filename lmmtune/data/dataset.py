"""Samples -> model inputs: lazy image decoding, the v1 template, label masking, padding.

Images are opened in `__getitem__`, so they are decoded in DataLoader workers and
never all held in memory.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lmmtune.data.images import mean_colour, open_rgb, pad_to_square
from lmmtune.data.records import Sample
from lmmtune.data.template import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    label_mask,
    render_conversation,
    render_prompt,
)
from lmmtune.errors import LmmtuneError


def image_token_count(processor) -> int:
    """Tokens one image expands to: (H/patch)*(W/patch) + additional tokens - 1 for "default"."""
    size = processor.image_processor.crop_size
    patches = (size["height"] // processor.patch_size) * (size["width"] // processor.patch_size)
    count = patches + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


class TokenizedConversation:
    """Tokenize a sample's text (image tokens expanded) and mark which tokens carry labels."""

    def __init__(self, processor, max_length: int):
        self.tokenizer = processor.tokenizer
        self.image_tokens = IMAGE_PLACEHOLDER * image_token_count(processor)
        self.eos = self.tokenizer.eos_token or "</s>"
        self.max_length = max_length

    def __call__(self, sample: Sample) -> tuple[list[int], list[int]]:
        rendered = render_conversation(
            sample.turns, sample.image is not None, self.image_tokens, self.eos
        )
        encoded = self.tokenizer(
            rendered.text, return_offsets_mapping=True, add_special_tokens=True
        )
        input_ids = encoded["input_ids"]
        if len(input_ids) > self.max_length:
            raise LmmtuneError(
                f"{sample.source}: {len(input_ids)} tokens (image tokens included) exceed "
                f"data.max_length={self.max_length}; samples are never truncated"
            )
        mask = label_mask(encoded["offset_mapping"], rendered.answer_spans)
        labels = [
            token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)
        ]
        return input_ids, labels

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Token ids of the generation prompt for the sample's last question."""
        *history, (question, _) = sample.turns
        text = render_prompt(question, sample.image is not None, self.image_tokens, history)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]


class ImageLoader:
    """Open a sample's image (already resolved to a path), pad it to a square, preprocess it."""

    def __init__(self, processor):
        self.image_processor = processor.image_processor
        self.fill = mean_colour(self.image_processor)

    def __call__(self, sample: Sample) -> torch.Tensor:
        image = pad_to_square(open_rgb(sample.image), self.fill)
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


class SupervisedDataset(Dataset):
    """Training samples as `input_ids`, `labels` and (for image samples) `pixel_values`."""

    def __init__(self, samples: list[Sample], processor, max_length: int):
        self.samples = samples
        self.tokenize = TokenizedConversation(processor, max_length)
        self.load_image = ImageLoader(processor)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        input_ids, labels = self.tokenize(sample)
        item = {"input_ids": input_ids, "labels": labels}
        if sample.image is not None:
            item["pixel_values"] = self.load_image(sample)
        return item


class PaddingCollator:
    """Pad a batch to its longest sample (right padding for training, left for generation)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": self._pad(
                [item["input_ids"] for item in items], longest, self.pad_token_id
            ),
            "attention_mask": self._pad(
                [[1] * len(item["input_ids"]) for item in items], longest, 0
            ),
        }
        if "labels" in items[0]:
            batch["labels"] = self._pad([item["labels"] for item in items], longest, IGNORE_INDEX)
        images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch

    def _pad(self, rows: list[list[int]], length: int, value: int) -> torch.Tensor:
        padded = []
        for row in rows:
            padding = [value] * (length - len(row))
            padded.append(
                padding + list(row) if self.padding_side == "left" else list(row) + padding
            )
        return torch.tensor(padded, dtype=torch.long)
