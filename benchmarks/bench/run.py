"""Train one configuration for a few real steps and measure it.

The model is loaded with `load_model` (4-bit exactly as the recipe does), wrapped by
`apply_lora`, and trained by `LlavaTrainer` with `build_training_arguments`: the code
a training run uses, with the benchmark's settings. Steps are timed with CUDA events
on a GPU (time.perf_counter on a CPU) at every optimizer step end; the first
`warmup` steps are left out.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy

from benchmarks.bench.cpu_memory import PeakTensorMemory, state_tensors
from benchmarks.bench.data import SyntheticLlavaData
from benchmarks.bench.dpo import dpo_trainer
from benchmarks.bench.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, llava_config
from benchmarks.bench.recipes import Recipe
from lmmtune.config import DpoConfig, ModelConfig, PeftConfig, QuantConfig, TrainConfig
from lmmtune.data.batches import PaddingCollator
from lmmtune.errors import LmmtuneError
from lmmtune.model import apply_lora, load_model, resolve_attention
from lmmtune.stages.dpo import build_dpo_arguments
from lmmtune.training.memory import GIB, MemorySetup, ModelShape, estimate_memory, fit_to_memory
from lmmtune.training.projector import ProjectorTraining
from lmmtune.training.trainer import LlavaTrainer, build_training_arguments

log = logging.getLogger(__name__)
GROUPING_POOL = 200
"""Dataset size in effective batches: enough for the length-grouped sampler's 50-batch megabatches."""


@dataclass(frozen=True)
class BenchSettings:
    scale: str
    micro_batch: int
    grad_accum: int
    warmup: int
    steps: int
    lora_r: int
    dtype: str
    """bfloat16 on a GPU; float32 on a CPU."""
    gpu_memory_gb: float | None
    workdir: Path
    seed: int = 0


