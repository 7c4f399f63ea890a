"""MLflow itself: the store, the run, system metrics, the run's datasets, the training callback.

MLflow itself, for the `Tracker` (`lmmtune.tracking.tracker`): where the store is, starting
and letting go of a run, system metrics, table thumbnails; and the run's framing in a
command (`tracked_run`) and in the Trainer (`TrackerCallback`).

The tracking URI comes from `tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`, else
`sqlite:///mlflow.db` in the working directory.

The data a run trained and evaluated on, as MLflow Datasets: a name, where it came from,
and a digest of its content, so that two runs on the same data show the same digest.

Only metadata is logged (`MetaDataset`): the records stay where they are; the digest
covers every sample's id, turns and image (the image's content digest when `check`
decoded it, else its path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from lmmtune.config import TrackingConfig
from lmmtune.data.checks import DIGEST
from lmmtune.data.records import Sample
from lmmtune.data.split_sources import split_of
from lmmtune.hub import hub_id_of
from lmmtune.redact import redact_value

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND = "mlflow.experimentKind"


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


def resolve_tracking_uri(tracking_cfg: TrackingConfig) -> str:
    """tracking.tracking_uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."""
    return (
        tracking_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    )


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database
    (`mlruns/EXPERIMENT` in its folder), not in the working directory (MLflow's `./mlruns`);
    None (MLflow's choice) for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri[len("sqlite:///") :].split("?")[0]
    if not database or database == ":memory:":
        return None
    folder = re.sub(r"[^\w.-]", "_", experiment).strip(".") or "experiment"
    return (Path(database).absolute().parent / "mlruns" / folder[:100]).as_uri()


def training_experiment(client, name: str, uri: str):
    """The experiment `name`, created if missing (artifacts beside a sqlite database), shown
    as model training in the UI."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except MlflowException as exc:  # another process created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND not in experiment.tags:  # the UI's runs and metric charts, not GenAI's
        client.set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development"
        )
    return experiment


def system_metrics_wanted() -> bool:
    """CPU, memory, disk (GPU with nvidia-ml-py) under `system/`, unless
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false; they need psutil."""
    setting = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    return setting.strip().lower() not in ("false", "0", "no")


def quiet_mlflow_urls() -> None:
    """No "View run ... at: URL" lines from MLflow: they print the tracking URI as given,
    credentials included. lmmtune logs the run id and the masked URI itself."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def start_mlflow_run(
    tracking_cfg: TrackingConfig,
    experiment: str,
    run_name: str | None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = True,
) -> str:
    """Start MLflow's active run (continue `run_id` if given); its run id.

    `parent_run_id`: the run of the Hydra multirun sweep this job belongs to.
    `system_metrics`: sample this machine's CPU, memory, ... into the run (off for an
    import: the numbers would be the importing process's, not the command's)."""
    # Fail in seconds, not minutes, when a server is down: the run goes on with its local record.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    quiet_mlflow_urls()
    import mlflow

    uri = resolve_tracking_uri(tracking_cfg)
    mlflow.set_tracking_uri(uri)
    sample = system_metrics and system_metrics_wanted()
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=sample)
    else:
        from mlflow.tracking import MlflowClient

        name = redact_value(tracking_cfg.experiment or experiment)
        found = training_experiment(MlflowClient(uri), name, uri)
        mlflow.set_experiment(experiment_id=found.experiment_id)
        run = mlflow.start_run(
            run_name=redact_value(tracking_cfg.run_name or run_name),
            parent_run_id=parent_run_id,
            log_system_metrics=sample,
        )
    log.info("MLflow run %s at %s", run.info.run_id, redact_value(uri))
    return run.info.run_id


def forget_run(run_id: str | None) -> None:
    """Let go of the run in this process without calling the store (it has failed): the
    next run in the same process (a notebook, a test) may start, the system-metrics thread
    stops, and MLflow's exit hook does not mark the run FINISHED. MLflow has no public call
    that skips the store, hence its internals."""
    from mlflow.tracking import fluent

    try:
        runs = fluent._active_run_stack.get()
        if runs and runs[-1].info.run_id == run_id:
            runs.pop()
            fluent.MLFLOW_RUN_ID.unset()
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
        if monitor is not None:
            monitor.finish()
    except Exception as problem:  # noqa: BLE001 - MLflow internals moved: keep going
        log.debug("could not let go of the MLflow run: %s", problem)


def log_last_system_sample(run_id: str) -> None:
    """MLflow logs system metrics once per sampling interval (10 s) and drops the sample it
    holds when the run ends: a shorter run, or the end of a longer one, would go unlogged.
    Stop its sampler and log that sample (MLflow has no public call: its internals)."""
    from mlflow.tracking import fluent

    monitor = fluent.run_id_to_system_metrics_monitor.get(run_id)
    if monitor is None or monitor._process is None:
        return
    with optional("the last system metrics sample"):
        monitor._shutdown_event.set()
        monitor._process.join(timeout=30)
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())


@contextlib.contextmanager
def optional(what: str):
    """An extra that fails (an odd data source, a model-logging error) costs a warning, not the
    tracking: raised through, it would switch the run to its local record."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("MLflow: %s was not logged (%s: %s)", what, type(exc).__name__, exc)


