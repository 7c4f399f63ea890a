"""`python -m lmmtune eval output_dir=RUN`: evaluate a run's base model and adapter again.

Loads the base as the run trained it (same quantization), attaches the adapter with
peft, generates on the run's eval split (or `eval.data=PATH`) with the adapter off
("before") and on ("after"), and writes `RUN/eval/metrics.json`, `predictions.jsonl`
and `before_after.png`; the numbers, the predictions table and the chart go to an
MLflow run of their own, tagged with the training run's id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from lmmtune.errors import LmmtuneError
from lmmtune.eval.generate import evaluate_adapter
from lmmtune.eval.report import save_eval_report, scalar_tags
from lmmtune.finished_run import load_finished_run
from lmmtune.rundir.folders import (
    EVAL_KIND,
    OwnedFolder,
    check_claim,
    claim_folder,
    claimed_for_this_command,
    listed_when_done,
)
from lmmtune.rundir.run import RunDir
from lmmtune.tracking.mlflow_run import tracked_run
from lmmtune.tracking.tracker import start_tracker

log = logging.getLogger(__name__)


def run_eval(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Evaluate before/after on the eval data; return the metrics written to metrics.json."""
    run = load_finished_run(cfg, adapter=cfg.eval.adapter, overrides=overrides)
    eval_cfg = run.settings.eval  # the run's generation settings unless overridden
    if not (eval_cfg.before or eval_cfg.after):
        raise LmmtuneError("eval.before and eval.after are both false: nothing to evaluate")
    out_path = Path(eval_cfg.output) if eval_cfg.output else RunDir(run.folder).eval
    check_claim(out_path, EVAL_KIND, eval_cfg.overwrite, "eval.output", "eval.overwrite")
    samples = run.eval_samples(eval_cfg.data)
    model = run.load_model()

    # Created only now that data and model are there, and removed again if the eval fails.
    with claimed_for_this_command(prepare_output_dir, out_path, eval_cfg.overwrite) as out_folder:
        out_dir = out_folder.path
        tracker = start_tracker(
            cfg.tracking,
            run.settings.name,
            f"{(run.run_dir or run.adapter).name}-eval",
            out_dir,
            "the evaluation",
        )
        with tracked_run(tracker), listed_when_done(out_folder):
            eval_data = eval_cfg.data or "run eval split"
            tracker.set_tags(run.command_tags("eval", eval_data=eval_data))
            tracker.log_params({f"eval.{k}": v for k, v in eval_cfg.items()})
            before, after = evaluate_adapter(
                model, run.processor, samples, eval_cfg, run.settings.data.max_image_pixels
            )
            metrics = write_eval_results(
                out_dir, run.adapter, eval_cfg, run.settings, samples, before, after, tracker
            )
    log.info("eval written to %s", out_dir)
    return metrics


def write_eval_results(
    out_dir: Path, adapter: Path, eval_cfg, settings, samples, before, after, tracker
) -> dict:
    """metrics.json, the predictions table and the chart of an evaluation, and their tags."""
    metrics = {
        "adapter": str(adapter),
        "data": eval_cfg.data or "the run's eval split",
        "samples": len(samples),
    }
    for name, result in (("eval_before", before), ("eval_after", after)):
        if result is not None:
            metrics[name] = result.metrics
            tracker.set_tags(scalar_tags(name, result.metrics))
    metrics_file = RunDir(out_dir).metrics  # the eval folder names its numbers as a run does
    metrics_file.write_text(json.dumps(metrics, indent=2))
    save_eval_report(
        out_dir,
        "",
        samples,
        before,
        after,
        tracker,
        settings.data.max_image_pixels,
        eval_cfg.table_images,
    )
    tracker.log_artifact(metrics_file, "eval")
    return metrics


def prepare_output_dir(path: Path, overwrite: bool) -> OwnedFolder:
    """Create the eval output directory, or clear one an earlier eval made (`eval.overwrite=true`).

    A run folder, a parent of one or a user's folder is refused: only a folder with an eval
    manifest is ever cleared, and only of the files that manifest lists.
    """
    return claim_folder(path, EVAL_KIND, overwrite, "eval.output", "eval.overwrite")
