"""Synthetic LLaVA training samples of realistic length: 576 image tokens + 30-200 text tokens.

Each sample is BOS, the image placeholder expanded to the image's tokens, then text
of a random length; the answer (the last third of the text) carries labels, the
rest is -100, as in lmmtune's own masking. Pixels and ids are drawn per index from
a seeded generator, so a large dataset costs nothing until a sample is read (the
length-grouped sampler needs many samples to group well, as in a real epoch).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lmmtune.data.prompt import IGNORE_INDEX

TEXT_TOKENS = (30, 200)


class SyntheticLlavaData(Dataset):
    """`size` samples of `image_tokens` image positions + text, with precomputed `lengths`."""

    def __init__(
        self,
        size: int,
        image_token_id: int,
        image_tokens: int,
        image_size: int,
        text_vocab: int,
        seed: int = 0,
    ):
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.image_size = image_size
        self.text_vocab = text_vocab
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        low, high = TEXT_TOKENS
        text = torch.randint(low, high + 1, (size,), generator=generator)
        self.lengths = [1 + image_tokens + int(n) for n in text]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        text_len = self.lengths[index] - 1 - self.image_tokens
        # Text ids stay below the image placeholder and the special tokens after it.
        text = torch.randint(3, self.text_vocab, (text_len,), generator=generator).tolist()
        input_ids = [1] + [self.image_token_id] * self.image_tokens + text
        answer = max(1, text_len // 3)
        labels = [IGNORE_INDEX] * (len(input_ids) - answer) + input_ids[-answer:]
        pixels = torch.randn(3, self.image_size, self.image_size, generator=generator)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}
