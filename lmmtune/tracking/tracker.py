"""The `Tracker`: every MLflow call of a command, kept in a local record and retried or deferred when MLflow fails.

What the rest of lmmtune sees of tracking: the `Tracker`, and `start_tracker`, the one
factory that gives every command (train, DPO, eval, export) its tracker.

One fault policy for every command: each call is appended to the folder's
`tracking_record.jsonl` (`lmmtune.tracking.tracker`), marked delivered to MLflow or not. When
MLflow is unreachable at the start, or fails mid-command (server down, sqlite locked), a
failed call is retried (not a model upload, not the end status), then the command goes on
with a warning and the record keeps everything; `python -m lmmtune import FOLDER`
(`lmmtune.tracking.importing`) sends it to MLflow afterwards.

`track/` carries data to MLflow and nothing else: what to say about a run (description,
sample images, headline metrics) is written by `eval/`, and handed over through these
methods.

The local record of a tracked command: every call its `Tracker` made (params, metrics,
tags, artifacts, the end status), one JSON line each in `tracking_record.jsonl`, marked
delivered to MLflow or not; `tracking.json` beside it names the MLflow run, its experiment
and run name. `python -m lmmtune import FOLDER` (`lmmtune.tracking.importing`) sends what MLflow
missed.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

from lmmtune import distributed
from lmmtune.config import TrackingBackend, TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.redact import redact, redact_value
from lmmtune.rundir.files import write_text_atomic
from lmmtune.rundir.folders import add_to_manifest, adopt, write_manifest
from lmmtune.rundir.run import RunDir
from lmmtune.tracking.mlflow_run import (
    forget_run,
    log_last_system_sample,
    optional,
    start_mlflow_run,
    thumbnails,
)
from lmmtune.tracking.parent import current_children
from lmmtune.tracking.sweep import sweep_job

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 4.0)
"""Seconds to wait before each retry of a failed MLflow call, then the command goes on locally."""
MAX_PARAM_LENGTH = 6000
"""MLflow's longest param value."""


def recorded(retried: bool = True):
    """Make a `Tracker` method (whose body is the MLflow call) a recorded call: sent while
    MLflow answers, retried after RETRY_DELAYS unless `retried` is false (a model upload of
    gigabytes may have half succeeded; the import sends it once, later), and appended to the
    record, delivered or not. The import replays exactly these calls."""

    def make_recorded(send):
        @functools.wraps(send)
        def call(self: Tracker, *args, **kwargs):
            return self._deliver(send, retried, args, kwargs)

        return call

    return make_recorded


