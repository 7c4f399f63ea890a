"""`python -m lmmtune import FOLDER`: send what MLflow missed to MLflow, from the local record.

Every tracked command (train, the DPO stage, eval, export) keeps `tracking_record.jsonl` in
its folder (see `lmmtune.tracking.tracker`). The calls that never reached MLflow are replayed
into the MLflow run they belong to, which is then ended as the command ended; when MLflow
was down from the start, into a new run. A run folder's evaluation (`RUN/eval`) and the
records of its exports that MLflow missed (`RUN/export-merged.tracking-*`) are imported
with it. `tracking_import.json` remembers, per tracking store, how far each record was
imported and into which run: importing twice adds nothing, an interrupted import goes on
where it stopped, and another store gets the whole record in a run of its own.

A record may come from someone else (a run folder that was sent), so it is checked whole
before anything is sent: only the calls lmmtune records, with their own arguments, and only
files inside the record's own folder, links resolved. A bad line is named; nothing is sent."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

from lmmtune.config import TrackingConfig
from lmmtune.errors import LmmtuneError
from lmmtune.redact import redact_value
from lmmtune.rundir.files import write_text_atomic
from lmmtune.rundir.folders import add_to_manifest, entry_problem, read_manifest
from lmmtune.rundir.run import RunDir
from lmmtune.tracking.tracker import TRACKING_KIND, LocalRecord

IMPORTED_WITH_A_RUN = ("eval", TRACKING_KIND)
"""Kinds of lmmtune folders inside a run folder whose records `import RUN` takes along: its
evaluations, and the records of exports that MLflow missed (`RUN/export-merged.tracking-*`)."""
FILE_ARGUMENTS = {
    "log_params": (),
    "log_metrics": (),
    "set_tags": (),
    "end": (),
    "log_dict": (),
    "log_dataset": (),
    "log_table": (),
    "log_artifact": ("path",),
    "log_model": ("model_dir",),
    "log_adapter_model": ("adapter_dir",),
}
"""The calls a `Tracker` records (the import replays no other), and which of their arguments
name local files to upload: those must lie inside the record's own folder."""
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
ARTIFACT_NAMES = ("artifact_path", "artifact_file")
"""Arguments that name a place in the MLflow run's artifacts: plain relative paths only."""


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


def checked_events(folder: Path) -> list[dict]:
    """The record's calls, each checked: a call lmmtune writes, with its own arguments, whose
    files lie inside the record's folder (links resolved). A record someone else wrote could
    otherwise upload any file of this machine; one bad line makes the record invalid."""
    record = LocalRecord(folder)
    roots = upload_roots(folder)
    events = record.events()
    for number, event in enumerate(events, start=1):
        problem = call_problem(event, roots)
        if problem:
            raise LmmtuneError(
                f"{record.path}:{number}: {problem}; the record is invalid and nothing of it "
                "was imported"
            )
    return events


def upload_roots(folder: Path) -> list[Path]:
    """Where a record's files may lie: its folder, and for an export's record
    (`X.tracking-TIME`) the export `X` beside it, when lmmtune made that one."""
    roots = [folder.resolve()]
    exported, _, _ = folder.name.rpartition(".tracking-")
    if exported and (read_manifest(folder) or {}).get("kind") == TRACKING_KIND:
        export = folder.parent / exported
        if export.is_dir() and (read_manifest(export) or {}).get("kind") == "export":
            roots.append(export.resolve())
    return roots


def call_problem(event, roots: list[Path]) -> str | None:
    """What makes one recorded call unsafe or unusable (None: nothing)."""
    from lmmtune.tracking.tracker import Tracker

    method = event.get("method") if isinstance(event, dict) else None
    if not isinstance(method, str) or method not in FILE_ARGUMENTS:
        return f"{str(method)[:60]!r} is not a call lmmtune records"
    args, kwargs = event.get("args"), event.get("kwargs")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return f"{method}: args must be a list and kwargs an object"
    if not isinstance(event.get("run_id"), str | None) or not isinstance(
        event.get("delivered", False), bool
    ):
        return f"{method}: run_id must be text and delivered true or false"
    try:
        bound = inspect.signature(getattr(Tracker, method)).bind(None, *args, **kwargs)
    except TypeError as exc:
        return f"{method}: {exc}"
    named = bound.arguments
    if method == "end" and named.get("status", "FINISHED") not in END_STATUSES:
        return f"end: status {str(named['status'])[:40]!r} is not one of {', '.join(END_STATUSES)}"
    files = [named.get(name) for name in FILE_ARGUMENTS[method]]
    if method == "log_table" and named.get("image_column"):
        rows = named.get("rows")
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            return "log_table: rows must be a list of objects"
        files += [row.get(named["image_column"]) for row in rows if row.get(named["image_column"])]
    for value in files:
        if not isinstance(value, str) or not inside(value, roots):
            return (
                f"{method} names {str(value)[:200]!r}, which lies (or holds a link that leads) "
                f"outside {roots[0]}: an import uploads files of the record's own folder only "
                "(a record holds absolute paths: import the folder where its command wrote it)"
            )
    for name in ARTIFACT_NAMES:
        value = named.get(name)
        if value is not None and (not isinstance(value, str) or entry_problem(value)):
            return f"{method}: {name} {str(value)[:80]!r} is no plain relative path"
    return None


