"""The checks `check` and training share: image paths, image files, token lengths, ids.

Each function takes samples and returns named problems (the record is invalid) or
warnings (reported and counted, the record still trains). Images are decoded in a
pool of worker processes (`data.num_workers`), the same decode training does, so a
broken image is found in seconds instead of in the middle of an epoch.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterable
from pathlib import Path

from lmmtune.data.dataset import token_lengths
from lmmtune.data.images import inspect_image
from lmmtune.data.problems import Kind, RecordInvalid, RecordProblem
from lmmtune.data.records import Sample
from lmmtune.data.template import IMAGE_PLACEHOLDER
from lmmtune.errors import LmmtuneError

DIGEST = "image_sha1"
"""Key in `Sample.extra` of the image's content digest, set by `check_images`."""
CHUNK = 32
"""Images per task sent to a worker: big enough to amortize the hand-off."""
CHARS_PER_TOKEN_BOUND = 64
"""More characters per token than any LLaMA/Vicuna token holds: text over max_length times
this cannot fit, whatever it says."""


def problem(sample: Sample, kind: str, reason: str) -> RecordProblem:
    return RecordProblem(sample.source, sample.id, reason, kind)


def resolve_images(samples: list[Sample], image_root: Path) -> list[RecordProblem]:
    """Resolve image paths under `image_root` in place; paths that escape it or miss are problems."""
    problems = []
    for sample in samples:
        if sample.image is None or sample.image_ref is not None:
            continue
        try:
            sample.image = str(resolve_image_path(sample.image, image_root))
        except RecordInvalid as error:
            problems.append(problem(sample, error.kind, error.reason))
    return problems


def resolve_image_path(image: str, image_root: Path) -> Path:
    """An absolute path as written; a relative one under `image_root`, refused if it climbs out.

    An absolute path is the data author's explicit choice (`datasets`' `to_parquet()` of an
    imagefolder writes them). A relative path is confined to the root, so a shared data file
    cannot reach `../../secrets` by its own; links are resolved before that test, so a
    symlink under the root that points elsewhere (`/etc/passwd`, a folder outside) is refused.
    To use a linked image folder, set `data.image_root` to the real folder (or one holding both).
    """
    if "://" in image:
        raise RecordInvalid(
            Kind.UNSUPPORTED_IMAGE,
            f"image URL '{image}': images are not downloaded; fetch them and set data.image_root",
        )
    try:
        root = Path(image_root).resolve()
        path = (root / image).resolve()
        if not Path(image).is_absolute() and not path.is_relative_to(root):
            raise RecordInvalid(
                Kind.PATH_ESCAPES_ROOT,
                f"image path '{shorten(image)}' leads outside data.image_root {root}, links "
                "resolved (refused; set data.image_root to the folder a link points into)",
            )
        if not path.is_file():
            raise RecordInvalid(Kind.MISSING_IMAGE, f"image not found: {shorten(str(path))}")
    except OSError as exc:  # a name longer than the filesystem allows, a link loop, ...
        raise RecordInvalid(
            Kind.MISSING_IMAGE, f"image path '{shorten(image)}' cannot be used: {exc.strerror}"
        ) from None
    return path


def shorten(text: str, keep: int = 120) -> str:
    """A path or text cut for a one-line message."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


def check_images(
    samples: list[Sample], max_pixels: int | None, workers: int
) -> list[RecordProblem]:
    """Decode every image as training will; set each good one's digest in `extra[DIGEST]`."""
    jobs = [(index, s.image_ref or s.image, max_pixels) for index, s in enumerate(samples)]
    jobs = [job for job in jobs if job[1] is not None]
    problems = []
    for index, digest, kind, reason in _run(jobs, workers):
        if digest is None:
            problems.append(problem(samples[index], kind, reason))
        else:
            samples[index].extra[DIGEST] = digest
    return problems


def _run(jobs: list, workers: int) -> Iterable[tuple]:
    if workers <= 1 or len(jobs) < 4 * CHUNK:
        return map(inspect_job, jobs)
    method = "fork" if sys.platform == "linux" else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        return list(pool.imap_unordered(inspect_job, jobs, chunksize=CHUNK))


def inspect_job(job: tuple) -> tuple[int, str | None, str | None, str | None]:
    """(index, digest, None, None) for a good image, (index, None, kind, reason) for a bad one."""
    index, source, max_pixels = job
    try:
        if isinstance(source, str):
            return index, inspect_image(source, max_pixels=max_pixels), None, None
        data, name = source.read()
        return index, inspect_image(data, name, max_pixels), None, None
    except RecordInvalid as error:
        return index, None, error.kind, error.reason


