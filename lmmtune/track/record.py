"""The local record of a tracked command: every call its `Tracker` made (params, metrics,
tags, artifacts, the end status), one JSON line each in `tracking_record.jsonl`, marked
delivered to MLflow or not; `tracking.json` beside it names the MLflow run, its experiment
and run name. `python -m lmmtune import FOLDER` (`lmmtune.track.importing`) sends what MLflow
missed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmmtune.atomic import write_text_atomic
from lmmtune.errors import LmmtuneError
from lmmtune.owned import adopt, write_manifest
from lmmtune.redact import redact, redact_value
from lmmtune.rundir import RunDir

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
