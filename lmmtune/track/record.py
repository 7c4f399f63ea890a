"""A local record of everything sent to the tracker, and a tracker that survives MLflow failures.

Every call (params, metrics, tags, artifacts, the end status) is appended to
`RUN/tracking_record.jsonl` before it goes to MLflow. When MLflow is unreachable
at the start, or fails mid-run (server down, sqlite locked), training goes on with
a warning and the record keeps everything; `python -m lmmtune.track.record RUN_DIR`
imports it into MLflow afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmmtune.atomic import write_text_atomic
from lmmtune.redact import redact, redact_value
from lmmtune.rundir import RunDir

log = logging.getLogger(__name__)

IMPORT_STATE = "tracking_import.json"
RETRY_DELAYS = (1.0, 4.0)
"""Seconds to wait before each retry of a failed MLflow call, then the run goes on locally."""


class LocalRecord:
    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).tracking_record

    def append(
        self, method: str, args: tuple, kwargs: dict, delivered: bool = True, run_id=None
    ) -> None:
        """One call, and whether it reached MLflow run `run_id` (what an import replays)."""
        if method != "log_metrics":  # metrics are numbers: never masked (token_f1 stays a number)
            args = [redact(arg) if isinstance(arg, dict) else redact_value(arg) for arg in args]
        event = {"time": time.time(), "method": method, "args": args, "kwargs": kwargs}
        event.update(delivered=delivered, run_id=run_id)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, default=str) + "\n")

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [
            json.loads(line)
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]


def last_logged_step(run_dir: Path) -> int:
    """The highest training step whose metrics the run's record holds (0: none)."""
    steps = [
        e["kwargs"].get("step") or 0
        for e in LocalRecord(run_dir).events()
        if e["method"] == "log_metrics"
        and any(k.startswith(("train/", "eval/")) for k in (e["args"] or [{}])[0])
    ]
    return max(steps, default=0)


class ResilientTracker:
    """Forward every call to the primary tracker; on its first failure keep going locally."""

    def __init__(self, start_primary: Callable[[], Any], record: LocalRecord):
        self.record = record
        self.primary = None
        self.failed_reason: str | None = None
        try:
            self.primary = start_primary()
        except Exception as exc:  # any failure of the tracking backend must not stop training
            self._fail("could not start", exc)

    @property
    def run_id(self) -> str | None:
        """The MLflow run, kept after MLflow fails: the import completes that run."""
        if self.primary is not None:
            self._run_id = getattr(self.primary, "run_id", None)
        return getattr(self, "_run_id", None)

    def __getattr__(self, method: str) -> Callable[..., None]:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs):
            run_id = self.run_id
            result, delivered = None, False
            if self.primary is not None:
                result, delivered = self._call_with_retries(method, args, kwargs)
            self.record.append(method, args, kwargs, delivered=delivered, run_id=run_id)
            return result

        return call

    def _call_with_retries(self, method: str, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """(result, True), or after RETRY_DELAYS (a server restarting) (None, False)."""
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            try:
                return getattr(self.primary, method)(*args, **kwargs), True
            except Exception as exc:  # noqa: BLE001 - see above
                if delay is None or method == "end":
                    self._fail(f"failed in {method} (after {attempt + 1} tries)", exc)
                    return None, False
                time.sleep(delay)
        return None, False

    def _fail(self, what: str, exc: Exception) -> None:
        reason = redact_value(f"{type(exc).__name__}: {exc}")
        self.failed_reason = reason.splitlines()[0][:300] if reason else type(exc).__name__
        log.warning(
            "MLflow %s (%s); training goes on and everything is kept in %s. "
            "Import it later with: python -m lmmtune.track.record %s",
            what,
            self.failed_reason,
            self.record.path,
            self.record.path.parent,
        )
        # No more calls to a broken backend (each may block for its timeout); the MLflow run
        # stays open there, and the import completes it from the record.
        forget = getattr(self.primary, "forget", None)
        if forget is not None:
            try:
                forget()
            except Exception as problem:  # noqa: BLE001 - MLflow internals moved: keep training
                log.debug("could not let go of the MLflow run: %s", problem)
        self.primary = None


def import_record(run_dir: Path, tracker, events: list[dict]) -> int:
    """Replay `events` (calls that did not reach MLflow) into `tracker`; end it as the run ended."""
    replayed = 0
    for event in events:
        if event["method"] == "end":
            continue
        getattr(tracker, event["method"])(*event["args"], **event["kwargs"])
        replayed += 1
    final = [e for e in LocalRecord(run_dir).events() if e["method"] == "end"]
    tracker.end(*(final[-1]["args"] if final else ["FINISHED"]))
    return replayed


def pending_events(run_dir: Path) -> tuple[list[dict], str | None, int]:
    """The recorded calls not yet in MLflow (never delivered, not imported before), the MLflow
    run they belong to (None: MLflow was down from the start), and the record's length."""
    events = LocalRecord(run_dir).events()
    state_file = run_dir / IMPORT_STATE
    done = json.loads(state_file.read_text())["imported_through"] if state_file.exists() else 0
    pending = [e for e in events[done:] if not e.get("delivered", False)]
    run_ids = [e.get("run_id") for e in pending if e.get("run_id")]
    return pending, (run_ids[0] if run_ids else None), len(events)


def main(argv: list[str] | None = None) -> None:
    from lmmtune.config import TrackingConfig
    from lmmtune.track.mlflow_tracker import MlflowTracker

    parser = argparse.ArgumentParser(
        description="Import a run's local tracking record into MLflow."
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    parser.add_argument("--experiment", default=None, help="default: the run's recipe name")
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    pending, run_id, total = pending_events(args.run_dir)
    if not pending:
        print(f"nothing to import: every recorded call of {args.run_dir} is in MLflow")
        return
    config = OmegaConf.load(RunDir(args.run_dir).config)
    tracking = TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment)
    tracker = None
    if run_id is not None:  # complete the run MLflow lost contact with
        try:
            tracker = MlflowTracker(tracking, config.name, None, resume_run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - not in this store: a new run gets everything
            print(f"run {run_id} is not in this MLflow store ({exc}); importing into a new run")
            pending = LocalRecord(args.run_dir).events()
    if tracker is None:
        tracker = MlflowTracker(tracking, config.name, f"{args.run_dir.name} (imported)")
        tracker.set_tags({"lmmtune.imported_from": str(args.run_dir.resolve())})
    count = import_record(args.run_dir, tracker, pending)
    state = {"imported_through": total, "run_id": tracker.run_id}
    write_text_atomic(args.run_dir / IMPORT_STATE, json.dumps(state))
    print(f"imported {count} calls into MLflow run {tracker.run_id}")


if __name__ == "__main__":
    main()
