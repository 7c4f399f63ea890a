"""The data check that `check` and training share: from `data.*` settings to checked train and eval samples.

From `data.*` settings to checked train and eval samples: what `check` and training share.

`inspect_data` reads the files, resolves and decodes every image, counts tokens,
finds duplicate ids, splits train/eval and returns a `DataReport`. `check` prints it;
`load_splits` (training) writes it to the run directory and then stops
(`data.on_error=fail`) or drops the invalid records (`skip`), returning them in
`Splits.problems` and writing them to `skipped_records.jsonl`.

The checks `check` and training share: image paths, image files, token lengths, ids.

Each function takes samples and returns named problems (the record is invalid) or
warnings (reported and counted, the record still trains). Images are decoded in a
pool of worker processes (`data.num_workers`), the same decode training does, so a
broken image is found in seconds instead of in the middle of an epoch.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lmmtune.config import DataConfig, OnError, Template
from lmmtune.data.batches import image_token_count, token_lengths
from lmmtune.data.captions import caption_problems
from lmmtune.data.grouping import group_by_image
from lmmtune.data.images import inspect_image
from lmmtune.data.pairs import check_rejected_lengths, unpaired
from lmmtune.data.prompt import IMAGE_PLACEHOLDER
from lmmtune.data.readers import Source, data_sources, read_data
from lmmtune.data.records import Sample
from lmmtune.data.report import DataReport, format_report
from lmmtune.errors import (
    DataError,
    Kind,
    LmmtuneError,
    RecordInvalid,
    RecordProblem,
    write_problems,
)

log = logging.getLogger(__name__)
REPORT_FILE = "data_report.txt"
SKIPPED_FILE = "skipped_records.jsonl"


@dataclass
class Splits:
    train: list[Sample]
    eval: list[Sample]
    report: DataReport
    problems: list[RecordProblem] = field(default_factory=list)
    """Invalid records left out (data.on_error=skip); also in `skipped_records.jsonl`."""
    warnings: list[RecordProblem] = field(default_factory=list)
    """Duplicate ids, images in both train and eval: reported, the records still train."""


def load_splits(data_cfg: DataConfig, run_dir: Path, processor, pairs_only: bool = False) -> Splits:
    """Checked train and eval samples; invalid records stop the run or are skipped (`data.on_error`).

    Writes `data_report.txt` to `run_dir`, and `skipped_records.jsonl` when records are skipped.
    `pairs_only` (the preference stage): a record that is no preference pair is invalid.
    """
    report = inspect_data(data_cfg, processor, run_dir, pairs_only)
    text = format_report(report)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / REPORT_FILE).write_text(text + "\n", encoding="utf-8")
    if report.problems and data_cfg.on_error == OnError.fail:
        raise DataError(
            report.problems,
            header=f"{report.invalid_records} invalid record(s); fix them, or pass "
            "data.on_error=skip to train on the valid ones",
            report=text,
        )
    log.info("%s", text)
    if report.problems:
        write_problems(report.problems, run_dir / SKIPPED_FILE)
        log.warning(
            "skipped %d invalid record(s) (data.on_error=skip), listed in %s",
            report.invalid_records,
            run_dir / SKIPPED_FILE,
        )
    if not report.train:
        raise LmmtuneError(empty_training_set(report, data_cfg.train))
    evaluation = capped_eval(report, data_cfg)
    return Splits(report.train, evaluation, report, report.problems, report.warnings)


def empty_training_set(report: DataReport, source: str) -> str:
    """Why there is nothing to train on: an empty file, or every record invalid or held out."""
    if report.records == 0:
        return f"{source} holds no records: nothing to train on"
    return (
        f"no valid training records in {source}: {report.records} read, "
        f"{report.invalid_records} invalid (python -m lmmtune check lists them), the rest held "
        "out for evaluation"
    )


def capped_eval(report: DataReport, data_cfg: DataConfig) -> list[Sample]:
    """The eval split, cut to `data.max_eval_samples`: what training evaluates on."""
    if data_cfg.max_eval_samples is None:
        return report.eval
    return report.eval[: data_cfg.max_eval_samples]


def inspect_data(
    data_cfg: DataConfig, processor, work_dir: Path, pairs_only: bool = False
) -> DataReport:
    """Read, resolve, decode, tokenize and split the data; on_error is not applied here.
    `pairs_only`: records that are no preference pair are problems (the DPO stage's data)."""
    started = time.perf_counter()
    train_source, eval_source = data_sources(data_cfg, work_dir)
    report = DataReport(max_length=data_cfg.max_length, image_tokens=image_token_count(processor))
    train = _read(train_source, "train", data_cfg, report)
    evaluation = _read(eval_source, "eval", data_cfg, report) if eval_source else None
    everything = train + (evaluation or [])
    if pairs_only:
        report.problems += unpaired(everything)
    plain = data_cfg.template == Template.plain
    if plain:  # stage 1: one image, one caption
        report.problems += caption_problems(everything)
    if data_cfg.verify_images:
        unresolved = {p.source for p in report.problems}
        resolved = [s for s in everything if s.source not in unresolved]
        report.problems += check_images(resolved, data_cfg.max_image_pixels, data_cfg.num_workers)
    too_long, report.token_lengths, report.answer_lengths = check_lengths(
        everything, processor, data_cfg.max_length, data_cfg.template
    )
    report.problems += too_long
    report.problems += special_token_text(everything, processor.tokenizer)
    report.problems += check_rejected_lengths(everything, processor, data_cfg.max_length)[0]
    report.warnings += duplicate_ids(everything)
    split_valid(report, train, evaluation, eval_source, data_cfg)
    length_of = dict(zip((s.source for s in everything), report.token_lengths, strict=True))
    report.train_lengths = [length_of[s.source] for s in report.train]
    if not pairs_only and not plain:  # pairs and captions train one per record
        group_training_set(report, processor, data_cfg)
    report.warnings += train_eval_overlap(report.train, report.eval)
    report.problems.sort(key=in_file_order)
    report.warnings.sort(key=in_file_order)
    report.seconds = time.perf_counter() - started
    return report


def split_valid(report: DataReport, train, evaluation, eval_source, data_cfg: DataConfig) -> None:
    """The valid records into report.train and report.eval: the eval data's, or a share of
    train split off by image (data.eval_fraction)."""
    invalid = {p.source for p in report.problems}
    train = [s for s in train if s.source not in invalid]
    if evaluation is None:
        report.train, report.eval = split_off(train, data_cfg.eval_fraction, data_cfg.seed)
        report.eval_from = (
            f"{data_cfg.eval_fraction:.0%} of train (data.eval_fraction, seed {data_cfg.seed}; "
            "records of one image stay on one side)"
            if data_cfg.eval_fraction > 0
            else "none (data.eval=null, data.eval_fraction=0)"
        )
    else:
        report.train = train
        report.eval = [s for s in evaluation if s.source not in invalid]
        split = eval_source.split
        report.eval_from = f"data.eval_split={split}" if split else "the data.eval file"


def group_training_set(report: DataReport, processor, data_cfg: DataConfig) -> None:
    """The training split grouped by image (same content) into `report.grouping`, for `check`
    (both ways) and training (data.group_by_image)."""
    keys = [image_key(sample) for sample in report.train]
    report.grouping = group_by_image(
        report.train, report.train_lengths, keys, processor, data_cfg.max_length
    )
    report.group_by_image = data_cfg.group_by_image


def _read(source: Source, role: str, data_cfg: DataConfig, report: DataReport) -> list[Sample]:
    """One file's (or split's) samples, image paths resolved; its problems and warnings go
    to the report.

    Samples whose image path fails (missing, outside the root) are returned too, so that
    token lengths and duplicate ids cover every parsed record; their problem marks them.
    """
    data = read_data(source, data_cfg.columns)
    image_root = Path(data_cfg.image_root) if data_cfg.image_root else data.image_root
    report.files.append((role, data.path, data.records))
    report.problems += data.problems + resolve_images(data.samples, image_root)
    report.warnings += data.warnings
    return data.samples


def in_file_order(problem: RecordProblem) -> list:
    """Sort key: natural order of the place (`file[10]` after `file[9]`, `file:10` after `file:9`)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", problem.source)]


def split_off(
    samples: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split that keeps all records of one image (same content) on the same side."""
    keys = [image_key(sample) or sample.id for sample in samples]
    images = sorted(set(keys))
    random.Random(seed).shuffle(images)
    held_out = set(images[: int(round(len(images) * fraction))])
    train = [s for s, key in zip(samples, keys, strict=True) if key not in held_out]
    evaluation = [s for s, key in zip(samples, keys, strict=True) if key in held_out]
    return train, evaluation


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
    samples: list[Sample], processor, max_length: int, template: Template = Template.vicuna_v1
) -> tuple[list[RecordProblem], list[int], list[int]]:
    """Samples longer than `max_length` tokens (image tokens included) are problems: never truncated.

    Text far longer than any `max_length` tokens can hold is refused before tokenizing (a
    megabyte question would take gigabytes to tokenize); its length counts as max_length + 1.
    """
    limit = max_length * CHARS_PER_TOKEN_BOUND
    chars = [sum(len(q) + len(a) for q, a in s.turns) for s in samples]
    kept = [s for s, n in zip(samples, chars, strict=True) if n <= limit]
    # answers: per answer, for stats
    kept_lengths, answers = token_lengths(kept, processor, template=template)
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