def thumbnails(paths: list, size: int = 128) -> list | None:
    """Small RGB copies of the images for an MLflow table, or None if any cannot be opened
    (MLflow wants a column of images only or of none). The paths are the eval report's own
    small PNG copies (`eval/report.py`), so plain PIL opens them."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except Exception:  # a text-only row, an image without a copy: no thumbnails
            return None
        image.thumbnail((size, size))
        images.append(image)
    return images


@contextlib.contextmanager
def tracked_run(tracker):
    """End the tracked run as FINISHED, KILLED (Ctrl-C, a stopping signal) or FAILED, whatever happens."""
    from lmmtune.errors import RunInterrupted
    from lmmtune.training.callbacks import stop_signals_held

    try:
        yield tracker
    except (KeyboardInterrupt, RunInterrupted):
        with stop_signals_held():  # a second SIGTERM must not cut the ending short
            tracker.end("KILLED")
        raise
    except BaseException:
        with stop_signals_held():
            tracker.end("FAILED")
        raise
    with stop_signals_held():
        tracker.end("FINISHED")


RUN_SUMMARY = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
RUN_SUMMARY += ("total_flos", "train_loss")
"""The Trainer's closing numbers: one value per run, tags (`train/train_runtime`) and
metrics.json (`train.summary`) instead of one single-point chart each."""


class TrackerCallback(TrainerCallback):
    """Forward the Trainer's logs (loss, learning rate, grad norm) to a `Tracker` per logging step.

    `logged_through`: a resumed run replays the steps after its checkpoint that the killed
    process had logged already; those are not logged twice.
    """

    def __init__(self, tracker, logged_through: int | None = None):
        self.tracker = tracker
        self.logged_through = logged_through

    def on_log(self, args, state, control, logs=None, **kwargs):
        replayed = self.logged_through is not None and state.global_step <= self.logged_through
        if state.is_world_process_zero and logs and not replayed:
            curves = {
                metric_name(key): value for key, value in logs.items() if key not in RUN_SUMMARY
            }
            self.tracker.log_metrics(curves, step=state.global_step)
        if state.is_world_process_zero and logs:
            closing = {f"train/{key}": str(logs[key]) for key in RUN_SUMMARY if key in logs}
            if closing:
                self.tracker.set_tags(closing)


def trainer_summary(log_history: list[dict]) -> dict:
    """The Trainer's closing numbers (runtime, samples per second, FLOs, mean loss)."""
    closing = [entry for entry in log_history if "train_runtime" in entry]
    return {key: closing[-1][key] for key in RUN_SUMMARY if closing and key in closing[-1]}


def metric_name(key: str) -> str:
    """`loss` -> `train/loss`; the Trainer's `eval_loss` (train.eval_steps) -> `eval/loss`."""
    return f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else f"train/{key}"


def samples_digest(samples: list[Sample]) -> str:
    """A short content digest of the samples, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        image = sample.extra.get(DIGEST) or sample.image
        digest.update(json.dumps([sample.id, sample.turns, image]).encode("utf-8"))
    return digest.hexdigest()[:16]


def dataset_input(name: str, source: str, digest: str):
    """An MLflow dataset of metadata only, its source the data file or folder, or the Hub
    dataset (id and split) it was downloaded from."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    schema = Schema(
        [ColSpec("string", "id"), ColSpec("string", "image", required=False)]
        + [ColSpec("string", "question"), ColSpec("string", "answer")]
    )
    return MetaDataset(dataset_source(source), name=name, digest=digest, schema=schema)


def dataset_source(source: str):
    """A Hub id (`org/name:split`) as MLflow's Hugging Face source, a path as a local one."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    path, split = split_of(source)
    if hub_id_of(path):
        return HuggingFaceDatasetSource(path=path, split=split)
    location = Path(path)
    uri = str(location.resolve()) if location.exists() else path
    with warnings.catch_warnings():
        # A local path matches the "local" source registered twice by MLflow: it says so.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        return resolve_dataset_source(uri)


def log_datasets(tracker, splits) -> None:
    """The train and eval splits as the run's dataset inputs (contexts training, evaluation)."""
    sources = {role: path for role, path, _ in splits.report.files}
    train_source = sources.get("train", "")
    for name, samples, context in (
        ("train", splits.train, "training"),
        ("eval", splits.eval, "evaluation"),
    ):
        if samples:
            source = sources.get(name, train_source)  # a held-out fraction comes from train
            tracker.log_dataset(name, source, samples_digest(samples), context, len(samples))
