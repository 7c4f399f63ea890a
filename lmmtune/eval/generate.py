"""Batched greedy answers to each sample's last question (left padding)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lmmtune.data.dataset import ImageLoader, PaddingCollator, TokenizedConversation
from lmmtune.data.records import Sample


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor,
    samples: list[Sample],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
) -> list[str]:
    tokenize = TokenizedConversation(processor, max_length=10**9)
    load_image = ImageLoader(processor)
    tokenizer = processor.tokenizer
    collate = PaddingCollator(tokenizer.pad_token_id, padding_side="left")
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    vision_dtype = model.get_input_embeddings().weight.dtype
    vision_dtype = next(
        (
            p.dtype
            for n, p in model.named_parameters()
            if "vision_tower" in n and p.is_floating_point()
        ),
        vision_dtype,
    )
    answers: list[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = samples[start : start + batch_size]
        items = []
        for sample in chunk:
            item = {"input_ids": tokenize.prompt_ids(sample)}
            if sample.image is not None:
                item["pixel_values"] = load_image(sample)
            items.append(item)
        batch = collate(items)
        batch = {key: value.to(device) for key, value in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(vision_dtype)
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
