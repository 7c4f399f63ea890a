"""Many questions about one image answered together, the image's prefix computed once.

VQA sets ask ~10 questions about each image, and every prompt begins with the same
tokens: the system prompt, `USER: ` and the image's 576 tokens (LLaVA 1.5), about 620
of a ~640-token prompt. With `eval.share_image_prefix` (and `predict.share_image_prefix`)
the single-turn questions about an image asked more than once (same content: the key the
train/eval split and `data.group_by_image` use) are answered image by image, in batches
of `batch_size` as before: the prefix their prompts share runs through the model once per
image, with the image's pixels, and each question's row of the batch starts from a copy
of its image's KV cache (transformers' `DynamicCache`), from which `generate` continues
the question's own tokens. The prompts are the per-question path's, token for token, so
greedy answers are the same. Text-only and multi-turn samples, and an image asked one
question, take the per-question path.

This module plans the batches, builds their token ids and keeps the images' caches; the
model calls are `lmmtune.eval.generate`'s. transformers continues a given cache
(`generate(cache=...)`) but has no notion of questions sharing an image, so this is
written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lmmtune.data.batches import BatchBuilder
from lmmtune.data.checks import image_key
from lmmtune.data.grouping import groupable
from lmmtune.data.records import Sample


@dataclass
class AnswerPlan:
    """Which samples are answered how: one prompt each, or from their image's shared prefix."""

    per_question: list[int]
    """Indices of the samples answered one whole prompt each, in input order."""
    per_image: list[list[int]]
    """Indices of the questions about each image asked more than once, in input order."""


def plan_answers(samples: list[Sample], share_image_prefix: bool) -> AnswerPlan:
    """The single-turn image questions grouped by image; all the rest (everything, when not
    sharing) per question."""
    if not share_image_prefix:
        return AnswerPlan(per_question=list(range(len(samples))), per_image=[])
    by_image: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        if groupable(sample):
            by_image.setdefault(image_key(sample), []).append(index)
    per_image = [members for members in by_image.values() if len(members) > 1]
    shared = {index for members in per_image for index in members}
    per_question = [index for index in range(len(samples)) if index not in shared]
    return AnswerPlan(per_question=per_question, per_image=per_image)


def shared_prefix_length(prompts: list[list[int]], image_id: int) -> int | None:
    """Tokens all `prompts` begin with, leaving each at least one token of its own; None
    when an image token lies past that prefix (the image would have to run again)."""
    shortest = min(len(prompt) for prompt in prompts)
    length = 0
    while length < shortest - 1 and len({prompt[length] for prompt in prompts}) == 1:
        length += 1
    if any(image_id in prompt[length:] for prompt in prompts):
        return None
    return length


class ImagePrefixes:
    """The prompts of the questions about several images, the prefix they all share, and the
    KV cache of that prefix for each image whose questions are being answered."""

    def __init__(self, build: BatchBuilder, samples: list[Sample], per_image: list[list[int]]):
        self.build = build
        self.samples = samples
        self.order = [index for members in per_image for index in members]
        """The questions image by image: the order they are answered in."""
        self.image_of = {index: image for image, m in enumerate(per_image) for index in m}
        self.first = [samples[members[0]] for members in per_image]  # one sample per image
        self.prompts = {index: build.tokenize.prompt_ids(samples[index]) for index in self.order}
        self.length = shared_prefix_length(list(self.prompts.values()), build.tokenize.image_id)
        """Tokens of the shared prefix; None: nothing to share, answer per question."""
        self.caches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        """Per image being answered: each layer's (keys, values) of its prefix, one row."""

    def missing(self, indices: list[int]) -> list[int]:
        """The images of `indices` whose prefix has not run yet, in order."""
        images = dict.fromkeys(self.image_of[index] for index in indices)
        return [image for image in images if image not in self.caches]

    def prefix_batch(self, images: list[int]) -> dict:
        """The shared prefix once per image, with each image's pixels."""
        prefix = self.prompts[self.order[0]][: self.length]
        pixels = [self.build.load_image(self.first[image]) for image in images]
        return {
            "input_ids": torch.tensor([prefix] * len(images), dtype=torch.long),
            "attention_mask": torch.ones(len(images), len(prefix), dtype=torch.long),
            "pixel_values": torch.stack(pixels),
        }

    def keep(self, images: list[int], cache: DynamicCache) -> None:
        """Keep each image's row of the cache `prefix_batch(images)` produced."""
        layers = [(keys, values) for keys, values, *_ in cache]
        for row, image in enumerate(images):
            self.caches[image] = [(k[row : row + 1], v[row : row + 1]) for k, v in layers]

    def cache_for(self, indices: list[int]) -> DynamicCache:
        """A new cache of one row per question: its image's prefix (generate extends it)."""
        rows = [self.caches[self.image_of[index]] for index in indices]
        return DynamicCache(
            ddp_cache_data=[
                (
                    torch.cat([row[layer][0] for row in rows]),
                    torch.cat([row[layer][1] for row in rows]),
                )
                for layer in range(len(rows[0]))
            ]
        )

    def forget_before(self, index: int) -> None:
        """Drop the caches of the images answered before `index`'s image."""
        for image in [image for image in self.caches if image < self.image_of[index]]:
            del self.caches[image]

    def continuation_batch(self, indices: list[int]) -> dict:
        """The whole prompts of `indices`, each padded between the shared prefix and its own
        tokens: every row's last token is aligned for `generate`, and its positions count on
        from the prefix (transformers derives positions from the attention mask)."""
        prompts = [self.prompts[index] for index in indices]
        prefix = prompts[0][: self.length]
        longest = max(len(prompt) for prompt in prompts) - self.length
        input_ids, attention_mask = [], []
        for prompt in prompts:
            own = prompt[self.length :]
            padding = longest - len(own)
            input_ids.append(prefix + [self.build.pad_token_id] * padding + own)
            attention_mask.append([1] * self.length + [0] * padding + [1] * len(own))
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }
