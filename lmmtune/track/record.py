"""A local record of everything sent to the tracker, and a tracker that survives MLflow failures.

One fault policy for every command that tracks (train, the DPO stage, eval, export): every
call (params, metrics, tags, artifacts, the end status) is appended to the folder's
`tracking_record.jsonl` before it goes to MLflow, marked delivered or not. When MLflow is
unreachable at the start, or fails mid-command (server down, sqlite locked), a failed call is
retried (not a model upload, not the end status), then the command goes on with a warning
and the record keeps everything;
`python -m lmmtune import FOLDER` (`lmmtune.track.importing`) sends it to MLflow afterwards.
`tracking.json` beside it names the MLflow run, its experiment and run name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmmtune.atomic import write_text_atomic
from lmmtune.errors import LmmtuneError
from lmmtune.owned import adopt, write_manifest
from lmmtune.redact import redact, redact_value
from lmmtune.rundir import RunDir

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 4.0)
"""Seconds to wait before each retry of a failed MLflow call, then the command goes on locally."""
NOT_RETRIED = ("end", "log_model", "log_adapter_model")
"""Calls not sent twice: a model upload of gigabytes may have half succeeded (a second logged
model or registered version); the import replays them once, later."""


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


class ResilientTracker:
    """Forward every call to the primary tracker; on its first failure keep going locally.

    `doing` names the command in the warning ("training", "the evaluation", "the export").
    """

    def __init__(
        self,
        start_primary: Callable[[], Any],
        record: LocalRecord,
        doing: str,
        run_id: str | None = None,
    ):
        """`run_id`: the MLflow run the calls belong to if the primary cannot start (the run a
        resumed training continues): the import completes it."""
        self.record = record
        self.doing = doing
        self._run_id = run_id
        self.primary = None
        self.failed_reason: str | None = None
        try:
            self.primary = start_primary()
        except Exception as exc:  # any failure of the tracking backend must not stop the command
            self._fail("could not start", exc)

    @property
    def run_id(self) -> str | None:
        """The MLflow run, kept after MLflow fails: the import completes that run."""
        if self.primary is not None:
            self._run_id = getattr(self.primary, "run_id", None)
        return self._run_id

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
                if delay is None or method in NOT_RETRIED:
                    self._fail(f"failed in {method} (after {attempt + 1} tries)", exc)
                    return None, False
                time.sleep(delay)
        return None, False

    def _fail(self, what: str, exc: Exception) -> None:
        reason = redact_value(f"{type(exc).__name__}: {exc}")
        self.failed_reason = reason.splitlines()[0][:300] if reason else type(exc).__name__
        log.warning(
            "MLflow %s (%s); %s goes on and everything is kept in %s. %s",
            what,
            self.failed_reason,
            self.doing,
            self.record.path,
            import_hint(self.record.folder),
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


def import_hint(folder: Path) -> str:
    return f"Import it later with: python -m lmmtune import {folder}"


if __name__ == "__main__":  # the import command's old name, printed by earlier versions
    import sys

    sys.exit("the import moved: python -m lmmtune import FOLDER [--tracking-uri URI]")
