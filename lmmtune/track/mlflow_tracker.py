"""MLflow tracking: the resolved config as params, metrics per logging step, artifacts, tags.

The tracking URI comes from `tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`, else
`sqlite:///mlflow.db` in the working directory. `tracking.backend=none` gives a
`NullTracker` with the same methods, so the pipeline never branches on tracking.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from lmmtune.config import TrackingConfig

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000


def flatten(config: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`; lists are kept as their string form."""
    container = (
        OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    )
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


class NullTracker:
    """Tracking switched off: every call is a no-op."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, tracking_cfg: TrackingConfig, experiment: str, run_name: str | None):
        import mlflow

        self.mlflow = mlflow
        uri = (
            tracking_cfg.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or DEFAULT_TRACKING_URI
        )
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(tracking_cfg.experiment or experiment)
        self.run = mlflow.start_run(run_name=tracking_cfg.run_name or run_name)
        self.run_id = self.run.info.run_id
        log.info(
            "MLflow run %s in experiment '%s' at %s",
            self.run_id,
            tracking_cfg.experiment or experiment,
            uri,
        )

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params(
            {key: str(value)[:MAX_PARAM_LENGTH] for key, value in params.items()}
        )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        numeric = {
            key: float(value) for key, value in metrics.items() if isinstance(value, int | float)
        }
        if numeric:
            self.mlflow.log_metrics(numeric, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def start_tracker(
    tracking_cfg: TrackingConfig, experiment: str, run_name: str | None
) -> NullTracker:
    if tracking_cfg.backend == "none":
        return NullTracker()
    if tracking_cfg.backend == "mlflow":
        return MlflowTracker(tracking_cfg, experiment, run_name)
    from lmmtune.errors import LmmtuneError

    raise LmmtuneError(f"tracking.backend must be mlflow or none, not '{tracking_cfg.backend}'")


class TrackerCallback(TrainerCallback):
    """Forward the Trainer's logs (loss, learning rate, grad norm) to the tracker per logging step."""

    def __init__(self, tracker: NullTracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics(
                {f"train/{key}": value for key, value in logs.items()}, step=state.global_step
            )
