"""What the rest of lmmtune sees of tracking: the `Tracker` protocol and the factories that
give one (MLflow, or a no-op tracker with `tracking.backend=none` or off rank 0).

`track/` carries data to MLflow and nothing else: what to say about a run (description,
sample images, headline metrics) is written by `eval/`, and handed over through these
methods.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from lmmtune import distributed
from lmmtune.atomic import write_text_atomic
from lmmtune.config import TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.redact import redact_value
from lmmtune.rundir import RunDir
from lmmtune.track.mlflow_tracker import MlflowTracker, NullTracker
from lmmtune.track.record import LocalRecord, ResilientTracker
from lmmtune.track.sweep import sweep_job

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """The calls a run makes to its tracker (`NullTracker`, `MlflowTracker`, `ResilientTracker`)."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...
    def log_table(
        self, rows: list[dict], artifact_file: str, image_column: str | None = None
    ) -> None: ...
    def log_model(self, model_dir: Path, registered_name: str | None = None) -> dict | None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def log_dataset(
        self, name: str, source: str, digest: str, context: str, samples: int
    ) -> None: ...
    def log_adapter_model(self, adapter_dir: Path) -> str | None: ...


def start_tracker(
    tracking_cfg: TrackingConfig, experiment: str, run_name: str | None, run_dir: Path
) -> Tracker:
    """The run's tracker: MLflow behind a local record that keeps everything if MLflow fails.

    A resumed run (RUN/tracking.json holds its MLflow run id) continues the same MLflow run;
    a job of a Hydra multirun becomes a child of its sweep's run, named after its swept
    values. Under torchrun / accelerate launch only rank 0 tracks: the others get a NullTracker.
    """
    if tracking_cfg.backend == "none" or not distributed.is_main():
        return NullTracker()
    if tracking_cfg.backend != "mlflow":
        raise LmmtuneError(f"tracking.backend must be mlflow or none, not '{tracking_cfg.backend}'")
    state_file = RunDir(run_dir).tracking
    resume_id = json.loads(state_file.read_text())["run_id"] if state_file.exists() else None
    job = sweep_job()
    tracker = ResilientTracker(
        lambda: MlflowTracker(
            tracking_cfg,
            experiment,
            job.run_name if job else run_name,
            resume_run_id=resume_id,
            parent_run_id=job.parent_run_id if job else None,
        ),
        LocalRecord(run_dir),
    )
    if tracker.run_id is not None:
        write_text_atomic(state_file, json.dumps({"run_id": tracker.run_id}))
    return tracker


def open_tracker(
    tracking_cfg: TrackingConfig, experiment: str, run_name: str, required: bool = False
) -> Tracker:
    """An MLflow run of its own for a command (a no-op tracker with tracking=none).

    If MLflow cannot be reached the command goes on untracked (its files are written
    anyway), unless tracking is `required` (registering a model).
    """
    if tracking_cfg.backend == "none":
        return NullTracker()
    if tracking_cfg.backend != "mlflow":
        raise LmmtuneError(f"tracking.backend must be mlflow or none, not '{tracking_cfg.backend}'")
    try:
        return MlflowTracker(tracking_cfg, experiment, run_name)
    except Exception as exc:  # the backend raises many types (connection, sqlite, auth)
        if required:
            raise LmmtuneError(f"could not start an MLflow run: {redact_value(str(exc))}") from None
        log.warning("MLflow unavailable (%s); going on without tracking", redact_value(str(exc)))
        return NullTracker()