class Tracker:
    """The calls a command makes to MLflow, under the fault policy (module docstring).

    What it does follows from what it holds:
    - a record (`start_tracker`): every call goes into it, and to MLflow while MLflow answers;
    - no record, a started run (the import, replaying a record): a call that fails raises;
    - neither (tracking off, or a rank other than 0): every call does nothing.
    """

    def __init__(
        self,
        record: LocalRecord | None = None,
        doing: str = "the command",
        run_id: str | None = None,
    ):
        """`doing` names the command in the warning ("training", "the evaluation").
        `run_id`: the MLflow run to continue (a resumed training's)."""
        self.record = record
        self.doing = doing
        self.run_id = run_id
        """The MLflow run; kept when MLflow fails: the import completes that run."""
        self.failed_reason: str | None = None
        self.mlflow = None
        """The mlflow module while the run answers; None before it starts and once it fails."""

    def start_run(
        self,
        tracking_cfg: TrackingConfig,
        experiment: str,
        run_name: str | None,
        *,
        parent_run_id: str | None = None,
        system_metrics: bool = True,
        required_for: str | None = None,
    ) -> None:
        """Start the MLflow run (or continue `run_id`). If MLflow cannot be reached, the
        command goes on with its record; `required_for` (registering a model) stops it."""
        try:
            self.run_id = start_mlflow_run(
                tracking_cfg, experiment, run_name, self.run_id, parent_run_id, system_metrics
            )
        except Exception as exc:  # the backend raises many types (connection, sqlite, auth)
            if required_for is not None:
                raise LmmtuneError(
                    f"{required_for}, and MLflow could not be reached: {redact_value(str(exc))}"
                ) from None
            self._fail("could not start", exc)
            return
        import mlflow

        self.mlflow = mlflow

    @recorded()
    def log_params(self, params: dict[str, Any]) -> None:
        """Params (the flattened config), secrets masked, values cut to MLflow's limit."""
        clean = redact(params)
        self.mlflow.log_params({key: str(value)[:MAX_PARAM_LENGTH] for key, value in clean.items()})

    @recorded()
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """The numeric values of `metrics` at `step` (others are left out)."""
        numeric = {
            key: float(value) for key, value in metrics.items() if isinstance(value, int | float)
        }
        if numeric:
            self.mlflow.log_metrics(numeric, step=step)

    @recorded()
    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags, secrets masked (`mlflow.note.content` is the run's description)."""
        self.mlflow.set_tags(redact(tags))

    @recorded()
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files (under `artifact_path`, else the folder's name)."""
        path = Path(path)
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @recorded()
    def log_table(
        self, rows: list[dict], artifact_file: str, image_column: str | None = None
    ) -> None:
        """Rows as an MLflow table; `image_column` holds image paths shown as thumbnails."""
        import pandas as pd

        table = pd.DataFrame(rows)
        if image_column and image_column in table:
            images = thumbnails(list(table[image_column]))
            if images is not None:
                table[image_column] = images
        self.mlflow.log_table(data=table, artifact_file=artifact_file, run_id=self.run_id)

    @recorded()
    def log_dict(self, data: dict, artifact_file: str) -> None:
        """A JSON-able dict as an artifact (per-run numbers that are no curve)."""
        self.mlflow.log_dict(data, artifact_file)

    @recorded()
    def log_dataset(self, name: str, source: str, digest: str, context: str, samples: int) -> None:
        """A data set the run used (MLflow's Datasets: name, source, digest, context)."""
        from lmmtune.tracking.mlflow_run import dataset_input

        with optional("the dataset input"):
            dataset = dataset_input(name, source, digest)
            self.mlflow.log_input(dataset, context=context, tags={"samples": str(samples)})

    @recorded(retried=False)
    def log_model(self, model_dir: Path, registered_name: str | None = None) -> dict | None:
        """An exported model folder as an MLflow pyfunc model; registered if named."""
        from lmmtune.tracking.models import log_pyfunc_model

        return log_pyfunc_model(Path(model_dir), registered_name)

    @recorded(retried=False)
    def log_adapter_model(self, adapter_dir: Path) -> str | None:
        """The run's adapter as an MLflow model of this run; its model URI."""
        from lmmtune.tracking.models import log_adapter_model

        with optional("the adapter as a logged model"):
            return log_adapter_model(Path(adapter_dir))
        return None

    @recorded(retried=False)
    def end(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED (its last system metrics logged first)."""
        log_last_system_sample(self.run_id)
        self.mlflow.end_run(status=status)

    def _deliver(self, send, retried: bool, args: tuple, kwargs: dict) -> Any:
        """`send` to MLflow while it answers, and into the record (see the class)."""
        run_id = self.run_id
        result, delivered = None, False
        if self.mlflow is not None:
            result, delivered = self._send(send, retried and self.record is not None, args, kwargs)
        if self.record is not None:
            self.record.append(send.__name__, args, kwargs, delivered=delivered, run_id=run_id)
        return result

    def _send(self, send, retried: bool, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """(result, True), or after RETRY_DELAYS (a server restarting) (None, False)."""
        delays = RETRY_DELAYS if retried else ()
        for attempt, delay in enumerate((*delays, None), start=1):
            try:
                return send(self, *args, **kwargs), True
            except Exception as exc:  # noqa: BLE001 - any backend failure: see _fail
                if delay is None:
                    self._fail(f"failed in {send.__name__} (after {attempt} tries)", exc)
                    return None, False
                time.sleep(delay)
        return None, False

    def _fail(self, what: str, exc: Exception) -> None:
        """Stop calling MLflow (each call to a broken backend may block for its timeout; the
        run stays open there, for the import to complete). With a record the command goes
        on, with a warning; without one (the import), `exc` is raised."""
        reason = redact_value(f"{type(exc).__name__}: {exc}")
        self.failed_reason = reason.splitlines()[0][:300] if reason else type(exc).__name__
        if self.mlflow is not None:
            forget_run(self.run_id)
            self.mlflow = None
        if self.record is None:
            raise exc
        log.warning(
            "MLflow %s (%s); %s goes on and everything is kept in %s. "
            "Import it later with: python -m lmmtune import %s",
            what,
            self.failed_reason,
            self.doing,
            self.record.path,
            self.record.folder,
        )


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
    sweep's run, named after its swept values; a stage of a two-stage run, a child of that
    run's (`lmmtune.tracking.parent.children_of`), with its tags. `only_if_needed`: write the record only
    once MLflow misses a call (see `LocalRecord`). `required_for` (registering a model):
    MLflow must answer at the start, or the command stops before any work. With
    `tracking.backend=none`, and under torchrun / accelerate launch off rank 0, the tracker
    does nothing.
    """
    if tracking_cfg.backend == TrackingBackend.none or not distributed.is_main():
        return Tracker()
    record = LocalRecord(folder, only_if_needed)
    # Listed before they are written: a kill cannot leave them for the next command to read.
    add_to_manifest(folder, [record.path, record.state_file])
    job, stage = sweep_job(), current_children()
    run_name = tracking_cfg.run_name or (job.run_name if job else run_name)
    experiment = tracking_cfg.experiment or experiment
    tracker = Tracker(record, doing, run_id=record.state().get("run_id") if resume else None)
    parent = stage.parent_run_id if stage else job.parent_run_id if job else None
    tracker.start_run(
        tracking_cfg, experiment, run_name, parent_run_id=parent, required_for=required_for
    )
    state = {"run_id": tracker.run_id, "experiment": experiment, "run_name": run_name}
    record.write_state(redact(state))
    if stage is not None and stage.tags:
        tracker.set_tags(stage.tags)  # a stage of a two-stage run: its stage, stage 1's run
    return tracker


TRACKING_KIND = "tracking"
"""The manifest kind of a folder that holds a command's tracking record and nothing else."""


class LocalRecord:
    """The calls of one tracked command, in `FOLDER/tracking_record.jsonl`, and its state in
    `FOLDER/tracking.json` (the MLflow run id, which a resumed training continues; the
    experiment; the run name).

    `only_if_needed`: kept in memory until a call misses MLflow, then written, creating
    `folder` (with a manifest of its own) if it does not exist: an export keeps its record
    beside the model folder, which people share, and only when MLflow did not get it all.
    """

    def __init__(self, folder: Path, only_if_needed: bool = False):
        self.folder = Path(folder)
        self.path = RunDir(self.folder).tracking_record
        self.state_file = RunDir(self.folder).tracking
        self.only_if_needed = only_if_needed
        self._unwritten: list[str] = []  # JSON lines not yet in the file
        self._missed = False  # a call did not reach MLflow: the record is needed
        self._state: dict = {}
        self._state_written = False

    def append(
        self, method: str, args: tuple, kwargs: dict, delivered: bool = True, run_id=None
    ) -> None:
        """One call, and whether it reached MLflow run `run_id` (what an import replays)."""
        # Paths absolute: an import from another working directory finds the files.
        args = [str(arg.absolute()) if isinstance(arg, Path) else arg for arg in args]
        if method != "log_metrics":  # metrics are numbers: never masked (token_f1 stays a number)
            args = [redact(arg) if isinstance(arg, dict) else redact_value(arg) for arg in args]
        event = {"time": time.time(), "method": method, "args": args, "kwargs": kwargs}
        event.update(delivered=delivered, run_id=run_id)
        self._unwritten.append(json.dumps(event, default=str))
        self._missed = self._missed or not delivered
        self._write_when_due()

    def write_state(self, state: dict) -> None:
        self._state, self._state_written = dict(state), False
        self._write_when_due()

    def _write_when_due(self) -> None:
        if self.only_if_needed and not self.path.exists():
            if not self._missed:
                return
            self._create_folder()
        if self._unwritten:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in self._unwritten)
            self._unwritten = []
        if self._state and not self._state_written:
            write_text_atomic(self.state_file, json.dumps(self._state))
            self._state_written = True

    def _create_folder(self) -> None:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            write_manifest(self.folder, TRACKING_KIND, {self.path.name, self.state_file.name})
            adopt(self.folder)  # beside an export in a run: the run's overwrite=true clears it

    def events(self) -> list[dict]:
        """Every recorded call; a line that is no JSON is named (file and line) in one line."""
        written = self.path.read_bytes().splitlines() if self.path.exists() else []
        events = []
        for number, line in enumerate(written + self._unwritten, start=1):
            if not line.strip():
                continue
            try:  # bytes: JSON is UTF-8, and a line that is not is named like any bad line
                events.append(json.loads(line))
            except (ValueError, RecursionError):
                raise LmmtuneError(
                    f"{self.path}:{number}: not a JSON line: the record is damaged (a last "
                    "line cut short by a kill may be deleted; the call on it is lost)"
                ) from None
        return events

    def state(self) -> dict:
        if not self.state_file.exists():
            return dict(self._state)
        return json.loads(self.state_file.read_text())


def last_logged_step(run_dir: Path) -> int:
    """The highest training step whose metrics the run's record holds (0: none)."""
    steps = [
        e["kwargs"].get("step") or 0
        for e in LocalRecord(run_dir).events()
        if e["method"] == "log_metrics"
        and any(k.startswith(("train/", "eval/")) for k in (e["args"] or [{}])[0])
    ]
    return max(steps, default=0)
