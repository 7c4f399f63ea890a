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

from lmmtune.track.redact import redact, redact_value

log = logging.getLogger(__name__)

RECORD_NAME = "tracking_record.jsonl"


class LocalRecord:
    def __init__(self, run_dir: Path):
        self.path = run_dir / RECORD_NAME

    def append(self, method: str, args: tuple, kwargs: dict) -> None:
        if method != "log_metrics":  # metrics are numbers: never masked (token_f1 stays a number)
            args = [redact(arg) if isinstance(arg, dict) else redact_value(arg) for arg in args]
        event = {"time": time.time(), "method": method, "args": args, "kwargs": kwargs}
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
        return getattr(self.primary, "run_id", None)

    def __getattr__(self, method: str) -> Callable[..., None]:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs):
            self.record.append(method, args, kwargs)
            if self.primary is None:
                return None
            try:
                return getattr(self.primary, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - see above
                self._fail(f"failed in {method}", exc)
                return None

        return call

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
        # stays open there, and the import makes a complete run from the record.
        self.primary = None


def import_record(run_dir: Path, tracker) -> int:
    """Replay a run's local record into `tracker` (an MlflowTracker); return the calls replayed."""
    events = LocalRecord(run_dir).events()
    if not events:
        raise FileNotFoundError(f"no tracking record in {run_dir}")
    replayed = 0
    for event in events:
        if event["method"] == "end":
            continue
        getattr(tracker, event["method"])(*event["args"], **event["kwargs"])
        replayed += 1
    final = [e for e in events if e["method"] == "end"]
    tracker.end(*(final[-1]["args"] if final else ["FINISHED"]))
    return replayed


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

    config = OmegaConf.load(args.run_dir / "config.yaml")
    tracker = MlflowTracker(
        TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment),
        experiment=config.name,
        run_name=f"{args.run_dir.name} (imported)",
    )
    tracker.set_tags({"lmmtune.imported_from": str(args.run_dir.resolve())})
    count = import_record(args.run_dir, tracker)
    print(f"imported {count} calls into MLflow run {tracker.run_id}")


if __name__ == "__main__":
    main()
