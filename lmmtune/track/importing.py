"""`python -m lmmtune import FOLDER`: send what MLflow missed to MLflow, from the local record.

Every tracked command (train, the DPO stage, eval, export) keeps `tracking_record.jsonl` in
its folder (see `lmmtune.track.record`). The calls that never reached MLflow are replayed
into the MLflow run they belong to, which is then ended as the command ended; when MLflow
was down from the start, into a new run. A run folder's own eval and export folders
(`RUN/eval`, `RUN/export-merged`) are imported with it. `tracking_import.json` remembers
how far each record was imported: importing twice adds nothing.
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
from lmmtune.track.record import LocalRecord

IMPORTED_WITH_A_RUN = ("eval", "export")
"""Kinds of lmmtune folders inside a run folder whose records `import RUN` takes along."""


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


def pending_events(folder: Path) -> tuple[list[dict], str | None, int]:
    """The recorded calls not yet in MLflow (never delivered, not imported before), the MLflow
    run they belong to (None: MLflow was down from the start), and the record's length."""
    events = LocalRecord(folder).events()
    state_file = RunDir(folder).tracking_import
    done = json.loads(state_file.read_text())["imported_through"] if state_file.exists() else 0
    pending = [e for e in events[done:] if not e.get("delivered", False)]
    run_ids = [e.get("run_id") for e in pending if e.get("run_id")]
    return pending, (run_ids[0] if run_ids else None), len(events)


def replay(folder: Path, tracker, events: list[dict]) -> int:
    """Replay `events` into `tracker`; end it as the command ended."""
    replayed = 0
    for event in events:
        if event["method"] == "end":
            continue
        getattr(tracker, event["method"])(*event["args"], **event["kwargs"])
        replayed += 1
    final = [e for e in LocalRecord(folder).events() if e["method"] == "end"]
    tracker.end(*(final[-1]["args"] if final else ["FINISHED"]))
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

    pending, run_id, total = pending_events(folder)
    if not pending:
        return f"nothing to import: every recorded call of {folder} is in MLflow"
    experiment, run_name = names_of(folder)
    tracker = None
    if run_id is not None:  # complete the run MLflow lost contact with
        try:
            tracker = MlflowTracker(tracking, experiment, None, resume_run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - not in this store: a new run gets everything
            print(
                f"run {run_id} is not in this MLflow store ({redact_value(str(exc))[:200]}); "
                "importing into a new run"
            )
            pending = LocalRecord(folder).events()
    if tracker is None:
        tracker = MlflowTracker(tracking, experiment, f"{run_name} (imported)")
        tracker.set_tags({"lmmtune.imported_from": str(folder.resolve())})
    count = replay(folder, tracker, pending)
    state_file = RunDir(folder).tracking_import
    write_text_atomic(state_file, json.dumps({"imported_through": total, "run_id": tracker.run_id}))
    add_to_manifest(folder, [state_file])
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
                    "nothing of it is marked imported: run the import again"
                ) from None
    except LmmtuneError as exc:
        print(f"lmmtune import: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
