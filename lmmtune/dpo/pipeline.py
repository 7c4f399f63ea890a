"""`train_dpo(cfg)`: the preference stage, top to bottom, on the SFT pipeline's pieces.

config -> pairs -> model -> policy (SFT adapter or fresh LoRA) -> eval before (generation
and held-out rewards) -> DPO -> save adapter -> eval after -> metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import set_seed

from lmmtune.data.pairs import check_rejected_lengths
from lmmtune.data.splits import load_splits
from lmmtune.distributed import barrier, generates_here, is_main, on_main, shards_model
from lmmtune.dpo.collator import PreferenceCollator
from lmmtune.dpo.demo import pair_data_config
from lmmtune.dpo.model import check_init_adapter, sft_parent, start_policy
from lmmtune.dpo.trainer import REFERENCE_ADAPTER, build_dpo_arguments, build_dpo_trainer
from lmmtune.eval.description import describe_run
from lmmtune.model.adapters import PROJECTOR, trainable_report
from lmmtune.model.load import load_model, load_processor, resolve_model_path
from lmmtune.pipeline import (
    check_saving,
    eval_before,
    finish_run,
    in_run_dir,
    log_run_files,
    run_training,
    whole_run_loss,
)
from lmmtune.preflight import check_eval_prompts, check_export_settings, check_exported_processor
from lmmtune.resume import check_image_digests
from lmmtune.rundir import RunDir
from lmmtune.track.mlflow_tracker import TrackerCallback, flatten, tracked_run
from lmmtune.track.record import last_logged_step
from lmmtune.track.tracker import start_tracker
from lmmtune.train.guards import StopOnNonFinite, StopOnSignal
from lmmtune.train.memory import fit_to_memory
from lmmtune.weights import name_base_by_hub_id

log = logging.getLogger(__name__)
SEQUENCES_PER_PAIR = 2
"""A DPO step puts the chosen and the rejected conversation of each pair through the model."""


def train_dpo(cfg) -> dict:
    """The DPO run; its starting adapter is checked before the run directory is touched."""
    check_init_adapter(cfg.dpo, resolve_model_path(cfg.model))
    return in_run_dir(cfg, dpo_stage)


def dpo_stage(cfg, run: RunDir, resume_from: Path | None, guard) -> dict:
    """The DPO run, in a run directory already prepared; `guard.phase` names what runs."""
    run_dir = run.root
    guard.phase = "reading the data"
    processor = load_processor(cfg.model)
    exported = check_exported_processor(processor)  # what adapter/ and exports ship
    on_main(check_export_settings, cfg.export, cfg.tracking.backend, run_dir)
    data_cfg = on_main(pair_data_config, cfg.data, run_dir)  # demo pairs are written once
    splits = on_main(load_splits, data_cfg, run_dir, processor, pairs_only=True)
    on_main(check_eval_prompts, splits.eval, processor, data_cfg, cfg.eval.after)
    on_main(check_image_digests, splits, run.data_digest)  # a resume: the same images
    lengths = pair_lengths(splits.train, splits.report.train_lengths, processor, data_cfg)
    train_cfg = fit_to_memory(
        cfg.train, cfg.model, cfg.quant, cfg.peft, max(lengths, default=1), SEQUENCES_PER_PAIR
    )
    guard.phase = "loading the model"
    model = load_model(cfg.model, cfg.quant)

    tracker = start_tracker(cfg.tracking, cfg.name, run_dir.name, run_dir, resume=True)
    with tracked_run(tracker):
        tracker.set_tags(
            {
                "recipe": cfg.name,
                "stage": "dpo",
                "base_model": cfg.model.path,
                "run_dir": str(run_dir.resolve()),
                **sft_parent(cfg.dpo),
            }
        )
        if resume_from is None:
            tracker.log_params(flatten(cfg))
        metrics = {"data": {"train_pairs": len(splits.train), "eval_pairs": len(splits.eval)}}

        set_seed(cfg.train.seed)  # a fresh LoRA's random init
        model = start_policy(model, cfg)
        evaluates = bool(splits.eval) and generates_here()
        guard.phase = "evaluating before training"
        before = eval_before(cfg, model, processor, splits.eval, run, tracker, metrics, evaluates)
        barrier()
        guard.phase = "preparing training"

        args = build_dpo_arguments(
            train_cfg, cfg.dpo, run_dir, cfg.data.num_workers, cfg.model.dtype
        )
        # The held-out preference before training, measured by the Trainer once it has wrapped
        # the model: an evaluate() before train() marks the model prepared, and under DDP the
        # training then runs unwrapped, each process on its own gradients.
        args.eval_on_start = bool(splits.eval) and resume_from is None
        stop = StopOnSignal()
        collator = PreferenceCollator(
            splits.train + splits.eval, processor, data_cfg.max_length, data_cfg.max_image_pixels
        )
        trainer = build_dpo_trainer(
            model,
            splits.train,
            splits.eval,
            collator,
            args,
            processor,
            cfg.peft.projector_lr,
            lengths,
            # a resumed run logs no value twice at a step
            [TrackerCallback(tracker, last_logged_step(run_dir) if resume_from else None)]
            + [StopOnNonFinite(), stop],
            cfg.dpo.reference,
            frozen=() if cfg.dpo.train_projector else (PROJECTOR,),
        )
        report = trainable_report(model)
        log.info("%s", report)
        if resume_from is None:
            tracker.log_params(report.as_dict())
        guard.phase = "checking that the run can finish"
        on_main(check_saving, model, exported, processor, train_cfg, len(splits.train), run_dir)
        result = run_training(trainer, stop, resume_from, run_dir)
        if args.eval_on_start:
            metrics["preference_before"] = preference_at_start(trainer.state.log_history)
        metrics["train"] = train_summary(trainer, result)
        if splits.eval:
            metrics["preference_after"] = held_out_preference(trainer)
        drop_reference_adapter(model)

        name_base_by_hub_id(model, cfg.model.path)  # no local cache path in shared files
        if shards_model():
            trainer.save_model(run.adapter)
        if not is_main():
            return metrics
        guard.phase = "evaluating after training (the adapter is saved)"
        finish_run(cfg, model, exported, splits, run, tracker, metrics, before, evaluates)
        describe_run(tracker, cfg, train_cfg, metrics, report)
        log_run_files(run, tracker, metrics, cfg, train_cfg, report)
    log.info("run finished: %s", run_dir)
    return metrics


def pair_lengths(samples, chosen_lengths: list[int], processor, data_cfg) -> list[int]:
    """Tokens of each pair's longer side: what the length grouping and the planner see."""
    _, rejected = check_rejected_lengths(samples, processor, data_cfg.max_length)
    return [max(n, rejected[s.source]) for s, n in zip(samples, chosen_lengths, strict=True)]


PREFERENCE_KEYS = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def held_out_preference(trainer) -> dict:
    """Reward accuracy, margin and log-probs on the eval pairs (TRL's evaluation loop)."""
    return preference(trainer.evaluate())


def preference_at_start(history: list[dict]) -> dict:
    """The held-out preference the Trainer measured before the first step (`eval_on_start`)."""
    return preference(next(e for e in history if f"eval_{PREFERENCE_KEYS[0]}" in e))


def preference(logs: dict) -> dict:
    found = {key: logs[f"eval_{key}"] for key in PREFERENCE_KEYS if f"eval_{key}" in logs}
    found["logp_margin"] = found["logps/chosen"] - found["logps/rejected"]
    log.info("held-out preference: %s", found)
    return found


def train_summary(trainer, result) -> dict:
    history = trainer.state.log_history
    return {
        "loss": whole_run_loss(history, result.training_loss),
        "steps": result.global_step,
        "loss_history": [e["loss"] for e in history if "loss" in e],
        "reward_accuracy_history": [
            e["rewards/accuracies"] for e in history if "rewards/accuracies" in e
        ],
    }


def drop_reference_adapter(model) -> None:
    """The frozen reference copy (dpo.reference=initial) is not part of the result."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
