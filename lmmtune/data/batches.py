"""Samples -> model inputs: lazy image decoding, the v1 template, label masking, padding.

Images are opened in `__getitem__`, so they are decoded in DataLoader workers and
never all held in memory."""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import Dataset

from lmmtune.config import Template
from lmmtune.data.images import fit_square_budget, open_image, pad_colour, square_padding_processor
from lmmtune.data.prompt import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    chunk_tokenizer,
    label_mask,
    plain_labels,
    render_conversation,
    render_plain,
    render_prompt,
)
from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError, RecordInvalid


def image_token_count(processor) -> int:
    """Tokens one image expands to: (H/patch)*(W/patch) + additional tokens - 1 for "default"."""
    size = processor.image_processor.crop_size
    patches = (size["height"] // processor.patch_size) * (size["width"] // processor.patch_size)
    count = patches + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


def rendered_text(sample: Sample, template: Template, eos: str) -> str:
    """The sample as text in `template` (`<image>` not yet expanded): the Vicuna v1 chat, or
    `plain`'s image + caption (the answer of its one turn) + newline."""
    if template == Template.plain:
        return render_plain(sample.turns[0][1])
    return render_conversation(sample.turns, sample.image is not None, IMAGE_PLACEHOLDER, eos).text


class TokenizedConversation:
    """Tokenize a sample as LLaVA did (see `lmmtune.data.prompt`) and mark the labelled tokens:
    `data.template` vicuna_v1 (LLaVA 1.5's instruction tuning) or plain (its stage 1)."""

    def __init__(self, processor, max_length: int, template: Template = Template.vicuna_v1):
        self.tokenizer = processor.tokenizer
        self.chunks = chunk_tokenizer(self.tokenizer)
        self.image_id = self.chunks.special_ids[IMAGE_PLACEHOLDER]
        self.image_tokens = image_token_count(processor)
        self.eos = self.tokenizer.eos_token or "</s>"
        self.max_length = max_length
        self.template = template

    def __call__(self, sample: Sample) -> tuple[list[int], list[int]]:
        if self.template == Template.plain:
            input_ids = self.chunks.encode(render_plain(sample.turns[0][1]))[0]
            labels = plain_labels(input_ids, self.image_id)
        else:
            input_ids, labels = self._vicuna(sample)
        input_ids, labels = self._expand_image(input_ids, labels)
        if len(input_ids) > self.max_length:
            raise LmmtuneError(
                f"{sample.source}: {len(input_ids)} tokens (image tokens included) exceed "
                f"data.max_length={self.max_length}; samples are never truncated"
            )
        return input_ids, labels

    def _vicuna(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Ids of the Vicuna v1 conversation; labels on the answers and their `</s>`."""
        rendered = render_conversation(
            sample.turns, sample.image is not None, IMAGE_PLACEHOLDER, self.eos
        )
        input_ids, offsets = self.chunks.encode(rendered.text)
        mask = label_mask(offsets, rendered.answer_spans)
        labels = [
            token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)
        ]
        return input_ids, labels

    def prompt_ids(self, sample: Sample) -> list[int]:
        """Token ids of the generation prompt for the sample's last question."""
        *history, (question, _) = sample.turns
        text = render_prompt(question, sample.image is not None, IMAGE_PLACEHOLDER, history)
        ids = self.chunks.encode(text)[0]
        return self._expand_image(ids, ids)[0]

    def _expand_image(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """The one `<image>` id repeated to the image's token count, its labels -100."""
        if self.image_id not in ids:
            return ids, labels
        at = ids.index(self.image_id)
        image = [self.image_id] * self.image_tokens
        return ids[:at] + image + ids[at + 1 :], labels[:at] + [IGNORE_INDEX] * len(image) + labels[
            at + 1 :
        ]


def token_lengths(
    samples: list[Sample],
    processor,
    batch_size: int = 512,
    template: Template = Template.vicuna_v1,
) -> tuple[list[int], list[int]]:
    """Tokens per sample (image tokens included) and per answer, without expanding images.

    Equal to `len(TokenizedConversation(...)(sample)[0])`: the one `<image>` placeholder
    counts one id, its expansion adds `image_token_count - 1`. Expanding LLaVA 1.5's 576
    image tokens first tokenizes about 5x slower (measured).
    """
    tokenizer = processor.tokenizer
    chunks = chunk_tokenizer(tokenizer)
    eos = tokenizer.eos_token or "</s>"
    extra = image_token_count(processor) - 1
    lengths: list[int] = []
    answers: list[int] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts = [rendered_text(s, template, eos) for s in chunk]
        lengths += [
            count + (extra if s.image is not None else 0)
            for count, s in zip(chunks.count(texts), chunk, strict=True)
        ]
        answers += chunks.text_lengths([answer for s in chunk for _, answer in s.turns])
    return lengths, answers


def load_sample_image(sample: Sample, max_pixels: int | None) -> Image.Image:
    """The sample's image as RGB: from its file, or from the data set that holds its bytes."""
    try:
        if sample.image_ref is not None:
            data, name = sample.image_ref.read()
            return open_image(data, name, max_pixels)
        return open_image(sample.image, max_pixels=max_pixels)
    except RecordInvalid as exc:
        # A plain LmmtuneError survives the trip from a DataLoader worker to the main process.
        raise LmmtuneError(f"{sample.source} (id {sample.id}): {exc.reason}") from None


class ImageLoader:
    """Open a sample's image (a resolved path or in-data bytes), pad it to a square, preprocess it."""

    def __init__(self, processor, max_pixels: int | None, pad_to_square: bool = True):
        """`max_pixels` is `data.max_image_pixels`: passed by every caller, so that no step
        opens images under another limit than the one `check` used. `pad_to_square=False`
        (`data.pad_to_square`, LLaVA's stage 1): the processor's resize and centre crop."""
        self.image_processor = square_padding_processor(processor.image_processor, pad_to_square)
        self.fill = pad_colour(self.image_processor)
        self.max_pixels = max_pixels
        self.pad_to_square = pad_to_square

    def __call__(self, sample: Sample) -> torch.Tensor:
        image = load_sample_image(sample, self.max_pixels)
        if self.pad_to_square:
            image = fit_square_budget(image, self.fill)
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


class BatchBuilder:
    """Samples -> model inputs, built one way for training, eval, export parity, chat and DPO:
    the tokens as LLaVA 1.5 rendered them (Vicuna v1 prompt, earlier turns, image tokens
    expanded; or stage 1's plain caption) and the image padded to a square (or, stage 1,
    resized and centre-cropped)."""

    def __init__(
        self,
        processor,
        max_length: int,
        max_image_pixels: int | None,
        template: Template = Template.vicuna_v1,
        pad_to_square: bool = True,
    ):
        """`template` and `pad_to_square`: `data.template` and `data.pad_to_square`."""
        self.tokenize = TokenizedConversation(processor, max_length, template)
        self.load_image = ImageLoader(processor, max_image_pixels, pad_to_square)
        self.pad_token_id = processor.tokenizer.pad_token_id

    def item(self, sample: Sample, prompt: bool = False, pixel_values=None) -> dict:
        """`input_ids` and `labels` of the whole conversation, or (`prompt`) only the
        `input_ids` of the prompt for its last question; and the image's `pixel_values`
        (given ones are used as they are: one image shared by several items)."""
        if prompt:
            item = {"input_ids": self.tokenize.prompt_ids(sample)}
        else:
            input_ids, labels = self.tokenize(sample)
            item = {"input_ids": input_ids, "labels": labels}
        if sample.image is not None:
            item["pixel_values"] = self.load_image(sample) if pixel_values is None else pixel_values
        return item

    def batch(self, samples: list[Sample], prompt: bool = False) -> dict:
        """The samples' items padded to the longest: prompts on the left (for `generate`),
        whole conversations on the right (as training batches them)."""
        pad = PaddingCollator(self.pad_token_id, padding_side="left" if prompt else "right")
        return pad([self.item(sample, prompt) for sample in samples])


class SupervisedDataset(Dataset):
    """Training samples as `input_ids`, `labels` and (for image samples) `pixel_values`."""

    def __init__(
        self,
        samples: list[Sample],
        processor,
        max_length: int,
        max_image_pixels: int | None,
        template: Template = Template.vicuna_v1,
        pad_to_square: bool = True,
    ):
        self.samples = samples
        self.build = BatchBuilder(processor, max_length, max_image_pixels, template, pad_to_square)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.build.item(self.samples[index])


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
