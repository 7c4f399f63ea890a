"""Fixtures for the data tests: a small valid LLaVA set, and inspect_data with the tiny processor."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmmtune.config import DataConfig
from tests.data.helpers import llava, save_image, write_json


@pytest.fixture()
def good_set(tmp_path) -> Path:
    """Four LLaVA records (three images, one text-only) in tmp_path/train.json."""
    for name in ("a", "b", "c"):
        save_image(tmp_path / "img" / f"{name}.png")
    records = [llava(f"r{i}", f"img/{n}.png") for i, n in enumerate("abc")]
    records.append(llava("r3", None, "What is a lesion?", "An abnormal area."))
    return write_json(tmp_path / "train.json", records)


@pytest.fixture()
def inspect(tiny_processor, tmp_path):
    """inspect_data(DataConfig(**overrides)) with the tiny processor, in-process (no pool)."""
    from lmmtune.data.checks import inspect_data

    def run(**overrides):
        overrides.setdefault("num_workers", 0)
        return inspect_data(DataConfig(**overrides), tiny_processor, tmp_path / "work")

    return run
