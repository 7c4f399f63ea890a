"""The data report `check` prints and training writes to `data_report.txt`.

Counts by kind, token lengths with image tokens counted, answer lengths, and every
problem and warning grouped by its kind, each with file, record and id.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmmtune.data.records import Sample
from lmmtune.errors import RecordProblem

if TYPE_CHECKING:
    from lmmtune.data.grouping import Grouping

SHOWN_PER_KIND = 20
"""Records listed under each kind of problem before `... and N more` (all go to the JSONL)."""


@dataclass
class DataReport:
    """The numbers of one check: what was read, what is valid, how long it is, what is wrong."""

    files: list[tuple[str, str, int]] = field(default_factory=list)
    """(role, path, records read) per data file; role is train or eval."""
    eval_from: str = ""
    """How the eval split was made: a file, or a seeded fraction of train."""
    train: list[Sample] = field(default_factory=list)
    eval: list[Sample] = field(default_factory=list)
    token_lengths: list[int] = field(default_factory=list)
    """Tokens per parsed sample, image tokens included (too-long ones too)."""
    train_lengths: list[int] = field(default_factory=list)
    """Tokens per sample of `train`, in its order: for length grouping and the memory planner."""
    answer_lengths: list[int] = field(default_factory=list)
    """Tokens per answer (every turn of every parsed sample)."""
    grouping: Grouping | None = None
    """`train` grouped by image (`data.group_by_image`), whether or not training groups it;
    None for preference pairs."""
    group_by_image: bool = False
    """Whether training groups `train` by image (data.group_by_image)."""
    max_length: int = 0
    image_tokens: int = 0
    problems: list[RecordProblem] = field(default_factory=list)
    warnings: list[RecordProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def records(self) -> int:
        return sum(count for _, _, count in self.files)

    @property
    def invalid_records(self) -> int:
        return len({p.source for p in self.problems})

    @property
    def over_max_length(self) -> int:
        return sum(length > self.max_length for length in self.token_lengths)

    def kinds(self) -> dict[str, int]:
        """Valid samples by kind: with image / text-only, single / multi-turn."""
        samples = self.train + self.eval
        with_image = sum(s.image is not None for s in samples)
        multi = sum(len(s.turns) > 1 for s in samples)
        return {
            "with image": with_image,
            "text-only": len(samples) - with_image,
            "single-turn": len(samples) - multi,
            "multi-turn": multi,
        }


def summary(values: list[int]) -> str:
    if not values:
        return "none"
    return f"min {min(values)} / median {statistics.median(values):g} / max {max(values)}"


def format_report(report: DataReport) -> str:
    """The report as text, numbers first, then problems and warnings grouped by kind."""
    lines = ["data check"]
    for role, path, count in report.files:
        lines.append(f"  {role}: {path} ({count} records)")
    lines.append(f"  eval split: {report.eval_from}")
    lines.append(
        f"records: {report.records} read, {report.records - report.invalid_records} valid, "
        f"{report.invalid_records} invalid"
    )
    lines.append(f"  split: {len(report.train)} train, {len(report.eval)} eval")
    lines.append("  kinds: " + ", ".join(f"{n} {k}" for k, n in report.kinds().items()))
    question_types = Counter(s.question_type or "(none)" for s in report.train + report.eval)
    if set(question_types) != {"(none)"}:
        lines.append(
            "  question types: " + ", ".join(f"{k} {n}" for k, n in sorted(question_types.items()))
        )
    lines.append(
        f"tokens per sample ({report.image_tokens} per image included): "
        f"{summary(report.token_lengths)}; {report.over_max_length} over "
        f"data.max_length={report.max_length}"
    )
    lines.append(f"tokens per answer: {summary(report.answer_lengths)}")
    lines += _grouped("problems (invalid records)", report.problems)
    lines += _grouped("warnings (records still used)", report.warnings)
    if report.grouping is not None:
        lines.append(report.grouping.describe(on=report.group_by_image))
    lines.append(f"checked in {report.seconds:.1f} s")
    return "\n".join(lines)


def _grouped(title: str, problems: list[RecordProblem]) -> list[str]:
    if not problems:
        return [f"{title}: none"]
    by_kind: dict[str, list[RecordProblem]] = defaultdict(list)
    for problem in problems:
        by_kind[problem.kind].append(problem)
    lines = [f"{title}: {len(problems)}"]
    for kind, items in sorted(by_kind.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {kind} ({len(items)}):")
        lines += [f"    {problem}" for problem in items[:SHOWN_PER_KIND]]
        if len(items) > SHOWN_PER_KIND:
            lines.append(f"    ... and {len(items) - SHOWN_PER_KIND} more")
    return lines
