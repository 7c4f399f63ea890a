"""`SFTRecipe`: a supervised fine-tuning run, top to bottom.

    run(): setup -> train -> evaluate -> save, then cleanup

`setup()` opens the run folder, reads the data, loads the model, starts the tracker and
builds the trainer; what it opens (process group, run folder lock, signal guard, tracked
run) is closed again on the way out of `run()`, last first, whatever happens. Another stage
subclasses the recipe and overrides its stage hooks: `preflight`, `build_dataset`,
`sample_lengths`, `build_model`, `build_trainer`, `record_training` and a few small ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from pathlib import Path

import torch
from transformers import set_seed

from lmmtune.data.batches import PaddingCollator, SupervisedDataset
from lmmtune.data.checks import load_splits
from lmmtune.data.grouping import GroupedDataset, Grouping
from lmmtune.distributed import (
    barrier,
    find_unused_parameters,
    generates_here,
    is_main,
    on_main,
    process_group,
    shards_model,
)
from lmmtune.errors import LmmtuneError, RunInterrupted
from lmmtune.eval.description import describe_run, write_model_card
from lmmtune.eval.generate import EvalResult, evaluate, summary
from lmmtune.eval.report import SAMPLES_FILE, log_sample_images, save_eval_report, scalar_tags
from lmmtune.model import (
    apply_lora,
    load_model,
    load_processor,
    require_peft_init,
    resolve_model_path,
    trainable_report,
)
from lmmtune.model_projector import AlignedProjector
from lmmtune.rundir.files import name_base_by_hub_id, write_text_atomic
from lmmtune.rundir.resume import check_image_digests, check_resume, save_data_digest
from lmmtune.rundir.run import (
    RecordRunFiles,
    job_output_dir,
    locked_run_folder,
    removed_if_failed_start,
    save_config,
)
from lmmtune.stages.checks import (
    after_training,
    check_aligned_projector,
    check_eval_prompts,
    check_export_settings,
    check_exported_processor,
    check_saving,
)
from lmmtune.tracking.mlflow_run import (
    TrackerCallback,
    flatten,
    log_datasets,
    tracked_run,
    trainer_summary,
)
from lmmtune.tracking.tracker import last_logged_step, start_tracker
from lmmtune.training.callbacks import (
    InterruptOutsideTraining,
    KeepBestAdapter,
    StopOnNonFinite,
    StopOnSignal,
)
from lmmtune.training.memory import fit_to_memory
from lmmtune.training.trainer import build_trainer, build_training_arguments, require_liger

log = logging.getLogger(__name__)


class SFTRecipe:
    """Supervised fine-tuning with QLoRA: the training stage every other stage extends."""

    sequences_per_sample = 1
    """Sequences one sample puts through the model (what the memory planner counts)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.metrics: dict = {}
        self.resources = contextlib.ExitStack()
        """What setup() opens; run() closes it (the cleanup), last first."""
        self.resume_dir: Path | None = None
        """The folder `train.resume=auto` continues this run in, if not its own (a stage of
        a two-stage run: that run's); what an interrupted run's message names."""

    def run(self) -> dict:
        """The whole stage; returns its metrics (complete on rank 0, to training elsewhere)."""
        with self.resources:  # cleanup: tracked run, signal guard, run folder, process group
            self.setup()
            self.train()
            if is_main():  # what follows (evaluation, metrics, artifacts) is rank 0's
                self.evaluate()
                self.save()
                log.info("run finished: %s", self.folder.root)
        return self.metrics

    # -- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step, each check before the work it protects."""
        self.open_run_folder()
        self.read_data()
        self.guard.phase = "loading the model"
        base = load_model(self.cfg.model, self.cfg.quant, self.aligned)
        self.start_tracking()
        self.model = self.build_model(base)
        self.guard.phase = "preparing training"
        self.trainer = self.build_trainer()
        self.report = self.log_trainable()
        self.guard.phase = "checking that the run can finish"
        self.check_can_finish()

    def check_can_finish(self) -> None:
        """Stage hook, rank 0 before the first step: a dry run of saving the result, and the
        disk space for checkpoints."""
        run_dir, samples = self.folder.root, len(self.lengths)  # conversations, if grouped
        exported, processor = self.exported, self.processor
        on_main(check_saving, self.model, exported, processor, self.train_cfg, samples, run_dir)

    def read_data(self) -> None:
        """The processor and what its exported copy must reproduce, the checked data, and the
        memory plan (train.gpu_memory_gb: batch_size/grad_accum, or refused before the model
        loads)."""
        cfg = self.cfg
        self.guard.phase = "reading the data"
        self.processor = load_processor(cfg.model)
        self.exported = check_exported_processor(self.processor)  # what adapter/ ships
        on_main(check_export_settings, cfg.export, cfg.tracking.backend, self.folder.root)
        self.data_cfg, self.splits = self.build_dataset()
        eval_samples, evaluates_after = self.splits.eval, cfg.eval.after and bool(self.splits.eval)
        on_main(check_eval_prompts, eval_samples, self.processor, self.data_cfg, evaluates_after)
        on_main(check_image_digests, self.splits, self.folder.data_digest)  # a resume: same images
        self.grouping = self.grouped_training_set()
        self.lengths = self.sample_lengths()
        longest, per_sample = max(self.lengths, default=1), self.sequences_per_sample
        self.train_cfg = fit_to_memory(
            cfg.train, cfg.model, cfg.quant, cfg.peft, longest, per_sample, cfg.stage
        )

    def open_run_folder(self) -> None:
        """Join the process group, then create or reopen the run folder (a resume: the same
        settings and data, or refused before any work) and lock it; from here on
        SIGINT/SIGTERM mark the run KILLED and name the resume command."""
        cfg, enter = self.cfg, self.resources.enter_context
        enter(process_group())
        cfg.output_dir = job_output_dir(cfg.output_dir)
        run_dir = Path(cfg.output_dir)
        enter(removed_if_failed_start(run_dir))
        self.aligned = self.aligned_projector()
        self.preflight()
        self.folder, self.resume_from = enter(locked_run_folder(cfg))
        resume_dir = self.resume_dir or run_dir
        hint = f"Resume with the same command plus: output_dir={resume_dir} train.resume=auto"
        self.guard = enter(InterruptOutsideTraining(hint))
        if cfg.train.resume is not None:
            on_main(check_resume, cfg, self.folder.config, self.folder.data_digest)
        on_main(save_config, cfg, run_dir)
        on_main(save_data_digest, cfg, self.folder.data_digest)

    def preflight(self) -> None:
        """Stage hook: what refuses the run before its folder is touched."""
        require_liger(self.cfg.train.loss_impl)
        require_peft_init(self.cfg.peft)

    def aligned_projector(self) -> AlignedProjector | None:
        """Stage hook: the projector the base starts with (model.projector), or None."""
        return check_aligned_projector(self.cfg)

    def build_dataset(self):
        """Stage hook: (data settings, checked splits); the demo set is written once."""
        splits = on_main(load_splits, self.cfg.data, self.folder.root, self.processor)
        return self.cfg.data, splits

    def grouped_training_set(self) -> Grouping | None:
        """Stage hook: the training split as conversations per image (data.group_by_image),
        or None (one sample per record)."""
        if not self.data_cfg.group_by_image:
            return None
        grouping = self.splits.report.grouping
        log.info("data.group_by_image: %s", grouping.describe(on=True))
        return grouping

    def sample_lengths(self) -> list[int]:
        """Stage hook: tokens of each training sample (length grouping, memory planner)."""
        if self.grouping is not None:
            return self.grouping.lengths  # each conversation in its longest turn order
        return self.splits.report.train_lengths  # counted by the data check, images included

    def start_tracking(self) -> None:
        """Start the tracked run (ended FINISHED, KILLED or FAILED on the way out)."""
        run_dir = self.folder.root
        tracker = start_tracker(
            self.cfg.tracking, self.cfg.name, run_dir.name, run_dir, resume=True
        )
        self.tracker = self.resources.enter_context(tracked_run(tracker))
        self.tracker.set_tags(self.run_tags())
        if self.resume_from is None:
            self.log_settings()
        self.metrics["data"] = self.data_counts()

    def run_tags(self) -> dict[str, str]:
        cfg = self.cfg
        return {
            "recipe": cfg.name,
            "base_model": cfg.model.path,
            "run_dir": str(self.folder.root.resolve()),
            **(self.aligned.tags() if self.aligned is not None else {}),
        }

    def log_settings(self) -> None:
        """The settings as configured, the memory planner's choice beside them, the data."""
        self.tracker.log_params(flatten(self.cfg))
        if self.train_cfg is not self.cfg.train:
            plan = {
                "batch_size": self.train_cfg.batch_size,
                "grad_accum": self.train_cfg.grad_accum,
            }
            self.tracker.log_params({f"memory_plan.{key}": n for key, n in plan.items()})
        if self.grouping is not None:
            self.tracker.log_params(grouping_params(self.grouping))
        self.log_datasets()

    def log_datasets(self) -> None:
        log_datasets(self.tracker, self.splits)

    def data_counts(self) -> dict[str, int]:
        splits = self.splits
        counts = {
            "train_samples": len(splits.train),
            "eval_samples": len(splits.eval),
            "skipped_records": len(splits.problems),
        }
        if self.grouping is not None:
            counts["train_conversations"] = len(self.grouping.conversations)
        return counts

    def build_model(self, base: torch.nn.Module) -> torch.nn.Module:
        """Stage hook: the model to train from the loaded base: the base is evaluated, then
        wrapped with LoRA (the projector trained in full or frozen, as configured)."""
        self.evaluate_before(base)
        set_seed(self.cfg.train.seed)  # LoRA's random init: the same seed gives the same run
        carry = self.aligned is not None  # the adapter carries the aligned projector
        return apply_lora(base, self.cfg.peft, self.cfg.train.gradient_checkpointing, carry)

    def evaluate_before(self, model) -> None:
        """Generation metrics before training, on rank 0 while the others wait; measured
        once: a resumed run reads them (its predictions are not kept)."""
        self.guard.phase = "evaluating before training"
        self.evaluates = bool(self.splits.eval) and generates_here()
        self.before = None
        if self.cfg.eval.before and self.evaluates:
            self.before = self.measured_before(model)
            self.metrics["eval_before"] = self.before.metrics
        barrier()

    def measured_before(self, model) -> EvalResult:
        saved = self.folder.eval_before
        if saved.exists():  # measured before a crash
            return EvalResult(metrics=json.loads(saved.read_text()), predictions=[])
        cfg = self.cfg
        before = evaluate(
            model,
            self.processor,
            self.splits.eval,
            cfg.eval,
            cfg.data.max_image_pixels,
            "eval before",
        )
        log.info("eval before training: %s", summary(before.metrics))
        self.tracker.set_tags(scalar_tags("eval_before", before.metrics))  # no one-bar charts
        write_text_atomic(saved, json.dumps(before.metrics))
        return before

    def build_trainer(self):
        """Stage hook: lmmtune's Trainer over the tokenized samples."""
        cfg, splits, data_cfg = self.cfg, self.splits, self.data_cfg
        args = build_training_arguments(
            self.train_cfg, self.folder.root, cfg.data.num_workers, cfg.model.dtype
        )
        args.ddp_find_unused_parameters = find_unused_parameters(
            cfg.peft.train_lm_head, self.train_cfg.loss_impl
        )
        train_set, eval_set = (
            SupervisedDataset(
                samples,
                self.processor,
                data_cfg.max_length,
                data_cfg.max_image_pixels,
                data_cfg.template,
                data_cfg.pad_to_square,
            )  # fmt: skip
            for samples in (splits.train, splits.eval)
        )
        if self.grouping is not None:  # eval loss stays per question, as eval is
            train_set = GroupedDataset(
                self.grouping.conversations,
                self.processor,
                data_cfg.max_length,
                data_cfg.max_image_pixels,
                cfg.train.seed,
            )
        collator = PaddingCollator(self.processor.tokenizer.pad_token_id)
        return build_trainer(
            self.model,
            train_set,
            collator,
            args,
            cfg.peft,
            self.lengths,
            self.callbacks(),
            eval_set,
        )

    def callbacks(self) -> list:
        """Tracking (a resumed run logs no value twice at a step), clean stops on a signal or
        a non-finite loss, the run folder's file record, and train.keep_best."""
        run_dir = self.folder.root
        self.stop = StopOnSignal()
        logged = last_logged_step(run_dir) if self.resume_from else None
        callbacks = [TrackerCallback(self.tracker, logged), StopOnNonFinite(), self.stop]
        self.keep_best = self.best_adapter_keeper()
        return [*callbacks, RecordRunFiles(run_dir), *filter(None, [self.keep_best])]

    def best_adapter_keeper(self) -> KeepBestAdapter | None:
        """The train.keep_best callback, or None; refused where no process holds all weights."""
        if not self.train_cfg.keep_best:
            return None
        if shards_model():
            raise LmmtuneError(
                "train.keep_best is not supported under FSDP/DeepSpeed (no process holds all "
                "trainable weights); use data parallel, or pick a checkpoint by its eval/loss"
            )
        return KeepBestAdapter(self.folder.root)

    def log_trainable(self):
        """The trainable parameters, counted, logged, and in the run's description."""
        report = trainable_report(self.model)
        log.info("%s", report)
        if self.resume_from is None:
            self.tracker.log_params(report.as_dict())
        describe_run(self.tracker, self.cfg, self.train_cfg, self.metrics, report)
        return report

    # -- train ---------------------------------------------------------------------------

    def train(self) -> None:
        """The training loop and its numbers; it ends with the adapter saved."""
        resume_dir = self.resume_dir or self.folder.root
        result = run_training(self.trainer, self.stop, self.resume_from, resume_dir)
        self.record_training(result)
        name_base_by_hub_id(self.model, self.cfg.model.path)  # no local cache path in files
        self.save_adapter()

    def record_training(self, result) -> None:
        """Stage hook: the training's metrics; with train.keep_best, the best weights back."""
        history = self.trainer.state.log_history
        self.metrics["train"] = {
            **training_numbers(history, result),
            "summary": trainer_summary(history),  # no chart of one point each
        }
        if self.keep_best is not None:
            barrier()  # rank 0 wrote the best weights; every rank loads them
            best = self.keep_best.restore(self.model)
            if best is not None:
                self.metrics["train"]["best"] = best
                self.tracker.log_metrics({"eval/best_loss": best["eval_loss"]}, step=best["step"])

    def save_adapter(self) -> None:
        """The trained adapter and the processor it ships in RUN/adapter (under FSDP or
        DeepSpeed every rank takes part in gathering the shards)."""
        folder = self.folder
        if shards_model():
            self.trainer.save_model(folder.adapter)
        if not is_main():
            return
        self.guard.phase = "saving the adapter"
        with after_training("saving the adapter", folder):
            if not shards_model():
                self.model.save_pretrained(folder.adapter)
            if self.aligned is not None:  # what the base ("before", adapter off) starts from
                self.aligned.save_copy(folder.adapter)
            self.exported.save_pretrained(folder.adapter)  # loads alone: padding, chat template
            base_model = {"base_model": resolve_model_path(self.cfg.model)}
            folder.base_model_file.write_text(json.dumps(base_model))

    # -- evaluate ------------------------------------------------------------------------

    def evaluate(self) -> None:
        """Rank 0: generation metrics after training, and the predictions report beside the
        ones before. A failure keeps the saved adapter and names the command that redoes it."""
        self.guard.phase = "evaluating after training (the adapter is saved)"
        cfg, folder, eval_samples = self.cfg, self.folder, self.splits.eval
        with after_training("evaluating after training", folder):
            after = None
            if cfg.eval.after and self.evaluates:
                after = evaluate(
                    self.model,
                    self.exported,
                    eval_samples,
                    cfg.eval,
                    cfg.data.max_image_pixels,
                    "eval after",
                )
                self.metrics["eval_after"] = after.metrics
                log.info("eval after training: %s", summary(after.metrics))
                self.tracker.set_tags(scalar_tags("eval_after", after.metrics))
            if self.before is not None or after is not None:  # predictions table and chart
                save_eval_report(
                    folder.root, "eval_", eval_samples, self.before, after, self.tracker,
                    cfg.data.max_image_pixels, cfg.eval.table_images,
                )  # fmt: skip
                log_sample_images(self.tracker, folder.eval_predictions, folder.root / SAMPLES_FILE)

    # -- save ----------------------------------------------------------------------------

    def save(self) -> None:
        """Rank 0: the description, the model card, metrics.json, and the run's files and
        model in MLflow (a failed upload names `import RUN`, which redoes it)."""
        cfg, folder, tracker = self.cfg, self.folder, self.tracker
        describe_run(tracker, cfg, self.train_cfg, self.metrics, self.report)
        with after_training("writing the model card and metrics.json", folder):
            write_model_card(folder.adapter, cfg, self.train_cfg, self.metrics, self.report)
            write_text_atomic(folder.metrics, json.dumps(self.metrics, indent=2))
        redo = f"python -m lmmtune import {folder.root}"
        with after_training("logging the run to MLflow", folder, redo=redo):
            for artifact in (folder.config, folder.metrics, folder.adapter):
                tracker.log_artifact(artifact)
            tracker.log_adapter_model(folder.adapter)  # the run's model, loadable as pyfunc


