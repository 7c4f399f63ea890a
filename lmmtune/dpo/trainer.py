"""TRL's DPOTrainer on lmmtune's Trainer pieces: projector learning rate, length grouping,
atomic checkpoints, and the reference chosen by `dpo.reference`.

The DPO loss, the reference log-probs (adapter switched off, or a frozen copy of the
starting adapter), rewards, margins and reward accuracy are all TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from torch.utils.data import SequentialSampler
from trl import DPOConfig, DPOTrainer

from lmmtune.data.records import Sample
from lmmtune.dpo.collator import PAIR
from lmmtune.train.trainer import LlavaTrainer, build_training_arguments

REFERENCE_ADAPTER = "ref"
"""The frozen copy of the starting adapter TRL adds to a PeftModel (dpo.reference=initial)."""


@dataclass
class LlavaDPOConfig(DPOConfig):
    """`DPOConfig` plus the loss settings lmmtune's Trainer reads (the DPO loss ignores them)."""

    loss_impl: str = "default"
    loss_chunk_size: int = 1024


def build_dpo_arguments(train_cfg, dpo_cfg, run_dir: Path, num_workers: int, dtype: str):
    """SFT's Trainer arguments, as `DPOConfig`, with the preference settings."""
    return build_training_arguments(
        train_cfg,
        run_dir,
        num_workers,
        dtype,
        args_class=LlavaDPOConfig,
        beta=dpo_cfg.beta,
        loss_type=list(dpo_cfg.loss_type),
        loss_weights=list(dpo_cfg.loss_weights) if dpo_cfg.loss_weights else None,
        max_length=None,  # lengths are checked up front, sequences never truncated
        precompute_ref_log_probs=False,
    )


def pair_index(samples: list[Sample], offset: int = 0) -> datasets.Dataset:
    """The table TRL iterates: each pair's index in the collator's list (from `offset`), and
    its image label (which makes TRL treat it as a vision set and leave tokenizing to us)."""
    return datasets.Dataset.from_dict(
        {
            PAIR: list(range(offset, offset + len(samples))),
            "image": [s.image or "" for s in samples],
        }
    )


class LlavaDPOTrainer(LlavaTrainer, DPOTrainer):
    """DPOTrainer with LlavaTrainer's optimizer groups, sampler and atomic checkpoints."""

    def __init__(self, *, reference: str, frozen: tuple[str, ...] = (), **kwargs):
        """`frozen`: names of weights that stay frozen (peft unfreezes saved modules when
        adapters are added or removed)."""
        # TRL rounds trainable weights to bf16 under a quantized base; SFT keeps them in fp32,
        # and a started adapter must start exactly as it was saved.
        trainable = {
            name: parameter.detach().float().clone()
            for name, parameter in kwargs["model"].named_parameters()
            if parameter.requires_grad
        }
        super().__init__(**kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        for name, parameter in unwrapped.named_parameters():
            if name in trainable:
                parameter.data = trainable[name].to(parameter.device)
        if reference == "adapter_off" and REFERENCE_ADAPTER in unwrapped.peft_config:
            unwrapped.delete_adapter(REFERENCE_ADAPTER)  # TRL then disables the adapter instead
        frozen = (f".{REFERENCE_ADAPTER}.", *frozen)
        self.kept_frozen = [
            parameter
            for name, parameter in unwrapped.named_parameters()
            if any(part in name for part in frozen)
        ]
        self.refreeze()

    def refreeze(self) -> None:
        """Switching adapters (the reference forward) makes peft unfreeze saved modules again."""
        for parameter in self.kept_frozen:
            parameter.requires_grad_(False)

    def create_optimizer(self, model=None):
        self.refreeze()  # resuming loads the checkpoint's adapter first, unfreezing saved modules
        return super().create_optimizer(model)

    def compute_loss(self, *args, **kwargs):
        try:
            return super().compute_loss(*args, **kwargs)
        finally:
            self.refreeze()

    def compute_ref_log_probs(self, model, inputs):
        try:
            return super().compute_ref_log_probs(model, inputs)
        finally:
            self.refreeze()

    def _get_eval_sampler(self, eval_dataset):
        # In order: the default groups by length, measuring items the index table does not have.
        return SequentialSampler(eval_dataset)


def build_dpo_trainer(
    model,
    train_samples: list[Sample],
    eval_samples: list[Sample],
    collator,  # over train_samples + eval_samples, in that order
    args,
    processor,
    projector_lr: float | None,
    lengths: list[int] | None,
    callbacks: list,
    reference: str,
    frozen: tuple[str, ...] = (),
) -> LlavaDPOTrainer:
    return LlavaDPOTrainer(
        reference=reference,
        frozen=frozen,
        model=model,
        ref_model=None,
        args=args,
        data_collator=collator,
        train_dataset=pair_index(train_samples),
        eval_dataset=pair_index(eval_samples, len(train_samples)) if eval_samples else None,
        processing_class=processor,
        callbacks=callbacks,
        projector_lr=projector_lr,
        lengths=lengths,
    )
