"""Errors the command line turns into one line and a non-zero exit, and the named problems of bad input records.

The exception type the command line turns into a short message and a non-zero exit.

Named problems with input data: every bad record gets a kind, a place and a reason.

The kind is the short name a report groups by ("missing image file"); the reason
says what exactly is wrong with this record ("image not found: /data/img/3.png").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


class LmmtuneError(Exception):
    """A problem the user can fix (bad data, missing model, bad setting); no traceback shown."""

    exit_code = 1


class RunInterrupted(LmmtuneError):
    """SIGINT/SIGTERM stopped training after a checkpoint; exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalStop(KeyboardInterrupt):
    """SIGINT/SIGTERM outside the training loop: a KeyboardInterrupt, so that no `except
    Exception` on the way swallows it; the command line prints its message, no traceback."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.message = message
        self.exit_code = 128 + signum


class Kind:
    """The names of the problems lmmtune finds; reports group by them."""

    # Records: errors.
    INVALID_JSON = "invalid JSON"
    NOT_A_RECORD = "not a record"
    NO_CONVERSATIONS = "no conversations"
    ROLES_OUT_OF_ORDER = "roles out of order"
    EMPTY_QUESTION = "empty question"
    EMPTY_ANSWER = "empty answer"
    PLACEHOLDER_MISMATCH = "<image> placeholder count mismatch"
    NOT_TEXT = "not text where text is expected"
    TOO_DEEP = "nested too deeply"
    MULTIPLE_IMAGES = "more than one image"
    TOO_LONG = "longer than data.max_length"
    NOT_A_CAPTION = "not an image caption"
    # Images: errors.
    PATH_ESCAPES_ROOT = "image path escapes data.image_root"
    MISSING_IMAGE = "missing image file"
    EMPTY_IMAGE = "zero-byte image file"
    TRUNCATED_IMAGE = "truncated image"
    CORRUPT_IMAGE = "corrupt image"
    NOT_AN_IMAGE = "not an image file"
    TOO_MANY_PIXELS = "image over the pixel limit"
    UNSUPPORTED_IMAGE = "unsupported image"
    DICOM_UNAVAILABLE = "DICOM support not installed"
    # Warnings: reported and counted, the records still train.
    DUPLICATE_ID = "duplicate id"
    TRAIN_EVAL_OVERLAP = "same image in train and eval"
    NO_IMAGE_COLUMN = "no image column"


@dataclass
class RecordProblem:
    """One bad record: where it is (`file:line` or `file[index]`), its id, what is wrong."""

    source: str
    record_id: str | None
    reason: str
    kind: str = "invalid record"

    def __str__(self) -> str:
        label = f" (id {self.record_id})" if self.record_id is not None else ""
        return f"{self.source}{label}: {self.reason}"


class RecordInvalid(ValueError):
    """Raised by the record and image readers; the caller adds the record's place and id."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class DataError(LmmtuneError):
    """One or more records are invalid; the message lists each with its place and reason."""

    def __init__(
        self,
        problems: list[RecordProblem],
        header: str = "invalid training data",
        report: str | None = None,
    ):
        self.problems = problems
        if report is not None:
            super().__init__(f"{header}\n{report}")
            return
        shown = "\n".join(f"  - [{p.kind}] {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{header}: {len(problems)} problem(s)\n{shown}{more}")


def write_problems(problems: list[RecordProblem], path: str | Path) -> Path:
    """Write problems as JSON lines (`source`, `record_id`, `reason`, `kind`), e.g. skipped records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for problem in problems:
            out.write(json.dumps(asdict(problem), ensure_ascii=False) + "\n")
    return path
