"""`python -m lmmtune check [recipe=...] data.train=...`: validate the data, print a report.

It runs the checks training runs first (`lmmtune.data.splits.inspect_data`), with the
processor only (tokenizer and image processor, to count tokens): no model is loaded,
so it takes seconds on a laptop, before any GPU hour is spent. Exits 1 if any
record is invalid; warnings (duplicate ids, images in train and eval) do not fail it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lmmtune.config import DataConfig, ModelConfig
from lmmtune.data.report import DataReport, format_report
from lmmtune.data.splits import inspect_data
from lmmtune.errors import LmmtuneError


def check(data_cfg: DataConfig, model_cfg: ModelConfig) -> DataReport:
    """Check the data set, print the report, raise LmmtuneError if any record is invalid."""
    from lmmtune.model.load import load_processor

    processor = load_processor(model_cfg)
    with tempfile.TemporaryDirectory(prefix="lmmtune-check-") as work_dir:  # `demo` writes here
        report = inspect_data(data_cfg, processor, Path(work_dir))
    print(format_report(report), flush=True)
    if report.problems:
        valid = report.records - report.invalid_records
        raise LmmtuneError(
            f"{report.invalid_records} invalid record(s) of {report.records}, listed above; "
            f"fix them, or train with data.on_error=skip to use the {valid} valid ones"
        )
    return report
