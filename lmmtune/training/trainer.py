"""Training on transformers' `Trainer`: its arguments, the projector's learning rate, length grouping, Liger's fused loss.

Training on transformers' `Trainer`, with our own collator and the projector's own learning rate.

Why `Trainer` and not TRL's `SFTTrainer`: lmmtune renders the Vicuna v1 prompt and
its label mask itself (the llava-hf chat template differs from what LLaVA 1.5 was
trained on), so SFTTrainer's dataset preparation would be switched off anyway, and
its casting of every trainable weight to bf16 under a quantized base is a trap on
CPUs and for the projector. What remains is `Trainer`: loop, accumulation, mixed
precision, checkpoints, DDP/FSDP through accelerate, a progress bar.

`train.loss_impl=liger`: Liger's fused linear cross-entropy, through the Trainer's own switch.

The Trainer's `use_liger_kernel` patches the LLaVA forward so that the output head and
the cross entropy run as one chunked Triton kernel: no `[batch, tokens, vocab]`
logits, like lmmtune's chunked loss. For LLaVA, Liger also swaps the language model's
RoPE, RMSNorm and SwiGLU for its kernels (its defaults; the LLaVA patch passes no
switch for them through). Triton kernels run on CUDA GPUs only, so this is a GPU option.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.optimizers import create_loraplus_optimizer
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from lmmtune.config import PeftConfig, TrainConfig
from lmmtune.errors import LmmtuneError
from lmmtune.model import PROJECTOR
from lmmtune.rundir.run import AtomicCheckpointMixin, RunDir
from lmmtune.training.callbacks import progress_bars, use_step_lines
from lmmtune.training.loss import chunked_causal_lm_loss

LORA = "lora_"
"""What the names of peft's LoRA weights hold (lora_A, lora_B, lora_magnitude_vector)."""


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the loss settings `LlavaTrainer` reads."""

    loss_impl: str = "default"
    """chunked (labelled positions only, never the full logits), default (transformers' loss) or
    liger (Liger's fused linear cross-entropy, GPU only)."""
    loss_chunk_size: int = 1024
    """Labelled positions per chunk of the chunked loss."""


def build_training_arguments(
    train_cfg: TrainConfig,
    run_dir: Path,
    num_workers: int,
    dtype: str,
    use_reentrant: bool = False,
    args_class: type[TrainingArguments] | None = None,
    **extra,
) -> TrainingArguments:
    """The Trainer's arguments for `train_cfg`; `use_reentrant` only for the benchmark's baseline.

    `args_class` and `extra`: another arguments class (DPO's) and its own settings.
    """
    on_gpu = torch.cuda.is_available()
    return (args_class or LlavaTrainingArguments)(
        output_dir=str(RunDir(run_dir).checkpoints),
        **optimization_arguments(train_cfg),
        **checkpointing_arguments(train_cfg.gradient_checkpointing, use_reentrant),
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        logging_steps=train_cfg.logging_steps,
        eval_strategy="steps" if train_cfg.eval_steps else "no",
        eval_steps=train_cfg.eval_steps,
        per_device_eval_batch_size=train_cfg.batch_size,
        prediction_loss_only=True,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        save_strategy="steps",
        save_steps=train_cfg.save_steps,
        save_total_limit=train_cfg.save_total_limit,
        seed=train_cfg.seed,
        data_seed=train_cfg.seed,
        use_cpu=not on_gpu,
        dataloader_num_workers=num_workers,
        dataloader_pin_memory=on_gpu,
        dataloader_persistent_workers=num_workers > 0,
        remove_unused_columns=False,
        loss_impl=train_cfg.loss_impl,
        loss_chunk_size=train_cfg.loss_chunk_size,
        **liger_arguments(train_cfg.loss_impl),
        train_sampling_strategy="group_by_length" if train_cfg.group_by_length else "random",
        length_column_name="length",
        report_to="none",
        disable_tqdm=not progress_bars(),  # in a file or pipe: one line per logging step
        **extra,
    )


def optimization_arguments(train_cfg: TrainConfig) -> dict:
    """How long, in which batches, and how the optimizer steps."""
    return {
        "num_train_epochs": train_cfg.epochs,
        "max_steps": train_cfg.max_steps,
        "per_device_train_batch_size": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "learning_rate": train_cfg.learning_rate,
        "weight_decay": train_cfg.weight_decay,
        "warmup_steps": train_cfg.warmup_ratio,
        "lr_scheduler_type": train_cfg.scheduler,
        "optim": train_cfg.optim,
        "max_grad_norm": train_cfg.max_grad_norm,
    }


def checkpointing_arguments(enabled: bool, use_reentrant: bool = False) -> dict:
    """Activation checkpointing under the argument names this transformers reads.

    From 5.2x `activation_checkpointing*` are read and `gradient_checkpointing*` are
    deprecated aliases, copied over once at construction (set later, they are ignored);
    5.17 knows only the old names.
    """
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": use_reentrant}}


class LlavaTrainer(AtomicCheckpointMixin, Trainer):
    """`Trainer` with a separate learning rate for the projector and precomputed sample lengths."""

    def __init__(
        self,
        *args,
        projector_lr: float | None = None,
        lengths: list[int] | None = None,
        loraplus_lr_ratio: float | None = None,
        **kwargs,
    ):
        self.projector_lr = projector_lr
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.lengths = lengths
        super().__init__(*args, **kwargs)

    def _chunked(self, inputs) -> bool:
        """Whether this batch's loss goes through the chunked loss (`loss_impl=chunked`)."""
        return getattr(self.args, "loss_impl", "default") == "chunked" and "labels" in inputs

    def _chunked_loss(self, model, inputs, num_items_in_batch=None):
        # Sharded weights are gathered only inside the forward: keep the head there.
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        return chunked_causal_lm_loss(
            model, inputs, num_items_in_batch, self.args.loss_chunk_size, bypass_head=not sharded
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The chunked loss in training (`loss_impl=chunked`), else transformers' own."""
        if not self._chunked(inputs) or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self._chunked_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: num_items_in_batch counts every process's tokens.
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The eval loss (train.eval_steps) through the chunked loss too: no full logits."""
        if not (self._chunked(inputs) and prediction_loss_only):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self._chunked_loss(model, inputs)
        return loss.detach(), None, None

    def create_optimizer(self, model=None):
        """AdamW (or `train.optim`) over the LoRA weights, with the projector in a group of its
        own learning rate; under LoRA+ (`peft.loraplus_lr_ratio`) the LoRA weights are
        grouped by peft's `create_loraplus_optimizer` (B and DoRA's magnitudes faster)."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(
            self.args, self.model
        )
        groups = trainable_groups(
            self.model,
            self.args.learning_rate,
            self.args.weight_decay,
            self.projector_lr,
            self.loraplus_lr_ratio,
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        """Length grouping from precomputed lengths (the default would decode every image to
        measure it); a dataset that reorders per epoch gets each index tagged with its epoch."""
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        by_length = self.args.train_sampling_strategy == "group_by_length"
        if by_length and self.lengths is not None:
            sampler = EpochSeededLengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=self.lengths,
                seed=seed,
            )
        elif getattr(self.train_dataset, "reorders_per_epoch", False):
            sampler = EpochSeededRandomSampler(len(self.train_dataset), seed)
        else:
            return super()._get_train_sampler(train_dataset)
        if getattr(self.train_dataset, "reorders_per_epoch", False):
            return EpochTagged(sampler)
        return sampler


def trainable_groups(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    projector_lr: float | None,
    loraplus_lr_ratio: float | None,
) -> list[dict]:
    """The optimizer's parameter groups, in an order fixed by the model (a resume rebuilds
    the same groups before loading their state): the LoRA weights (one group, or LoRA+'s
    groups), the other trained weights (the output head), and the projector."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    projector = [p for name, p in trained.items() if PROJECTOR in name]
    if loraplus_lr_ratio is None:
        rest = [p for name, p in trained.items() if PROJECTOR not in name]
        groups = [{"params": rest, "weight_decay": weight_decay}]
    else:
        lora = {id(p) for name, p in trained.items() if LORA in name}
        other = [p for name, p in trained.items() if id(p) not in lora and PROJECTOR not in name]
        groups = [
            {**group, "params": [p for p in group["params"] if id(p) in lora]}
            for group in loraplus_groups(model, lr, weight_decay, loraplus_lr_ratio)
        ]
        groups.append({"params": other, "weight_decay": weight_decay, "lr": lr})
    if projector:
        groups.append({"params": projector, "weight_decay": weight_decay, "lr": projector_lr or lr})
    return [group for group in groups if group["params"]]


def loraplus_groups(model: torch.nn.Module, lr: float, weight_decay: float, ratio: float):
    """The parameter groups peft's `create_loraplus_optimizer` builds (A at `lr`; B and 1-D
    weights such as DoRA's magnitudes at `lr * ratio`), read off a stand-in optimizer class;
    the caller keeps only the LoRA weights of them (peft would put the projector's bias at
    the B rate and the projector at no rate of its own)."""

    class GroupsOnly:
        def __init__(self, groups, **kwargs):
            self.param_groups = groups

    grouped = create_loraplus_optimizer(
        model, GroupsOnly, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay
    )
    return grouped.param_groups


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length grouping whose order in epoch E comes from `seed + E` alone.

    transformers' sampler draws from the global random state, which a resumed process
    holds in another state than the uninterrupted one had at that epoch: a run resumed
    in a later epoch would see the batches in another order. The Trainer calls
    `set_epoch` at each epoch start (and when it skips the batches a resume already did).
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class EpochSeededRandomSampler(torch.utils.data.Sampler):
    """A random order whose epoch E comes from `seed + E` alone (see the length-grouped one)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class EpochTagged(torch.utils.data.Sampler):
    """Yield `(epoch, index)` for each index of `sampler`: the dataset reads the epoch from
    the index itself, so DataLoader workers (their own copies of the dataset, kept between
    epochs when persistent) need no message. The Trainer and accelerate call `set_epoch` at
    each epoch start, also for the epochs a resume skips; it is passed on."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)


def build_trainer(
    model: torch.nn.Module,
    train_dataset: Dataset,
    collator,
    args: TrainingArguments,
    peft_cfg: PeftConfig,
    lengths: list[int] | None,
    callbacks: list[TrainerCallback],
    eval_dataset: Dataset | None = None,
) -> LlavaTrainer:
    if args.eval_strategy != "no" and not eval_dataset:
        raise LmmtuneError(
            "train.eval_steps needs an eval split: set data.eval=..., or data.eval_fraction "
            "so that at least one record is held out"
        )
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if args.eval_strategy != "no" else None,
        data_collator=collator,
        callbacks=callbacks,
        projector_lr=peft_cfg.projector_lr,
        loraplus_lr_ratio=peft_cfg.loraplus_lr_ratio,
        lengths=lengths,
    )
    use_step_lines(trainer)
    return trainer


LIGER = "liger"
INSTALL_HINT = "pip install liger-kernel"


def require_liger(loss_impl: str) -> None:
    """Fail early, naming what is missing, when `train.loss_impl=liger` cannot run here."""
    if loss_impl != LIGER:
        return
    if not torch.cuda.is_available():
        raise LmmtuneError(
            "train.loss_impl=liger runs Liger's Triton kernels, which need a CUDA GPU "
            f"(and `{INSTALL_HINT}`); without one use train.loss_impl=chunked, which also "
            "never builds the full logits"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise LmmtuneError(f"train.loss_impl=liger needs liger-kernel: {INSTALL_HINT}")


def liger_arguments(loss_impl: str) -> dict:
    """The TrainingArguments that turn Liger's fused linear cross-entropy on (empty if not asked)."""
    if loss_impl != LIGER:
        return {}
    require_liger(loss_impl)
    return {
        "use_liger_kernel": True,
        "liger_kernel_config": {"fused_linear_cross_entropy": True, "cross_entropy": False},
    }
