"""From `data.*` settings to train and eval samples with image paths resolved and checked."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from lmmtune.config import DataConfig
from lmmtune.data.demo import write_demo_dataset
from lmmtune.data.records import DataError, RecordProblem, Sample, load_samples

log = logging.getLogger(__name__)
DEMO = "demo"


@dataclass
class Splits:
    train: list[Sample]
    eval: list[Sample]
    problems: list[RecordProblem] = field(default_factory=list)


def resolve_image_path(image: str, image_root: Path) -> Path:
    """Resolve a record's image path under `image_root`, refusing paths that escape it."""
    root = image_root.resolve()
    path = (root / image).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path '{image}' escapes the image root {root}")
    return path


def read_data_file(
    path: str | Path, data_cfg: DataConfig
) -> tuple[list[Sample], list[RecordProblem]]:
    """Load one data file and resolve its image paths (against `data.image_root` or the file's folder)."""
    path = Path(path)
    samples, problems = load_samples(path, data_cfg.columns)
    image_root = Path(data_cfg.image_root) if data_cfg.image_root else path.parent
    good = []
    for sample in samples:
        if sample.image is not None:
            try:
                resolved = resolve_image_path(str(sample.image), image_root)
            except ValueError as exc:
                problems.append(RecordProblem(sample.source, sample.id, str(exc)))
                continue
            if not resolved.is_file():
                problems.append(
                    RecordProblem(sample.source, sample.id, f"image not found: {resolved}")
                )
                continue
            sample.image = str(resolved)
        good.append(sample)
    return good, problems


def load_splits(data_cfg: DataConfig, run_dir: Path) -> Splits:
    """Train and eval samples; invalid records stop the run or are skipped, by `data.on_error`."""
    train_path, eval_path = data_cfg.train, data_cfg.eval
    if train_path is None:
        from lmmtune.errors import LmmtuneError

        raise LmmtuneError(
            "no training data: set data.train=PATH (LLaVA JSON, JSONL) or data.train=demo"
        )
    if train_path == DEMO:
        train_path, eval_path = write_demo_dataset(
            run_dir / "demo_data", data_cfg.demo_size, data_cfg.seed
        )
    train, problems = read_data_file(train_path, data_cfg)
    if eval_path is not None:
        evaluation, eval_problems = read_data_file(eval_path, data_cfg)
        problems += eval_problems
    else:
        train, evaluation = split_off(train, data_cfg.eval_fraction, data_cfg.seed)
    if problems and data_cfg.on_error == "fail":
        raise DataError(
            problems, header="invalid data (data.on_error=skip trains on the valid records)"
        )
    for problem in problems:
        log.warning("skipped %s", problem)
    if data_cfg.max_eval_samples is not None:
        evaluation = evaluation[: data_cfg.max_eval_samples]
    log.info(
        "data: %d train, %d eval samples, %d skipped", len(train), len(evaluation), len(problems)
    )
    return Splits(train=train, eval=evaluation, problems=problems)


def split_off(
    samples: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split that keeps all records of one image on the same side."""
    images = sorted({sample.image or sample.id for sample in samples})
    random.Random(seed).shuffle(images)
    held_out = set(images[: int(round(len(images) * fraction))])
    train = [s for s in samples if (s.image or s.id) not in held_out]
    evaluation = [s for s in samples if (s.image or s.id) in held_out]
    return train, evaluation
