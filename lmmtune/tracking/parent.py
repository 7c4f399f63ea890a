"""Parent MLflow runs: one row in the UI that unfolds into the runs under it.

A Hydra sweep (`lmmtune.tracking.sweep`) and a two-stage run (`lmmtune.stages.two_stage`)
each open a parent run with `MlflowClient` (MLflow's active run is the child's, which its
`Tracker` starts), and the training runs under it start as its children
(`parent_run_id`): a sweep's jobs find the parent through the sweep's marker file, a
stage through `children_of`, which `start_tracker` reads. Tracking never stops a run: a
parent that cannot be opened costs a warning, and the children run unnested."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmmtune.redact import redact, redact_value
from lmmtune.rundir.files import write_text_atomic
from lmmtune.rundir.run import RunDir
from lmmtune.tracking.mlflow_run import (
    quiet_mlflow_urls,
    resolve_tracking_uri,
    tracked_run,
    training_experiment,
)

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
"""The tag MLflow nests a run under its parent by."""


@dataclass
class ParentRun:
    """A parent run, open until `end`."""

    client: Any
    run_id: str

    def end(self, status: str) -> None:
        """End it FINISHED, FAILED or KILLED; a failure to say so costs a warning."""
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001 - tracking never stops a run
            log.warning("could not end the parent MLflow run: %s", redact_value(str(exc)))


def open_parent_run(
    tracking_cfg,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> ParentRun:
    """A new parent run in the experiment (tracking.experiment, else `experiment`), itself
    under `parent_run_id` if given (a two-stage run that is a sweep's job)."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow_urls()
    uri = resolve_tracking_uri(tracking_cfg)
    client = MlflowClient(uri)
    name = redact_value(tracking_cfg.experiment or experiment)
    experiment_id = training_experiment(client, name, uri).experiment_id
    if parent_run_id is not None:
        tags = {**tags, PARENT_TAG: parent_run_id}
    run = client.create_run(experiment_id, run_name=redact_value(run_name), tags=redact(tags))
    return ParentRun(client, run.info.run_id)


def reopen_parent_run(tracking_cfg, run_id: str) -> ParentRun:
    """The parent run `run_id` (of a resumed run), RUNNING again: continued, not duplicated."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow_urls()
    client = MlflowClient(resolve_tracking_uri(tracking_cfg))
    client.update_run(run_id, status="RUNNING")
    return ParentRun(client, run_id)


@dataclass
class Children:
    """The parent that runs started now nest under, and the tags they get."""

    parent_run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


_children: Children | None = None


@contextlib.contextmanager
def children_of(parent_run_id: str | None, tags: dict[str, str]) -> Iterator[None]:
    """Runs `start_tracker` starts in the block are children of `parent_run_id` (None:
    unnested, tagged all the same) with `tags`."""
    global _children
    before = _children
    _children = Children(parent_run_id, tags) if parent_run_id or tags else None
    try:
        yield
    finally:
        _children = before


def current_children() -> Children | None:
    """The parent and tags of runs started now (`children_of`); None outside one."""
    return _children


@contextlib.contextmanager
def parent_run_in(
    folder: Path,
    tracking_cfg,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> Iterator[str | None]:
    """The parent run of the runs kept in `folder` (a two-stage run's), its id for the block:
    opened, or reopened when FOLDER/tracking.json names one (a resume); ended FINISHED,
    KILLED (a signal) or FAILED with the block. None when tracking is off (or not on rank 0)
    or MLflow cannot be reached (a warning: the runs then start unnested)."""
    from lmmtune import distributed

    if tracking_cfg.backend == "none" or not distributed.is_main():
        yield None
        return
    parent = start_parent_run(folder, tracking_cfg, experiment, run_name, tags, parent_run_id)
    if parent is None:
        yield None
        return
    with tracked_run(parent):  # ended FINISHED, KILLED or FAILED, as a run's own
        yield parent.run_id


def start_parent_run(
    folder: Path, tracking_cfg, experiment: str, run_name: str, tags: dict, parent_run_id
) -> ParentRun | None:
    """`parent_run_in`'s run, its id written to FOLDER/tracking.json; None if MLflow fails."""
    state_file = RunDir(folder).tracking  # the run id, experiment and run name
    saved = json.loads(state_file.read_text()).get("run_id") if state_file.is_file() else None
    try:
        if saved:
            parent = reopen_parent_run(tracking_cfg, saved)
        else:
            parent = open_parent_run(tracking_cfg, experiment, run_name, tags, parent_run_id)
    except Exception as exc:  # noqa: BLE001 - tracking never stops a run
        log.warning("could not open the parent MLflow run: %s", redact_value(str(exc)))
        return None
    state = {"run_id": parent.run_id, "experiment": tracking_cfg.experiment or experiment}
    write_text_atomic(state_file, json.dumps(redact({**state, "run_name": run_name})))
    log.info("parent MLflow run %s (%s)", parent.run_id, "reopened" if saved else "new")
    return parent
