"""One batch builder: training items, generation prompts and whole conversations alike."""

from __future__ import annotations

import torch

from lmmtune.data.batches import BatchBuilder, ImageLoader, SupervisedDataset, TokenizedConversation
from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.records import Sample
from tests.data.helpers import save_image


def test_prompts_are_padded_left_and_conversations_right(tmp_path, tiny_processor):
    with_image = Sample("a", [("Is it?", "yes")], str(save_image(tmp_path / "a.png")))
    two_turns = Sample("b", [("Is there a lesion here?", "no"), ("Which side?", "left")], None)
    samples = [with_image, two_turns]
    build = BatchBuilder(tiny_processor, 1024, DEFAULT_MAX_PIXELS)
    tokenize = TokenizedConversation(tiny_processor, 1024)

    prompts = build.batch(samples, prompt=True)
    whole = build.batch(samples)

    for row, sample in enumerate(samples):
        prompt_ids, (ids, labels) = tokenize.prompt_ids(sample), tokenize(sample)
        width = prompts["input_ids"].shape[1]
        assert prompts["input_ids"][row, width - len(prompt_ids) :].tolist() == prompt_ids
        assert prompts["attention_mask"][row, width - len(prompt_ids) :].all()
        assert whole["input_ids"][row, : len(ids)].tolist() == ids
        assert whole["labels"][row, : len(ids)].tolist() == labels
        assert whole["attention_mask"][row].sum() == len(ids)
    assert "labels" not in prompts
    image = ImageLoader(tiny_processor, DEFAULT_MAX_PIXELS)(with_image)
    assert torch.equal(prompts["pixel_values"], image[None])
    assert torch.equal(whole["pixel_values"], image[None])
    item = SupervisedDataset(samples, tiny_processor, 1024, DEFAULT_MAX_PIXELS)[0]
    assert item["input_ids"] == tokenize(with_image)[0] and torch.equal(item["pixel_values"], image)
