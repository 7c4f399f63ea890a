"""What the rest of lmmtune sees of tracking: the `Tracker` protocol and the one factory that
gives one (MLflow behind a local record, or a no-op tracker with `tracking.backend=none` or
off rank 0), with one fault policy for every command (train, DPO, eval, export): see
`lmmtune.track.record`.

`track/` carries data to MLflow and nothing else: what to say about a run (description,
sample images, headline metrics) is written by `eval/`, and handed over through these
methods.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from lmmtune import distributed
from lmmtune.config import TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.owned import add_to_manifest
from lmmtune.redact import redact, redact_value
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
    tracking_cfg: TrackingConfig,
    experiment: str,
    run_name: str | None,
    folder: Path,
    doing: str = "training",
    *,
    resume: bool = False,
    only_if_needed: bool = False,
    required_for: str | None = None,
) -> Tracker:
    """The tracker of a command: MLflow behind a local record in `folder` that keeps
    everything if MLflow fails, so that `python -m lmmtune import FOLDER` completes it later.

    `doing` names the command in the warning. `resume` (training): continue the MLflow run
    that `folder`'s tracking.json names. A job of a Hydra multirun becomes a child of its
    sweep's run, named after its swept values. `only_if_needed`: write the record only
    once MLflow misses a call (see `LocalRecord`). `required_for` (registering a model):
    MLflow must answer at the start, or the command stops before any work. Under torchrun /
    accelerate launch only rank 0 tracks: the others get a NullTracker.
    """
    if tracking_cfg.backend == "none" or not distributed.is_main():
        return NullTracker()
    if tracking_cfg.backend != "mlflow":
        raise LmmtuneError(f"tracking.backend must be mlflow or none, not '{tracking_cfg.backend}'")
    record = LocalRecord(folder, only_if_needed)
    # Listed before they are written: a kill cannot leave them for the next command to read.
    add_to_manifest(folder, [record.path, record.state_file])
    resume_run_id = record.state().get("run_id") if resume else None
    job = sweep_job()
    run_name = tracking_cfg.run_name or (job.run_name if job else run_name)
    experiment = tracking_cfg.experiment or experiment

    def start_mlflow() -> MlflowTracker:
        return MlflowTracker(
            tracking_cfg,
            experiment,
            run_name,
            resume_run_id=resume_run_id,
            parent_run_id=job.parent_run_id if job else None,
        )

    if required_for is not None:
        try:
            primary = start_mlflow()
        except Exception as exc:  # the backend raises many types (connection, sqlite, auth)
            raise LmmtuneError(
                f"{required_for}, and MLflow could not be reached: {redact_value(str(exc))}"
            ) from None
        tracker = ResilientTracker(lambda: primary, record, doing)
    else:
        tracker = ResilientTracker(start_mlflow, record, doing, run_id=resume_run_id)
    state = {"run_id": tracker.run_id, "experiment": experiment, "run_name": run_name}
    record.write_state(redact(state))
    return tracker