def check_lengths(
    samples: list[Sample], processor, max_length: int
) -> tuple[list[RecordProblem], list[int], list[int]]:
    """Samples longer than `max_length` tokens (image tokens included) are problems: never truncated.

    Text far longer than any `max_length` tokens can hold is refused before tokenizing (a
    megabyte question would take gigabytes to tokenize); its length counts as max_length + 1.
    """
    limit = max_length * CHARS_PER_TOKEN_BOUND
    chars = [sum(len(q) + len(a) for q, a in s.turns) for s in samples]
    kept = [s for s, n in zip(samples, chars, strict=True) if n <= limit]
    kept_lengths, answers = token_lengths(kept, processor)  # answers: per answer, for stats
    measured = dict(zip(map(id, kept), kept_lengths, strict=True))
    lengths = [measured.get(id(s), max_length + 1) for s in samples]
    problems = [
        problem(
            sample,
            Kind.TOO_LONG,
            f"{count:,} characters of text, far past data.max_length={max_length} tokens: "
            "refused without tokenizing"
            if count > limit
            else f"{length} tokens (image tokens included) exceed data.max_length={max_length}; "
            "samples are never truncated (raise data.max_length or shorten the record)",
        )
        for sample, length, count in zip(samples, lengths, chars, strict=True)
        if length > max_length
    ]
    return problems, lengths, answers


SPECIAL_TOKEN_TEXT = "special-token text in a message"


def special_token_text(samples: list[Sample], tokenizer) -> list[RecordProblem]:
    """Records whose text holds a special token's text (`</s>`, `<s>`, `<unk>`, `<pad>`, `<image>`).

    The tokenizer reads such text as the special token itself: a literal `</s>` in an
    answer would be trained as a real end of sequence, teaching the model to stop there.
    """
    specials = special_texts(tokenizer)
    problems = []
    for sample in samples:
        reason = _special_text_reason(sample, specials)
        if reason is not None:
            problems.append(problem(sample, SPECIAL_TOKEN_TEXT, reason))
    return problems


def special_texts(tokenizer) -> list[str]:
    """The texts the tokenizer reads as special tokens (and `<image>`), longest first."""
    return sorted({*tokenizer.all_special_tokens, IMAGE_PLACEHOLDER}, key=len, reverse=True)


def checked_question(
    question: str, has_image: bool, tokenizer, max_length: int, where: str = "the question"
) -> str:
    """A question typed for `predict` or the chat, taken as training's check takes a record.

    One leading `<image>` and its newline (LLaVA's `<image>\\n` prefix, copied from a
    LLaVA-format file) are dropped when there is an image: the prompt puts it first
    anyway. Any other `<image>`, the text of a special token (`</s> USER: ...` would
    forge a turn with a real end-of-sequence id) and text far past `max_length` tokens
    are refused, naming `where`, before anything is tokenized or generated.
    """
    question = (question or "").strip()
    if len(question) > max_length * CHARS_PER_TOKEN_BOUND:
        raise LmmtuneError(
            f"{where} is {len(question):,} characters long, far past what the model was "
            f"trained on (data.max_length={max_length} tokens); shorten it"
        )
    if has_image and question.startswith(IMAGE_PLACEHOLDER):
        # and its newline, also as `\\n` typed in a shell: '<image>\\nWhich side ...?'
        question = question.removeprefix(IMAGE_PLACEHOLDER).lstrip()
        question = question.removeprefix("\\n").strip()
    if IMAGE_PLACEHOLDER in question:
        raise LmmtuneError(
            f"{where} contains '<image>' "
            + (
                "past its start: the image goes before the question; write at most one "
                "'<image>', at the start"
                if has_image
                else "but there is no image"
            )
        )
    found = next((token for token in special_texts(tokenizer) if token in question), None)
    if found is not None:
        raise LmmtuneError(
            f"{where} contains {found!r}, the text of a special token: the model would read "
            "it as that token (remove or rewrite it)"
        )
    if not question:
        raise LmmtuneError(f"{where} is empty")
    return question


def _special_text_reason(sample: Sample, specials: list[str]) -> str | None:
    """Why the sample's first message that holds a special token's text is bad, or None."""
    for number, (question, answer) in enumerate(sample.turns, start=1):
        for role, text in (("question", question), ("answer", answer)):
            found = next((token for token in specials if token in text), None)
            if found is not None:
                return (
                    f"the {role} of turn {number} contains {found!r}, the text of a special "
                    "token: it would be trained as that token (remove or rewrite it)"
                )
    return None


def duplicate_ids(samples: list[Sample]) -> list[RecordProblem]:
    """A warning for each record whose id an earlier record already has."""
    first: dict[str, Sample] = {}
    warnings = []
    for sample in samples:
        if sample.id == sample.source:  # no id in the record: named by its place
            continue
        if sample.id in first:
            reason = f"duplicate id '{sample.id}' (first at {first[sample.id].source})"
            warnings.append(problem(sample, Kind.DUPLICATE_ID, reason))
        else:
            first[sample.id] = sample
    return warnings


def image_key(sample: Sample) -> str | None:
    """What identifies a sample's image: its content digest if checked, else its path or label."""
    if sample.image is None:
        return None
    return sample.extra.get(DIGEST) or sample.image


def train_eval_overlap(train: list[Sample], evaluation: list[Sample]) -> list[RecordProblem]:
    """A warning for each eval record whose image (same content) is also in the training set."""
    in_train: dict[str, Sample] = {}
    for sample in train:
        key = image_key(sample)
        if key is not None:
            in_train.setdefault(key, sample)
    warnings = []
    for sample in evaluation:
        match = in_train.get(image_key(sample) or "")
        if match is not None:
            reason = f"image {sample.image} is also in train ({match.source}, id {match.id})"
            warnings.append(problem(sample, Kind.TRAIN_EVAL_OVERLAP, reason))
    return warnings
