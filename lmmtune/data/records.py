"""Read training records from the formats users have, into one `Sample` shape.

Formats: LLaVA JSON (a list of `{"id", "image", "conversations"}`), LLaVA JSONL
(one such record per line) and flat JSONL with image/question/answer columns.
Every problem is reported with its file, record and reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmmtune.config import DataColumns
from lmmtune.data.template import IMAGE_PLACEHOLDER
from lmmtune.errors import LmmtuneError

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


@dataclass
class Sample:
    id: str
    turns: list[tuple[str, str]]
    """(question, answer) pairs, image placeholders removed."""
    image: str | None = None
    """Image path as written in the record (resolved against the image root when loaded)."""
    question_type: str | None = None
    source: str = ""
    """Where the record came from, for error messages: `file:line` or `file[index]`."""
    extra: dict = field(default_factory=dict)


@dataclass
class RecordProblem:
    source: str
    record_id: str | None
    reason: str

    def __str__(self) -> str:
        label = f" (id {self.record_id})" if self.record_id is not None else ""
        return f"{self.source}{label}: {self.reason}"


class DataError(LmmtuneError):
    """One or more records are invalid; the message lists each with its place and reason."""

    def __init__(self, problems: list[RecordProblem], header: str = "invalid training data"):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{header}: {len(problems)} problem(s)\n{shown}{more}")


def load_samples(
    path: str | Path, columns: DataColumns
) -> tuple[list[Sample], list[RecordProblem]]:
    """Read every record of a data file; return the good samples and the problems found."""
    path = Path(path)
    if not path.exists():
        raise LmmtuneError(f"data file not found: {path}")
    raw = _read_raw_records(path)
    samples, problems = [], []
    for source, record in raw:
        try:
            samples.append(_to_sample(record, source, columns))
        except RecordInvalid as exc:
            record_id = record.get("id") if isinstance(record, dict) else None
            problems.append(
                RecordProblem(source, None if record_id is None else str(record_id), str(exc))
            )
    return samples, problems


class RecordInvalid(ValueError):
    pass


def _read_raw_records(path: Path) -> list[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmmtuneError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{line_number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise LmmtuneError(
                    f"{path}:{line_number}: invalid JSON: {exc.msg} (column {exc.colno})"
                ) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LmmtuneError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise LmmtuneError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{path}[{index}]", record) for index, record in enumerate(data)]


def _to_sample(record, source: str, columns: DataColumns) -> Sample:
    if not isinstance(record, dict):
        raise RecordInvalid(f"expected an object, got {type(record).__name__}")
    if "conversations" in record:
        return _llava_sample(record, source)
    if columns.question in record or columns.answer in record:
        return _flat_sample(record, source, columns)
    raise RecordInvalid(
        f"no 'conversations' list and no '{columns.question}'/'{columns.answer}' columns"
    )


def _llava_sample(record: dict, source: str) -> Sample:
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise RecordInvalid("'conversations' is empty or not a list")
    turns, placeholders = [], 0
    for index in range(0, len(conversations), 2):
        pair = conversations[index : index + 2]
        roles = [
            str(message.get("from", "")).lower() if isinstance(message, dict) else ""
            for message in pair
        ]
        if len(pair) < 2 or roles[0] not in HUMAN_ROLES or roles[1] not in ASSISTANT_ROLES:
            raise RecordInvalid(
                f"roles out of order at message {index}: expected human then gpt, got {roles}"
            )
        question, answer = (str(message.get("value", "")) for message in pair)
        placeholders += question.count(IMAGE_PLACEHOLDER) + answer.count(IMAGE_PLACEHOLDER)
        question = question.replace(IMAGE_PLACEHOLDER, "").strip()
        if not answer.strip():
            raise RecordInvalid(f"empty answer at message {index + 1}")
        turns.append((question, answer.strip()))
    image = record.get("image")
    if isinstance(image, list):
        raise RecordInvalid(
            f"{len(image)} images in one record: LLaVA 1.5 takes one image per sample"
        )
    if image is not None and placeholders > 1:
        raise RecordInvalid(f"{placeholders} '<image>' placeholders for one image")
    if image is None and placeholders:
        raise RecordInvalid("'<image>' placeholder in a record without an image")
    return Sample(
        id=str(record.get("id", source)),
        turns=turns,
        image=image,
        question_type=record.get("question_type"),
        source=source,
    )


def _flat_sample(record: dict, source: str, columns: DataColumns) -> Sample:
    question = str(record.get(columns.question) or "").replace(IMAGE_PLACEHOLDER, "").strip()
    answer = str(record.get(columns.answer) or "").strip()
    if not question:
        raise RecordInvalid(f"empty '{columns.question}'")
    if not answer:
        raise RecordInvalid(f"empty '{columns.answer}'")
    return Sample(
        id=str(record.get(columns.id, source)),
        turns=[(question, answer)],
        image=record.get(columns.image),
        question_type=record.get(columns.question_type),
        source=source,
    )
