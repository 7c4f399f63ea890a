"""`train(cfg)`: the whole job, top to bottom.

config -> data -> model -> eval before -> LoRA -> train -> save adapter -> eval after -> metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmmtune.config import Config
from lmmtune.data.dataset import PaddingCollator, SupervisedDataset
from lmmtune.data.splits import load_splits
from lmmtune.errors import LmmtuneError
from lmmtune.eval.evaluate import evaluate
from lmmtune.model.adapters import apply_lora, trainable_report
from lmmtune.model.load import load_model, load_processor, resolve_model_path
from lmmtune.track.mlflow_tracker import TrackerCallback, flatten, start_tracker
from lmmtune.train.trainer import build_trainer, build_training_arguments

log = logging.getLogger(__name__)


def train(cfg: Config | DictConfig) -> dict:
    run_dir = prepare_run_dir(Path(cfg.output_dir), cfg.overwrite)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    splits = load_splits(cfg.data, run_dir)
    processor = load_processor(cfg.model)
    train_set = SupervisedDataset(splits.train, processor, cfg.data.max_length)
    lengths = [
        len(train_set.tokenize(sample)[0]) for sample in splits.train
    ]  # also enforces max_length
    model = load_model(cfg.model, cfg.quant)

    tracker = start_tracker(cfg.tracking, experiment=cfg.name, run_name=run_dir.name)
    try:
        tracker.set_tags(
            {"recipe": cfg.name, "base_model": cfg.model.path, "run_dir": str(run_dir.resolve())}
        )
        tracker.log_params(flatten(cfg))
        metrics = {
            "data": {
                "train_samples": len(splits.train),
                "eval_samples": len(splits.eval),
                "skipped_records": len(splits.problems),
            }
        }

        if cfg.eval.before and splits.eval:
            metrics["eval_before"] = evaluate(
                model, processor, splits.eval, cfg.eval, "eval before"
            ).metrics
            log.info("eval before training: %s", metrics["eval_before"])
            tracker.log_metrics({f"eval_before/{k}": v for k, v in metrics["eval_before"].items()})

        model = apply_lora(model, cfg.peft, cfg.train.gradient_checkpointing)
        report = trainable_report(model)
        log.info("%s", report)
        tracker.log_params(report.as_dict())

        args = build_training_arguments(cfg.train, run_dir, cfg.data.num_workers, cfg.model.dtype)
        collator = PaddingCollator(processor.tokenizer.pad_token_id)
        trainer = build_trainer(
            model, train_set, collator, args, cfg.peft, lengths, [TrackerCallback(tracker)]
        )
        result = trainer.train()
        metrics["train"] = {
            "loss": result.training_loss,
            "steps": result.global_step,
            "loss_history": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        }

        adapter_dir = run_dir / "adapter"
        model.save_pretrained(adapter_dir)
        processor.save_pretrained(adapter_dir)
        (adapter_dir / "lmmtune_base.json").write_text(
            json.dumps({"base_model": resolve_model_path(cfg.model)})
        )

        if cfg.eval.after and splits.eval:
            metrics["eval_after"] = evaluate(
                model, processor, splits.eval, cfg.eval, "eval after"
            ).metrics
            log.info("eval after training: %s", metrics["eval_after"])
            tracker.log_metrics({f"eval_after/{k}": v for k, v in metrics["eval_after"].items()})

        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        for artifact in ("config.yaml", "metrics.json", "adapter"):
            tracker.log_artifact(run_dir / artifact)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    log.info("run finished: %s", run_dir)
    return metrics


def prepare_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Create the run directory; refuse one that holds a run unless `overwrite=true`."""
    if (run_dir / "config.yaml").exists() and not overwrite:
        raise LmmtuneError(
            f"{run_dir} already holds a run; choose another output_dir=... or pass overwrite=true"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
