"""What a training stage runs inside, as context managers its `setup()` enters: the process
group, the removal of a failed start, and the locked run folder."""

from __future__ import annotations

import contextlib
import glob
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from lmmtune import distributed
from lmmtune.rundir import RunDir, prepare_run_dir, record_run_files, release_lock

log = logging.getLogger(__name__)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Joined for the stage under torchrun / accelerate launch (alone: nothing to join)."""
    distributed.init()
    try:
        yield
    finally:
        distributed.shutdown()


@contextlib.contextmanager
def removed_if_failed_start(run_dir: Path) -> Iterator[None]:
    """A run folder this stage creates is removed when the stage fails before its first
    checkpoint (an interrupt is no failure: that run is kept, to be resumed as it says)."""
    fresh = not run_dir.exists()
    try:
        yield
    except Exception:
        if fresh and distributed.world_size() == 1:
            remove_failed_start(run_dir)
        raise


def remove_failed_start(run_dir: Path) -> None:
    """Remove the run folder this command created when it failed before its first checkpoint.

    Everything in it was written by the failed start (config.yaml, eval_before.json, the
    data report); left behind, it would make the corrected command refuse the folder as
    "already holds a run", or resume on the old before-eval.
    """
    checkpoints = RunDir(run_dir).checkpoints
    if not run_dir.is_dir() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    log.warning("removed %s: the run stopped before its first checkpoint", run_dir)


@contextlib.contextmanager
def locked_run_folder(cfg) -> Iterator[tuple[RunDir, Path | None]]:
    """The run folder, created or reopened (a resume: the checkpoint it starts from), and
    locked while the stage runs; on the way out its files are recorded for overwrite=true.
    Under torchrun / accelerate launch, rank 0 prepares it and the other ranks get its result.
    """
    run_dir = Path(cfg.output_dir)
    resume_from = distributed.on_main(
        prepare_run_dir, run_dir, cfg.overwrite, cfg.train.resume, command_inputs(cfg)
    )
    try:
        yield RunDir(run_dir), resume_from
    finally:
        if distributed.is_main():
            record_run_files(run_dir)  # what overwrite=true may clear later
            release_lock(run_dir)


def command_inputs(cfg) -> list[tuple[str, str]]:
    """The paths a training reads (setting, path): overwrite=true never deletes one of them.
    A data glob stands for the files it matches."""
    resume = cfg.train.resume if cfg.train.resume != "auto" else None
    settings = {
        "model.path": cfg.model.path,
        "data.train": cfg.data.train,
        "data.eval": cfg.data.eval,
        "data.image_root": cfg.data.image_root,
        "dpo.init_adapter": cfg.dpo.init_adapter,
        "train.resume": resume,
    }
    return [
        (key, path)
        for key, value in settings.items()
        if value
        for path in (glob.glob(value, recursive=True) if glob.has_magic(value) else [value])
    ]
