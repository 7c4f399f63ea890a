"""Batched greedy answers to each sample's last question (left padding).

The batch is `BatchBuilder`'s: the prompt training used (Vicuna v1, image tokens
expanded) and images padded to a square the same way.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lmmtune.data.dataset import BatchBuilder
from lmmtune.data.records import Sample


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
