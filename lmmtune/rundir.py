"""The run directory: created once, never overwritten by accident, resumable.

`RUN/config.yaml` marks a directory that holds a run. Starting again in it needs
`overwrite=true` (which clears the old results) or `train.resume=auto|PATH` (which
continues from the latest finished checkpoint).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmmtune import distributed
from lmmtune.errors import LmmtuneError
from lmmtune.track.redact import redact
from lmmtune.train.checkpoints import find_resume_checkpoint

log = logging.getLogger(__name__)

RESULTS = (
    "adapter",
    "checkpoints",
    "best",  # train.keep_best
    ".best.tmp-*",
    "metrics.json",
    "eval_before.json",
    "eval_predictions.jsonl",
    "eval_before_after.png",
    "eval_samples.png",
    "data_report.txt",
    "skipped_records.jsonl",
    "tracking.json",
    "tracking_record.jsonl",
    "eval",  # the eval command's results
    "export-*",  # exports of the old adapter
)
"""What lmmtune writes into a run directory: cleared by overwrite=true, and nothing else is."""


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: str | None) -> Path | None:
    """Create or reopen the run directory; return the checkpoint to resume from, if any."""
    holds_run = (run_dir / "config.yaml").exists()
    if resume is not None:
        checkpoint = find_resume_checkpoint(run_dir / "checkpoints", resume)
        if checkpoint is None and (run_dir / "metrics.json").exists():
            raise LmmtuneError(f"{run_dir} holds a finished run; nothing to resume")
        if checkpoint is None:
            log.info(
                "train.resume=%s: no finished checkpoint in %s, starting from the beginning",
                resume,
                run_dir,
            )
        else:
            log.info("resuming from %s", checkpoint)
        run_dir.mkdir(parents=True, exist_ok=True)
        return checkpoint
    if holds_run and not overwrite:
        raise LmmtuneError(
            f"{run_dir} already holds a run. Continue it with train.resume=auto, "
            "choose another output_dir=..., or pass overwrite=true to replace it"
        )
    if holds_run:
        log.warning("overwrite=true: replacing the run in %s", run_dir)
        for pattern in RESULTS:
            for target in run_dir.glob(pattern):
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def job_output_dir(output_dir: str) -> str:
    """The run directory of this process.

    In a Hydra multirun every job gets its own, Hydra's job directory SWEEP_DIR/JOB_NUM
    (output_dir itself is the sweep's and the same for every job). Under torchrun every
    rank takes rank 0's: the default's timestamp can differ by a second between ranks.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().runtime.output_dir
    return distributed.agree_on_output_dir(output_dir)


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config with secrets masked."""
    path = run_dir / "config.yaml"
    OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))), path)
    return path
