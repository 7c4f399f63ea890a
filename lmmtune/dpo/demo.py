"""The demo's preference pairs: the demo scans and questions, the right answer chosen, a wrong one rejected."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from lmmtune.data.demo import write_demo_dataset
from lmmtune.data.splits import DEMO

WRONG = {"yes": "no", "no": "yes", "left": "right", "right": "left"}
"""The rejected answer of each demo answer: the other closed choice."""


def write_demo_pairs(target: Path, size: int, seed: int) -> tuple[Path, Path]:
    """Write the demo set as LLaVA-style pairs (same images, ids and split as the SFT demo)."""
    files = write_demo_dataset(target, size, seed)
    for path in files:
        records = json.loads(path.read_text())
        path.write_text(json.dumps([as_pair(record) for record in records], indent=1))
    return files


def as_pair(record: dict) -> dict:
    """An SFT demo record as a pair: the question stays, the answer becomes `chosen`."""
    question, answer = record["conversations"]
    return {
        **record,
        "conversations": [question],
        "chosen": answer["value"],
        "rejected": WRONG[answer["value"]],
    }


def pair_data_config(data_cfg, work_dir: Path):
    """`data.*` with `data.train=demo` turned into the demo pair files (written to `work_dir`)."""
    if data_cfg.train != DEMO:
        return data_cfg
    train, evaluation = write_demo_pairs(work_dir / "demo_data", data_cfg.demo_size, data_cfg.seed)
    return OmegaConf.merge(data_cfg, {"train": str(train), "eval": str(evaluation)})
