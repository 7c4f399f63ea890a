"""From `data.*` settings to checked train and eval samples: what `check` and training share.

`inspect_data` reads the files, resolves and decodes every image, counts tokens,
finds duplicate ids, splits train/eval and returns a `DataReport`. `check` prints it;
`load_splits` (training) writes it to the run directory and then stops
(`data.on_error=fail`) or drops the invalid records (`skip`), returning them in
`Splits.problems` and writing them to `skipped_records.jsonl`.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmmtune.config import DataConfig, OnError
from lmmtune.data.dataset import image_token_count
from lmmtune.data.demo import write_demo_dataset
from lmmtune.data.pairs import check_rejected_lengths, unpaired
from lmmtune.data.problems import DataError, RecordProblem, write_problems
from lmmtune.data.readers import read_data
from lmmtune.data.records import Sample
from lmmtune.data.report import DataReport, format_report
from lmmtune.data.validate import (
    check_images,
    check_lengths,
    duplicate_ids,
    image_key,
    resolve_images,
    special_token_text,
    train_eval_overlap,
)
from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)
DEMO = "demo"
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
    train_path, eval_path = data_paths(data_cfg, work_dir)
    report = DataReport(max_length=data_cfg.max_length, image_tokens=image_token_count(processor))
    train = _read(train_path, "train", data_cfg, report)
    evaluation = _read(eval_path, "eval", data_cfg, report) if eval_path is not None else None
    everything = train + (evaluation or [])
    if pairs_only:
        report.problems += unpaired(everything)
    if data_cfg.verify_images:
        unresolved = {p.source for p in report.problems}
        resolved = [s for s in everything if s.source not in unresolved]
        report.problems += check_images(resolved, data_cfg.max_image_pixels, data_cfg.num_workers)
    too_long, report.token_lengths, report.answer_lengths = check_lengths(
        everything, processor, data_cfg.max_length
    )
    report.problems += too_long
    report.problems += special_token_text(everything, processor.tokenizer)
    report.problems += check_rejected_lengths(everything, processor, data_cfg.max_length)[0]
    report.warnings += duplicate_ids(everything)
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
        report.eval_from = "the data.eval file"
    length_of = dict(zip((s.source for s in everything), report.token_lengths, strict=True))
    report.train_lengths = [length_of[s.source] for s in report.train]
    report.warnings += train_eval_overlap(report.train, report.eval)
    report.problems.sort(key=in_file_order)
    report.warnings.sort(key=in_file_order)
    report.seconds = time.perf_counter() - started
    return report


def data_paths(data_cfg: DataConfig, work_dir: Path) -> tuple[str, str | None]:
    """data.train and data.eval; `demo` writes the synthetic set into `work_dir` first (its
    own eval split unless data.eval names another)."""
    if data_cfg.train is None:
        raise LmmtuneError(
            "no training data: set data.train=PATH (LLaVA JSON, JSONL, CSV, parquet, a datasets "
            "folder) or data.train=demo"
        )
    if data_cfg.train == DEMO:
        train, evaluation = write_demo_dataset(
            work_dir / "demo_data", data_cfg.demo_size, data_cfg.seed
        )
        return str(train), data_cfg.eval or str(evaluation)
    return data_cfg.train, data_cfg.eval


def _read(path: str, role: str, data_cfg: DataConfig, report: DataReport) -> list[Sample]:
    """One file's samples, image paths resolved; its problems and warnings go to the report.

    Samples whose image path fails (missing, outside the root) are returned too, so that
    token lengths and duplicate ids cover every parsed record; their problem marks them.
    """
    data = read_data(path, data_cfg.columns)
    image_root = Path(data_cfg.image_root) if data_cfg.image_root else data.image_root
    report.files.append((role, path, data.records))
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