class StepTimer(TrainerCallback):
    """A timestamp at the start of training and at the end of every optimizer step.

    On a CPU it also keeps the process's CPU time, a steadier measure than wall time
    on a machine shared with other work.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list = []
        self.cpu_marks: list[float] = []

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()

    def step_seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in pairwise(self.marks)]
        return [b - a for a, b in pairwise(self.marks)]

    def step_cpu_seconds(self) -> list[float]:
        return [b - a for a, b in pairwise(self.cpu_marks)]


class BenchTrainer(LlavaTrainer):
    """`LlavaTrainer` that also counts the real and padded tokens of every micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_counts: list[tuple[int, torch.Tensor, int]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs["attention_mask"]  # a device tensor: summing it later avoids a sync here
        self.token_counts.append((self.state.global_step, mask.sum(), mask.numel()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def batch_of(self, indices: list[int]) -> dict:
        return self.data_collator([self.train_dataset[i] for i in indices])


def run_recipe(recipe: Recipe, settings: BenchSettings, checkpoint: Path) -> dict:
    """Train `recipe` for warmup + steps optimizer steps; its measurements, or why it failed."""
    attn = resolve_attention(recipe.attn, settings.dtype)  # `auto` as in a training run
    result = {"config": recipe.key, "label": recipe.label, "attn": attn}
    start = time.perf_counter()
    try:
        result |= _train_and_measure(recipe, settings, checkpoint, result["attn"])
        result["status"] = "ok"
        log.info("%s: done in %.0f s", recipe.label, time.perf_counter() - start)
    except torch.OutOfMemoryError as exc:
        result["status"] = "OOM"
        result["error"] = str(exc).splitlines()[0][:200]
    except LmmtuneError as exc:
        result["status"] = "error"
        result["error"] = str(exc)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def _configs(recipe: Recipe, settings: BenchSettings, checkpoint: Path, attn: str):
    model_cfg = ModelConfig(path=str(checkpoint), dtype=settings.dtype, attn_implementation=attn)
    quant_cfg = QuantConfig(mode=recipe.quant, compute_dtype=settings.dtype)
    r = settings.lora_r
    peft_cfg = PeftConfig(r=r, alpha=2 * r, dropout=0.05, projector_lr=2e-5)
    train_cfg = TrainConfig(
        max_steps=settings.warmup + settings.steps,
        batch_size=settings.micro_batch,
        grad_accum=settings.grad_accum,
        warmup_ratio=0.0,
        optim=recipe.optim,
        gradient_checkpointing=recipe.checkpointing != "none",
        group_by_length=recipe.group_by_length,
        loss_impl=recipe.loss_impl,
        # Under a budget every configuration gets the largest micro-batch modelled to fit
        # it: what a user of the usual pipeline would find by trial and error.
        gpu_memory_gb=settings.gpu_memory_gb,
        logging_steps=10**6,
        save_steps=10**6,
        seed=settings.seed,
    )
    return model_cfg, quant_cfg, peft_cfg, train_cfg


def _train_and_measure(recipe: Recipe, settings: BenchSettings, checkpoint: Path, attn: str):
    cuda = torch.cuda.is_available()
    model_cfg, quant_cfg, peft_cfg, train_cfg = _configs(recipe, settings, checkpoint, attn)
    config = llava_config(settings.scale)
    data = SyntheticLlavaData(
        GROUPING_POOL * settings.micro_batch * settings.grad_accum,
        IMAGE_TOKEN_ID,
        config.image_seq_length,
        config.vision_config.image_size,
        IMAGE_TOKEN_ID,
        settings.seed,
    )
    train_cfg, plan_note = _plan(recipe, train_cfg, model_cfg, quant_cfg, peft_cfg, data)
    model = _model(recipe, model_cfg, quant_cfg, peft_cfg, train_cfg.gradient_checkpointing)
    timer = StepTimer(cuda)
    projector_lr = None if recipe.objective == "align" else peft_cfg.projector_lr
    trainer = _trainer(recipe, settings, model, train_cfg, projector_lr, data, timer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train()
    measured = _throughput(trainer, timer, settings.warmup, train_cfg)
    measured |= _memory() if cuda else {"peak_allocated_gib": _cpu_peak_gib(trainer, data)}
    setup = MemorySetup.from_configs(model_cfg, quant_cfg, peft_cfg, train_cfg, _stage(recipe))
    shape = ModelShape.from_config(config)
    pairs = recipe.objective == "dpo"
    sequences = train_cfg.batch_size * (2 if pairs else 1)  # a pair: chosen and rejected
    planned = estimate_memory(shape, setup, sequences, max(data.lengths))
    measured["planned_gib"] = planned.total / GIB
    measured["final_loss"] = output.training_loss
    measured["plan"] = plan_note
    del trainer, model
    return measured


def _stage(recipe: Recipe) -> str:
    """The `stage` setting the recipe measures (what the memory planner models)."""
    return "align" if recipe.objective == "align" else "sft"


def _model(recipe: Recipe, model_cfg, quant_cfg, peft_cfg, checkpointing: bool):
    """The loaded base with LoRA, or (stage 1) with its projector alone trainable."""
    base = load_model(model_cfg, quant_cfg)
    if recipe.objective == "align":
        return ProjectorTraining(base)
    return apply_lora(base, peft_cfg, checkpointing)


def _trainer(recipe: Recipe, settings: BenchSettings, model, train_cfg, projector_lr, data, timer):
    """The recipe's trainer (SFT, or DPO on pairs) over `data`, keeping no checkpoints."""
    workers = 2 if torch.cuda.is_available() and recipe.workers else 0
    workdir = settings.workdir / recipe.key
    if recipe.objective == "dpo":
        args = build_dpo_arguments(train_cfg, DpoConfig(), workdir, workers, settings.dtype)
    else:
        reentrant = recipe.checkpointing == "reentrant"
        args = build_training_arguments(
            train_cfg, workdir, workers, settings.dtype, use_reentrant=reentrant
        )
    args.disable_tqdm = True
    args.save_strategy = SaveStrategy.NO  # a benchmark keeps no checkpoints
    if recipe.objective == "dpo":
        return dpo_trainer(model, args, data, PAD_TOKEN_ID, projector_lr, [timer])
    return BenchTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=PaddingCollator(PAD_TOKEN_ID),
        projector_lr=projector_lr,
        lengths=data.lengths,
        callbacks=[timer],
    )


def _plan(recipe, train_cfg, model_cfg, quant_cfg, peft_cfg, data) -> tuple[TrainConfig, str]:
    """The planner's micro-batch under a budget; micro-batch 1 when it models no fit.

    A configuration the model says cannot fit still runs at micro-batch 1: the
    measurement, not the model, decides (an OOM is reported as such).
    """
    if train_cfg.gpu_memory_gb is None:
        return train_cfg, "no budget"
    try:
        sequences = 2 if recipe.objective == "dpo" else 1
        planned = fit_to_memory(
            train_cfg, model_cfg, quant_cfg, peft_cfg, max(data.lengths), sequences, _stage(recipe)
        )
        return planned, "fits"
    except LmmtuneError as exc:
        log.warning("%s: %s Trying micro-batch 1.", recipe.label, exc)
        effective = train_cfg.batch_size * train_cfg.grad_accum
        return replace(train_cfg, batch_size=1, grad_accum=effective), "modelled not to fit"


def _throughput(trainer: BenchTrainer, timer: StepTimer, warmup: int, train_cfg) -> dict:
    steps = timer.step_seconds()[warmup:]
    seconds = sum(steps)
    timed = [(int(real), padded) for step, real, padded in trainer.token_counts if step >= warmup]
    real = sum(r for r, _ in timed)
    padded = sum(p for _, p in timed)
    samples = (trainer.state.global_step - warmup) * train_cfg.batch_size * train_cfg.grad_accum
    return {
        "micro_batch": train_cfg.batch_size,
        "grad_accum": train_cfg.grad_accum,
        "timed_steps": trainer.state.global_step - warmup,
        "seconds": seconds,
        "tokens": real,
        "padding_fraction": 1 - real / max(padded, 1),
        "tokens_per_s": real / seconds,
        "samples_per_s": samples / seconds,
        "step_seconds": steps,
    } | ({} if timer.cuda else {"tokens_per_cpu_s": real / sum(timer.step_cpu_seconds()[warmup:])})


def _memory() -> dict:
    free, total = torch.cuda.mem_get_info()
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        # Seen by the card: also the CUDA context and bitsandbytes' paged optimizer states.
        "device_used_gib": (total - free) / GIB,
    }


def _cpu_peak_gib(trainer: BenchTrainer, data: SyntheticLlavaData) -> float:
    """Peak tensor memory of one more micro-batch (a CPU keeps no allocator stats).

    The batch is the same for every configuration: the longest samples.
    """
    longest = sorted(range(len(data)), key=data.lengths.__getitem__)[
        -trainer.args.train_batch_size :
    ]
    batch = trainer.batch_of(longest)
    with PeakTensorMemory(state_tensors(trainer.model, trainer.optimizer)) as memory:
        trainer.training_step(trainer.model, batch)
    trainer.model.zero_grad(set_to_none=True)
    return memory.peak / GIB