def inside(path: str, roots: list[Path]) -> bool:
    """Whether `path`, and for a folder every link below it (an upload copies what they
    point to), resolves inside one of `roots`."""
    try:
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            return False
        for folder, dirs, files in os.walk(resolved):
            links = [Path(folder, name) for name in dirs + files]
            if not all(inside(str(link), roots) for link in links if link.is_symlink()):
                return False
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL
        return False
    return True


def store_key(uri: str) -> str:
    """The tracking URI as the key of import progress: a relative sqlite or file store made
    absolute (another working directory is another store), a password masked."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).absolute())
    elif "://" not in uri:
        uri = Path(uri).absolute().as_uri()
    return redact_value(uri)


def import_progress(folder: Path) -> dict:
    """How far the record was imported into each MLflow store (`imported_through` calls)
    and into which run, by `store_key`. (Written before progress was kept per store: one
    entry, `""`, that holds for the store its run is in.)"""
    state_file = RunDir(folder).tracking_import
    if not state_file.exists():
        return {}
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = None
    stores = state.get("stores", {"": state}) if isinstance(state, dict) else None
    if not isinstance(stores, dict) or not all(map(valid_progress, stores.values())):
        raise LmmtuneError(f"{state_file} is damaged: delete it to import the whole record again")
    return stores


def valid_progress(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("imported_through", 0), int)
        and isinstance(entry.get("run_id"), str | None)
    )


def existing_run(uri: str, run_id: str | None) -> str | None:
    """`run_id` when the store at `uri` holds it (not deleted), else None."""
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run_id if run.info.lifecycle_stage != "deleted" else None


def plan_import(folder: Path, events: list[dict], uri: str):
    """(pending calls with their place in the record, the run they go to or None: a new one).

    The run the command logged to gets the calls it missed; any other store gets them all,
    in a run of its own that later imports continue."""
    progress = import_progress(folder)
    original = next((e["run_id"] for e in events if e.get("run_id")), None)
    entry = progress.get(store_key(uri)) or progress.get("") or {}
    run_id = existing_run(uri, entry.get("run_id") or original)
    if run_id is None:
        if entry.get("run_id") or original:
            print(f"the MLflow run of {folder} is not in this store: importing into a new run")
        entry = {}
    done = entry.get("imported_through", 0) if run_id == entry.get("run_id") else 0
    copy = run_id is None or run_id != original
    pending = [
        (i, e) for i, e in enumerate(events) if i >= done and (copy or not e.get("delivered"))
    ]
    return pending, run_id


def replay(folder: Path, tracker, pending: list[tuple[int, dict]], events, uri: str) -> int:
    """Replay `pending` into `tracker`, then end it as the command ended. How far it got is
    saved after every call that fails, so that the next import starts there, in the same run."""
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
        save_progress(folder, uri, {"imported_through": imported_through, "run_id": tracker.run_id})
    return replayed


def save_progress(folder: Path, uri: str, entry: dict) -> None:
    stores = {key: value for key, value in import_progress(folder).items() if key}
    stores[store_key(uri)] = entry
    state_file = RunDir(folder).tracking_import
    write_text_atomic(state_file, json.dumps({"stores": stores}))
    add_to_manifest(folder, [state_file])


def names_of(folder: Path) -> tuple[str, str]:
    """(experiment, run name) the command used: from tracking.json, else (records written
    before it named them) the run's recipe name and the folder's name."""
    record = LocalRecord(folder)
    try:
        state = record.state()
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or not all(
        isinstance(state.get(key), str | None) for key in ("experiment", "run_name")
    ):
        raise LmmtuneError(f"{record.state_file} is damaged: it names no MLflow run")
    experiment = state.get("experiment")
    config = RunDir(folder).config
    if experiment is None and config.is_file():
        from omegaconf import OmegaConf

        experiment = OmegaConf.load(config).get("name")
    return experiment or "lmmtune", state.get("run_name") or folder.name


def import_folder(folder: Path, tracking: TrackingConfig) -> str:
    """Import one folder's record; say what was done."""
    from lmmtune.tracking.mlflow_run import resolve_tracking_uri
    from lmmtune.tracking.tracker import Tracker

    events = checked_events(folder)
    if not events:
        return f"nothing to import: the record of {folder} holds no calls"
    uri = resolve_tracking_uri(tracking)
    pending, run_id = plan_import(folder, events, uri)
    if not pending:
        return f"nothing to import: every recorded call of {folder} is in MLflow at {redact_value(uri)}"
    experiment, run_name = names_of(folder)
    # No record: a call that fails raises, and the run stays open in MLflow for the next import.
    tracker = Tracker(run_id=run_id)  # complete the run MLflow lost, or an earlier import's
    new_name = None if run_id is not None else f"{run_name} (imported)"
    tracker.start_run(tracking, experiment, new_name, system_metrics=False)
    if run_id is None:
        tracker.set_tags({"lmmtune.imported_from": str(folder.resolve())})
    count = replay(folder, tracker, pending, events, uri)
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