def grouping_params(grouping: Grouping) -> dict:
    """What data.group_by_image made of the training split, as MLflow params."""
    return {
        "data.grouping.conversations": len(grouping.conversations),
        "data.grouping.samples_per_conversation": round(grouping.ratio, 3),
        "data.grouping.tokens_per_epoch": grouping.tokens_after,
        "data.grouping.tokens_per_epoch_ungrouped": grouping.tokens_before,
    }


def run_training(trainer, stop: StopOnSignal, resume_from: Path | None, resume_dir: Path):
    """`trainer.train()` with clean stops: a signal saves and exits (naming `resume_dir`, the
    folder to resume in), an OOM says what to lower."""
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError as exc:
        raise LmmtuneError(out_of_memory_message(trainer.args, exc)) from None
    finally:
        stop.uninstall()
    if stop.received is not None:
        name = signal.Signals(stop.received).name
        raise RunInterrupted(
            f"{name}: stopped after step {trainer.state.global_step} and saved a checkpoint. "
            f"Resume with the same command plus: output_dir={resume_dir} train.resume=auto",
            stop.received,
        )
    return result


def out_of_memory_message(args, exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
    return (
        f"out of GPU memory ({first_line[:200]}). Lower train.batch_size "
        f"(now {args.per_device_train_batch_size}) and raise train.grad_accum to keep the effective batch, "
        "lower data.max_length, keep train.gradient_checkpointing=true, or set train.gpu_memory_gb=<your card> "
        "to let the memory planner choose."
    )


def training_numbers(log_history: list[dict], result) -> dict:
    """The whole run's mean loss, its steps and the logged losses."""
    return {
        "loss": whole_run_loss(log_history, result.training_loss),
        "steps": result.global_step,
        "loss_history": [e["loss"] for e in log_history if "loss" in e],
    }


def whole_run_loss(log_history: list[dict], fallback: float) -> float:
    """The mean training loss over every step of the run, a resumed one too.

    Each logged loss is the mean since the log before it, so it counts for the steps it
    covers. (The Trainer's own number covers only the steps of this process.)
    """
    logged = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    if not logged:
        return fallback
    total, previous = 0.0, 0
    for step, loss in logged:
        total += loss * (step - previous)
        previous = step
    return total / previous if previous else fallback
