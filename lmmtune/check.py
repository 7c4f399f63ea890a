"""`python -m lmmtune check [recipe=...] data.train=...`: validate the data, print a report.

It runs the checks training runs first (`lmmtune.data.splits.inspect_data`), with the
processor only (tokenizer and image processor, to count tokens): no model is loaded,
so it takes seconds on a laptop, before any GPU hour is spent. Exits 1 if any
record is invalid; warnings (duplicate ids, images in train and eval) do not fail it.

With `train.gpu_memory_gb=N` it also runs the memory planner on the longest training
sample, as training would (the model's config only): the micro-batch and
accumulation it picks, or exit 1 when the recipe cannot fit N GiB.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lmmtune.config import Config
from lmmtune.data.report import DataReport, format_report
from lmmtune.data.splits import inspect_data
from lmmtune.errors import LmmtuneError


def check(cfg: Config) -> DataReport:
    """Check the data set (and the memory plan), print the report, raise LmmtuneError
    if any record is invalid or the recipe cannot fit `train.gpu_memory_gb`."""
    from lmmtune.model.load import load_processor

    processor = load_processor(cfg.model)
    with tempfile.TemporaryDirectory(prefix="lmmtune-check-") as work_dir:  # `demo` writes here
        data_cfg = stage_data(cfg, Path(work_dir))
        report = inspect_data(data_cfg, processor, Path(work_dir), pairs_only=cfg.dpo.enabled)
    print(format_report(report), flush=True)
    if report.problems:
        valid = report.records - report.invalid_records
        raise LmmtuneError(
            f"{report.invalid_records} invalid record(s) of {report.records}, listed above; "
            f"fix them, or train with data.on_error=skip to use the {valid} valid ones"
        )
    if not report.train:
        from lmmtune.data.splits import empty_training_set

        raise LmmtuneError(empty_training_set(report, cfg.data.train))
    if cfg.train.gpu_memory_gb is not None:
        print(memory_plan(cfg, report), flush=True)
    return report


def memory_plan(cfg: Config, report: DataReport) -> str:
    """The planner's choice for the longest sample training will see, as a report line."""
    from lmmtune.train.memory import fit_to_memory

    longest = max(report.train_lengths, default=1)  # what training plans with
    sequences = 2 if cfg.dpo.enabled else 1  # a preference pair: chosen and rejected
    planned = fit_to_memory(cfg.train, cfg.model, cfg.quant, cfg.peft, longest, sequences)
    return (
        f"memory: fits train.gpu_memory_gb={cfg.train.gpu_memory_gb:g} at micro-batch "
        f"{planned.batch_size} x grad_accum {planned.grad_accum} (samples up to {longest} "
        "tokens; the modelled breakdown is in the log)"
    )


def stage_data(cfg: Config, work_dir: Path):
    """`data.*`, with `data.train=demo` meaning the demo pairs in the preference stage."""
    if not cfg.dpo.enabled:
        return cfg.data
    from lmmtune.dpo.demo import pair_data_config

    return pair_data_config(cfg.data, work_dir)
