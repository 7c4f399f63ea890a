"""Caption sets for stage 1 (`data.template=plain`): what makes a record a caption.

LLaVA's stage 1 (`preprocess_plain`) trains on pairs of one image and one caption: a
record with no image, or with more than one turn, has no place in it and is refused,
named. Every other check of a caption set is the data check's own, run with the plain
template: empty captions (`empty answer`), captions longer than `data.max_length` with the
image tokens (`longer than data.max_length`), missing or broken images, and the text of a
special token such as `</s>` in a caption.
"""

from __future__ import annotations

from lmmtune.data.records import Sample
from lmmtune.errors import Kind, RecordProblem


def caption_problems(samples: list[Sample]) -> list[RecordProblem]:
    """A problem for each sample that is not one image with one caption."""
    problems = []
    for sample in samples:
        reason = None
        if sample.image is None:
            reason = "no image: a caption set pairs each caption with its image"
        elif len(sample.turns) != 1:
            reason = (
                f"{len(sample.turns)} turns: a caption record has one (the caption); "
                "stage 1 (data.template=plain) trains image + caption only"
            )
        if reason is not None:
            problems.append(RecordProblem(sample.source, sample.id, reason, Kind.NOT_A_CAPTION))
    return problems
