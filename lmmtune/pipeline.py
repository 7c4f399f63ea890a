"""`train(cfg)`: the whole job, top to bottom.

config -> data -> model -> eval before -> LoRA -> train -> save adapter -> eval after -> metrics.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import signal
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import set_seed

from lmmtune.atomic import write_text_atomic
from lmmtune.config import Config
from lmmtune.data.dataset import PaddingCollator, SupervisedDataset
from lmmtune.data.splits import load_splits
from lmmtune.distributed import (
    barrier,
    find_unused_parameters,
    generates_here,
    is_main,
    on_main,
    shards_model,
)
from lmmtune.errors import LmmtuneError, RunInterrupted
from lmmtune.eval.description import describe_run
from lmmtune.eval.evaluate import EvalResult, evaluate, summary
from lmmtune.eval.report import save_eval_report, scalar_tags
from lmmtune.eval.samples import SAMPLES_FILE, log_sample_images
from lmmtune.export.model_card import write_model_card
from lmmtune.model.adapters import apply_lora, trainable_report
from lmmtune.model.load import load_model, load_processor, resolve_model_path
from lmmtune.preflight import (
    check_eval_prompts,
    check_export_settings,
    check_exported_processor,
    check_space_for_checkpoints,
    dry_run_save,
)
from lmmtune.resume import check_image_digests, check_resume, save_data_digest
from lmmtune.rundir import (
    RecordRunFiles,
    RunDir,
    prepare_run_dir,
    record_run_files,
    release_lock,
    save_config,
)
from lmmtune.track.datasets import log_datasets
from lmmtune.track.mlflow_tracker import (
    TrackerCallback,
    flatten,
    tracked_run,
    trainer_summary,
)
from lmmtune.track.record import last_logged_step
from lmmtune.track.tracker import start_tracker
from lmmtune.train.best import KeepBestAdapter
from lmmtune.train.checkpoints import completed_checkpoints
from lmmtune.train.guards import InterruptOutsideTraining, StopOnNonFinite, StopOnSignal
from lmmtune.train.liger import require_liger
from lmmtune.train.memory import fit_to_memory
from lmmtune.train.trainer import build_trainer, build_training_arguments
from lmmtune.weights import name_base_by_hub_id

log = logging.getLogger(__name__)


def train(cfg: Config | DictConfig) -> dict:
    require_liger(cfg.train.loss_impl)  # before anything is written or loaded
    return in_run_dir(cfg, train_in)


def in_run_dir(cfg: Config | DictConfig, stage) -> dict:
    """Run a training stage (SFT or DPO) in its prepared run directory.

    The directory is created or reopened (resume: the same settings and data, or refused
    before any work), locked while the stage runs, and its files recorded for overwrite=true;
    SIGINT/SIGTERM outside the training loop mark the run KILLED with the resume command.
    """
    run_dir = Path(cfg.output_dir)
    # Under torchrun / accelerate launch, rank 0 writes and checks; the other ranks get its results.
    resume_from = on_main(
        prepare_run_dir, run_dir, cfg.overwrite, cfg.train.resume, command_inputs(cfg)
    )
    hint = f"Resume with the same command plus: output_dir={run_dir} train.resume=auto"
    try:
        with InterruptOutsideTraining(hint) as guard:  # SIGINT/SIGTERM: marked KILLED, a message
            run = RunDir(run_dir)
            if cfg.train.resume is not None:  # same settings and data, or refused before any work
                on_main(check_resume, cfg, run.config, run.data_digest)
            on_main(save_config, cfg, run_dir)
            on_main(save_data_digest, cfg, run.data_digest)
            return stage(cfg, run, resume_from, guard)
    finally:
        if is_main():
            record_run_files(run_dir)  # what overwrite=true may clear later
            release_lock(run_dir)


def command_inputs(cfg: Config | DictConfig) -> list[tuple[str, str]]:
    """The paths a training reads (setting, path): overwrite=true never deletes one of them.
    A data glob stands for the files it matches."""
    resume = cfg.train.resume if cfg.train.resume != "auto" else None
    settings = {
        "model.path": cfg.model.path,
        "data.train": cfg.data.train,
        "data.eval": cfg.data.eval,
        "data.image_root": cfg.data.image_root,
        "dpo.init_adapter": cfg.dpo.init_adapter,
        "train.resume": resume,
    }
    return [
        (key, path)
        for key, value in settings.items()
        if value
        for path in (glob.glob(value, recursive=True) if glob.has_magic(value) else [value])
    ]


def train_in(cfg: Config | DictConfig, run: RunDir, resume_from: Path | None, guard) -> dict:
    """The SFT run, in a run directory already prepared; `guard.phase` names what runs."""
    run_dir = run.root
    guard.phase = "reading the data"
    processor = load_processor(cfg.model)
    exported = check_exported_processor(processor)  # what adapter/ and exports ship
    on_main(check_export_settings, cfg.export, cfg.tracking.backend, run_dir)
    splits = on_main(load_splits, cfg.data, run_dir, processor)  # the demo set is written once
    evaluates_after = cfg.eval.after and bool(splits.eval)
    on_main(check_eval_prompts, splits.eval, processor, cfg.data, evaluates_after)
    on_main(check_image_digests, splits, run.data_digest)  # a resume: the same images
    train_set = SupervisedDataset(
        splits.train, processor, cfg.data.max_length, cfg.data.max_image_pixels
    )
    lengths = splits.report.train_lengths  # counted by the data check, image tokens included
    # train.gpu_memory_gb: pick batch_size/grad_accum, or fail here, before the model loads.
    train_cfg = fit_to_memory(cfg.train, cfg.model, cfg.quant, cfg.peft, max(lengths, default=1))
    guard.phase = "loading the model"
    model = load_model(cfg.model, cfg.quant)

    tracker = start_tracker(cfg.tracking, cfg.name, run_dir.name, run_dir, resume=True)
    with tracked_run(tracker):
        tracker.set_tags(
            {"recipe": cfg.name, "base_model": cfg.model.path, "run_dir": str(run_dir.resolve())}
        )
        if resume_from is None:
            tracker.log_params(flatten(cfg))  # as configured; the planner's choice beside it
            if train_cfg is not cfg.train:
                tracker.log_params(
                    {
                        "memory_plan.batch_size": train_cfg.batch_size,
                        "memory_plan.grad_accum": train_cfg.grad_accum,
                    }
                )
            log_datasets(tracker, splits)
        metrics = {
            "data": {
                "train_samples": len(splits.train),
                "eval_samples": len(splits.eval),
                "skipped_records": len(splits.problems),
            }
        }

        evaluates = bool(splits.eval) and generates_here()  # rank 0; the others wait at barrier()
        guard.phase = "evaluating before training"
        before = eval_before(cfg, model, processor, splits.eval, run, tracker, metrics, evaluates)
        barrier()

        guard.phase = "preparing training"
        set_seed(cfg.train.seed)  # LoRA's random init: the same seed gives the same run
        model = apply_lora(model, cfg.peft, cfg.train.gradient_checkpointing)
        report = trainable_report(model)
        log.info("%s", report)
        if resume_from is None:
            tracker.log_params(report.as_dict())
        describe_run(tracker, cfg, train_cfg, metrics, report)
        guard.phase = "checking that the run can finish"
        on_main(check_saving, model, exported, processor, train_cfg, len(splits.train), run_dir)

        args = build_training_arguments(train_cfg, run_dir, cfg.data.num_workers, cfg.model.dtype)
        args.ddp_find_unused_parameters = find_unused_parameters(
            cfg.peft.train_lm_head, train_cfg.loss_impl
        )
        collator = PaddingCollator(processor.tokenizer.pad_token_id)
        stop = StopOnSignal()
        logged = last_logged_step(run_dir) if resume_from else None  # no value twice at a step
        callbacks = [
            TrackerCallback(tracker, logged),
            StopOnNonFinite(),
            stop,
            RecordRunFiles(run_dir),
        ]
        keep_best = best_adapter_keeper(train_cfg, run_dir)
        if keep_best is not None:
            callbacks.append(keep_best)
        eval_set = SupervisedDataset(
            splits.eval, processor, cfg.data.max_length, cfg.data.max_image_pixels
        )
        trainer = build_trainer(
            model, train_set, collator, args, cfg.peft, lengths, callbacks, eval_set
        )
        result = run_training(trainer, stop, resume_from, run_dir)
        metrics["train"] = {
            "loss": whole_run_loss(trainer.state.log_history, result.training_loss),
            "steps": result.global_step,
            "loss_history": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "summary": trainer_summary(trainer.state.log_history),  # no chart of one point each
        }
        if keep_best is not None:
            barrier()  # rank 0 wrote the best weights; every rank loads them
            best = keep_best.restore(model)
            if best is not None:
                metrics["train"]["best"] = best
                tracker.log_metrics({"eval/best_loss": best["eval_loss"]}, step=best["step"])

        name_base_by_hub_id(model, cfg.model.path)  # no local cache path in shared files
        if shards_model():
            trainer.save_model(run.adapter)  # every rank takes part in gathering the shards
        if not is_main():
            return metrics  # what follows (adapter, eval, metrics, artifacts) is rank 0's
        guard.phase = "evaluating after training (the adapter is saved)"
        finish_run(cfg, model, exported, splits, run, tracker, metrics, before, evaluates)
        describe_run(tracker, cfg, train_cfg, metrics, report)
        log_run_files(run, tracker, metrics, cfg, train_cfg, report)
    log.info("run finished: %s", run_dir)
    return metrics


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


def eval_before(
    cfg, model, processor, samples, run: RunDir, tracker, metrics: dict, evaluates: bool
) -> EvalResult | None:
    """Generation metrics of the model before training (measured once: a resumed run reads them)."""
    if not (cfg.eval.before and evaluates):
        return None
    if run.eval_before.exists():  # measured before the crash (its predictions are not kept)
        before = EvalResult(metrics=json.loads(run.eval_before.read_text()), predictions=[])
    else:
        before = evaluate(
            model, processor, samples, cfg.eval, cfg.data.max_image_pixels, "eval before"
        )
        log.info("eval before training: %s", summary(before.metrics))
        tracker.set_tags(scalar_tags("eval_before", before.metrics))  # no one-bar charts
        write_text_atomic(run.eval_before, json.dumps(before.metrics))
    metrics["eval_before"] = before.metrics
    return before


def finish_run(
    cfg, model, processor, splits, run: RunDir, tracker, metrics: dict, before, evaluates: bool
) -> None:
    """Rank 0 after training: save the adapter (unless sharded), evaluate it, write the report.

    `processor` is the exported one (`check_exported_processor`): the adapter folder ships
    it. A step that fails keeps what training made and names the command that redoes it.
    """
    with after_training("saving the adapter", run):
        if not shards_model():
            model.save_pretrained(run.adapter)
        processor.save_pretrained(run.adapter)  # loads alone: padding, chat template
        run.base_model_file.write_text(json.dumps({"base_model": resolve_model_path(cfg.model)}))
    after = None
    with after_training("evaluating after training", run):
        if cfg.eval.after and evaluates:
            after = evaluate(
                model, processor, splits.eval, cfg.eval, cfg.data.max_image_pixels, "eval after"
            )
            metrics["eval_after"] = after.metrics
            log.info("eval after training: %s", summary(after.metrics))
            tracker.set_tags(scalar_tags("eval_after", after.metrics))  # no one-bar charts
        if before is not None or after is not None:  # predictions table and chart
            save_eval_report(
                run.root,
                "eval_",
                splits.eval,
                before,
                after,
                tracker,
                cfg.data.max_image_pixels,
                cfg.eval.table_images,
            )
            log_sample_images(tracker, run.eval_predictions, run.root / SAMPLES_FILE)


def log_run_files(run: RunDir, tracker, metrics: dict, cfg, train_cfg, report) -> None:
    """The adapter's model card, metrics.json, and the run's files and model in MLflow."""
    with after_training("writing the model card and metrics.json", run):
        write_model_card(run.adapter, cfg, train_cfg, metrics, report)
        write_text_atomic(run.metrics, json.dumps(metrics, indent=2))
    with after_training(
        "logging the run to MLflow", run, redo=f"python -m lmmtune import {run.root}"
    ):
        for artifact in (run.config, run.metrics, run.adapter):
            tracker.log_artifact(artifact)
        tracker.log_adapter_model(run.adapter)  # the run's model in MLflow, loadable as pyfunc


@contextlib.contextmanager
def after_training(step: str, run: RunDir, redo: str | None = None):
    """Turn a failure of a step after training into one line: what failed, where the trained
    weights are kept, and the command that redoes it (by default: resume from the last
    checkpoint, which trains no step again and does everything after training)."""
    try:
        yield
    except RunInterrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever it is, the run keeps its weights
        redo = redo or (
            f"the same command plus: output_dir={run.root} train.resume=auto (it continues "
            "from the last checkpoint: no training step is repeated)"
        )
        reason = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise LmmtuneError(
            f"training finished, but {step} failed: {reason}. The trained weights are kept in "
            f"{kept_weights(run)}; nothing of the run was deleted. Redo it with {redo}"
        ) from exc


def kept_weights(run: RunDir) -> Path:
    """Where the trained weights are: the adapter folder once saved, else the last checkpoint."""
    if any(run.adapter.glob("adapter_model.*")):
        return run.adapter
    checkpoints = completed_checkpoints(run.checkpoints)
    return checkpoints[-1] if checkpoints else run.checkpoints


def check_saving(model, exported, processor, train_cfg, samples: int, run_dir: Path) -> None:
    """Rank 0, before the first step: the dry-run save, then the disk space for checkpoints."""
    adapter_bytes = dry_run_save(model, exported, processor, run_dir)
    check_space_for_checkpoints(model, adapter_bytes, train_cfg, samples, run_dir)


def best_adapter_keeper(train_cfg, run_dir: Path) -> KeepBestAdapter | None:
    """The train.keep_best callback, or None; refused where no process holds all weights."""
    if not train_cfg.keep_best:
        return None
    if shards_model():
        raise LmmtuneError(
            "train.keep_best is not supported under FSDP/DeepSpeed (no process holds all "
            "trainable weights); use data parallel, or pick a checkpoint by its eval/loss"
        )
    return KeepBestAdapter(run_dir)


def run_training(trainer, stop: StopOnSignal, resume_from: Path | None, run_dir: Path):
    """`trainer.train()` with clean stops: a signal saves and exits, an OOM says what to lower."""
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
            f"Resume with the same command plus: output_dir={run_dir} train.resume=auto",
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
