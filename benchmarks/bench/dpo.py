"""A DPO step for the benchmark: lmmtune's DPO trainer on synthetic pairs.

Each pair is a synthetic sample (chosen) and the same prompt with its answer tokens
reversed (rejected), so a micro-batch of n pairs holds 2n sequences, as in training.
"""

from __future__ import annotations

import datasets
import torch

from benchmarks.bench.data import IGNORE_INDEX, SyntheticLlavaData
from lmmtune.config import DpoConfig, ModelConfig
from lmmtune.data.batches import PaddingCollator
from lmmtune.data.pairs import PAIR
from lmmtune.stages.dpo import LlavaDPOTrainer


class SyntheticPairCollator:
    """Index rows -> TRL's batch: chosen rows, then rejected rows, with `completion_mask`."""

    def __init__(self, data: SyntheticLlavaData, pad_token_id: int):
        self.data = data
        self.pad = PaddingCollator(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict:
        chosen = [self.data[int(row[PAIR])] for row in rows]
        batch = self.pad(chosen + [rejected(item) for item in chosen])
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        return batch


def rejected(item: dict) -> dict:
    """The same prompt, the answer's tokens in reverse order."""
    answer = sum(label != IGNORE_INDEX for label in item["labels"])
    ids = item["input_ids"][:-answer] + item["input_ids"][-answer:][::-1]
    return {
        **item,
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * (len(ids) - answer) + ids[-answer:],
    }


class BenchDPOTrainer(LlavaDPOTrainer):
    """`LlavaDPOTrainer` that counts the real and padded tokens of every micro-batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.token_counts: list[tuple[int, torch.Tensor, int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs["attention_mask"]
        self.token_counts.append((self.state.global_step, mask.sum(), mask.numel()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def batch_of(self, indices: list[int]) -> dict:
        return self.data_collator([{PAIR: i} for i in indices])


def dpo_trainer(model, args, data: SyntheticLlavaData, pad_token_id: int, projector_lr, callbacks):
    """The benchmark's DPO trainer (reference: the adapter switched off, the default)."""
    from lmmtune.model import load_processor

    # TRL wants a processor to know the model is a VLM; batches come from the collator.
    processor = load_processor(ModelConfig(path="tiny"))
    index = datasets.Dataset.from_dict(
        {PAIR: list(range(len(data))), "image": ["synthetic"] * len(data)}
    )
    return BenchDPOTrainer(
        reference=DpoConfig().reference,
        model=model,
        ref_model=None,
        args=args,
        data_collator=SyntheticPairCollator(data, pad_token_id),
        train_dataset=index,
        processing_class=processor,
        callbacks=callbacks,
        projector_lr=projector_lr,
        lengths=data.lengths,
    )
