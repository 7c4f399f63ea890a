"""The folder of a two-stage run: OUT holds stage 1's run folder (OUT/align), stage 2's
(OUT/instruct), the whole config (OUT/config.yaml) and the parent MLflow run
(OUT/tracking.json).

Created once, locked while the run goes on, never reused by accident: starting again in it
needs `train.resume=auto` (the stage it stopped in continues) or `overwrite=true` (both
stages' files and its own are deleted, nothing else). A fresh folder whose run fails
before either stage kept anything is removed again, so the corrected command starts clean.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.folders import (
    MANIFEST,
    RUN_KIND,
    OwnedFolder,
    read_manifest,
    refuse_deleting_inputs,
    refuse_links,
    write_manifest,
)
from lmmtune.rundir.run import RunDir, check_tracking_state, release_lock, take_lock
from lmmtune.stage_configs import ALIGN, INSTRUCT

log = logging.getLogger(__name__)

TWO_STAGE_KIND = "two_stage"
"""The manifest kind of a two-stage run's folder."""


def stage_dirs(out: Path) -> tuple[RunDir, RunDir]:
    """Stage 1's and stage 2's run folders inside OUT."""
    return RunDir(out / ALIGN), RunDir(out / INSTRUCT)


@contextlib.contextmanager
def two_stage_folder(
    out: Path, overwrite: bool, resume: str | None, inputs: Iterable[tuple[str, str]] = ()
) -> Iterator[RunDir]:
    """OUT, created or reopened (refused as `check_two_stage_folder` says) and locked for the
    block; with overwrite=true (and nothing to resume) both stages are cleared first."""
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    finished = check_two_stage_folder(out, fresh, overwrite, resume)
    folder = RunDir(out)
    take_lock(folder)
    try:
        if overwrite and not fresh and (resume is None or finished):
            clear_two_stage(out, list(inputs))
        write_manifest(out, TWO_STAGE_KIND, {folder.config.name, folder.tracking.name})
        yield folder
    except Exception:
        if fresh and not any(stage.root.exists() for stage in stage_dirs(out)):
            release_lock(out)
            shutil.rmtree(out, ignore_errors=True)
            log.warning("removed %s: the run stopped before either stage kept anything", out)
        raise
    finally:
        release_lock(out)


def check_two_stage_folder(out: Path, fresh: bool, overwrite: bool, resume: str | None) -> bool:
    """Whether OUT holds a finished two-stage run. Refused: a link or a file, a folder with
    files that is no two-stage run, and one that is without train.resume or overwrite (a
    finished one: without overwrite)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise LmmtuneError(f"output_dir={out} is a link or a file; choose a folder")
    if fresh:
        return False
    manifest = read_manifest(out)
    if manifest is None or manifest.get("kind") != TWO_STAGE_KIND:
        what = "is not a two-stage run" if manifest else "was not made by lmmtune"
        raise LmmtuneError(
            f"output_dir={out} holds files and {what}: lmmtune never writes into or clears "
            "it. Choose an empty or new output_dir"
        )
    refuse_links(out, "output_dir")
    check_tracking_state(RunDir(out))  # the parent MLflow run a resume reopens
    finished = stage_dirs(out)[1].finished()
    if resume is None and not overwrite:
        raise LmmtuneError(
            f"{out} already holds a two-stage run. Continue it with train.resume=auto, "
            "choose another output_dir=..., or pass overwrite=true to replace it"
        )
    if finished and not overwrite:
        raise LmmtuneError(
            f"{out} holds a finished two-stage run (stage 2's metrics.json is written): "
            "train.resume would train on and replace it. Choose a new output_dir=..., or "
            "pass overwrite=true to replace the run"
        )
    return finished


def clear_two_stage(out: Path, inputs: list[tuple[str, str]]) -> None:
    """overwrite=true: delete both stages' files (each by its manifest) and OUT's own, and
    nothing else; everything is checked first, so that a refusal deletes nothing."""
    folders = [OwnedFolder(stage.root, RUN_KIND) for stage in stage_dirs(out)]
    folders = [f for f in folders if (f.path / MANIFEST).exists()]
    own = OwnedFolder(out, TWO_STAGE_KIND)
    for folder in [*folders, own]:
        refuse_deleting_inputs(folder.path, folder.planned_deletions(), inputs)
    log.warning("overwrite=true: replacing the two-stage run in %s (only what lmmtune wrote)", out)
    for folder in [*folders, own]:
        folder.clear(inputs)
