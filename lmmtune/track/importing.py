"""`python -m lmmtune import FOLDER`: send what MLflow missed to MLflow, from the local record.

Every tracked command (train, the DPO stage, eval, export) keeps `tracking_record.jsonl` in
its folder (see `lmmtune.track.record`). The calls that never reached MLflow are replayed
into the MLflow run they belong to, which is then ended as the command ended; when MLflow
was down from the start, into a new run. A run folder's evaluation (`RUN/eval`) and the
records of its exports that MLflow missed (`RUN/export-merged.tracking-*`) are imported
with it. `tracking_import.json` remembers how far each record was imported, and into
which run: importing twice adds nothing, and an interrupted import goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmmtune.atomic import write_text_atomic
from lmmtune.config import TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.owned import add_to_manifest, read_manifest
from lmmtune.redact import redact_value
from lmmtune.rundir import RunDir
from lmmtune.track.record import TRACKING_KIND, LocalRecord

IMPORTED_WITH_A_RUN = ("eval", TRACKING_KIND)
"""Kinds of lmmtune folders inside a run folder whose records `import RUN` takes along: its
evaluations, and the records of exports that MLflow missed (`RUN/export-merged.tracking-*`)."""


def folders_to_import(folder: Path) -> list[Path]:
    """`folder` and the eval/export folders inside it, those that hold a tracking record."""
    if not folder.is_dir():
        raise LmmtuneError(f"{folder} is not a folder: give a run, eval or export folder")
    inner = sorted(
        child
        for child in folder.iterdir()
        if child.is_dir()
        and not child.is_symlink()
        and (read_manifest(child) or {}).get("kind") in IMPORTED_WITH_A_RUN
    )
    found = [f for f in [folder, *inner] if RunDir(f).tracking_record.is_file()]
    if not found:
        raise LmmtuneError(
            f"{folder} holds no tracking record ({RunDir(folder).tracking_record.name}): it was "
            "not written by a tracked lmmtune command (tracking.backend=none tracks nothing)"
        )
    return found


def import_state(folder: Path) -> dict:
    """How far the record was imported (`imported_through` calls) and into which MLflow run."""
    state_file = RunDir(folder).tracking_import
    return json.loads(state_file.read_text()) if state_file.exists() else {}


def pending_events(folder: Path) -> tuple[list[tuple[int, dict]], str | None]:
    """The recorded calls not yet in MLflow (never delivered, not imported before) with their
    place in the record, and the MLflow run they go to (None: a new one)."""
    events = LocalRecord(folder).events()
    state = import_state(folder)
    done = state.get("imported_through", 0)
    pending = [(i, e) for i, e in enumerate(events) if i >= done and not e.get("delivered")]
    run_ids = [e["run_id"] for _, e in pending if e.get("run_id")]
    # An earlier import (interrupted, or before a resumed training added calls) chose the run.
    return pending, state.get("run_id") or (run_ids[0] if run_ids else None)


def replay(folder: Path, tracker, pending: list[tuple[int, dict]]) -> int:
    """Replay `pending` into `tracker`, then end it as the command ended. How far it got is
    saved after every call that fails, so that the next import starts there, in the same run."""
    events = LocalRecord(folder).events()
    imported_through = pending[0][0] if pending else len(events)
    replayed = 0
    try:
        for index, event in pending:
            if event["method"] != "end":
                getattr(tracker, event["method"])(*event["args"], **event["kwargs"])
                replayed += 1
            imported_through = index + 1
        final = [e for e in events if e["method"] == "end"]
        tracker.end(*(final[-1]["args"] if final else ["FINISHED"]))
        imported_through = len(events)
    finally:
        state = {"imported_through": imported_through, "run_id": tracker.run_id}
        state_file = RunDir(folder).tracking_import
        write_text_atomic(state_file, json.dumps(state))
        add_to_manifest(folder, [state_file])
    return replayed


def names_of(folder: Path) -> tuple[str, str]:
    """(experiment, run name) the command used: from tracking.json, else (records written
    before it named them) the run's recipe name and the folder's name."""
    state = LocalRecord(folder).state()
    experiment = state.get("experiment")
    config = RunDir(folder).config
    if experiment is None and config.is_file():
        from omegaconf import OmegaConf

        experiment = OmegaConf.load(config).get("name")
    return experiment or "lmmtune", state.get("run_name") or folder.name


def import_folder(folder: Path, tracking: TrackingConfig) -> str:
    """Import one folder's record; say what was done."""
    from lmmtune.track.mlflow_tracker import MlflowTracker

    pending, run_id = pending_events(folder)
    if not pending:
        return f"nothing to import: every recorded call of {folder} is in MLflow"
    experiment, run_name = names_of(folder)
    tracker = None
    if run_id is not None:  # complete the run MLflow lost contact with
        try:
            tracker = MlflowTracker(tracking, experiment, None, resume_run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - not in this store: a new run gets everything
            reason = redact_value(str(exc)).splitlines()[0][:200] if str(exc) else ""
            print(f"run {run_id} is not in this MLflow store ({reason}); importing into a new run")
            pending = list(enumerate(LocalRecord(folder).events()))
    if tracker is None:
        tracker = MlflowTracker(tracking, experiment, f"{run_name} (imported)")
        tracker.set_tags({"lmmtune.imported_from": str(folder.resolve())})
    try:
        count = replay(folder, tracker, pending)
    except Exception:
        tracker.forget()  # the run stays open in MLflow for the next import; this process lets go
        raise
    return f"imported {count} calls of {folder} into MLflow run {tracker.run_id}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Send what MLflow missed of a run, eval or export folder to MLflow, from "
        "the folder's local tracking record (a run folder's eval and export folders too)."
    )
    parser.add_argument("folder", type=Path, help="a run, eval or export folder")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    parser.add_argument(
        "--experiment", default=None, help="default: the experiment the command used"
    )
    args = parser.parse_args(argv)
    tracking = TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)
    try:
        for folder in folders_to_import(args.folder):
            try:
                print(import_folder(folder, tracking))
            except LmmtuneError:
                raise
            except Exception as exc:  # noqa: BLE001 - MLflow's many errors: one line, no wall
                raise LmmtuneError(
                    f"could not import {folder} ({type(exc).__name__}: "
                    f"{redact_value(str(exc)).splitlines()[0][:300] if str(exc) else ''}); "
                    "run the import again when MLflow answers: it goes on where it stopped"
                ) from None
    except LmmtuneError as exc:
        print(f"lmmtune import: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
