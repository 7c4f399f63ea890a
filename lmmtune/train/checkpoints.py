"""Checkpoints that are never half-written, and finding the one to resume from.

The Trainer writes a checkpoint into a staging folder; only when every file is
there is it renamed to `checkpoints/checkpoint-N` (a rename within one folder is
atomic). A crash mid-save leaves only the staging folder, which resume ignores.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)

STAGING = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def completed_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (by step)."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for path in checkpoint_root.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(checkpoint_root: Path, resume: str | None) -> Path | None:
    """`auto`: the latest finished checkpoint, if any; a path: that checkpoint; null: none."""
    if resume is None:
        return None
    if resume == "auto":
        checkpoints = completed_checkpoints(checkpoint_root)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise LmmtuneError(
            f"train.resume={resume}: not a finished checkpoint (no trainer_state.json)"
        )
    return path


def keep_last(checkpoint_root: Path, limit: int | None) -> None:
    """Delete all but the newest `limit` finished checkpoints; a limit under 1 deletes nothing
    (never the checkpoint just saved: `[:-(-1)]` would take the oldest, `[:-0]` all)."""
    if limit is None or limit < 1:
        return
    for old in completed_checkpoints(checkpoint_root)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


class AtomicCheckpointMixin:
    """Trainer mixin: save each checkpoint into a staging folder, then rename it into place."""

    _staging_root: Path | None = None

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        final_root = Path(self.args.output_dir)
        staging_root = final_root / STAGING
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            target = final_root / name
            if target.exists():
                shutil.rmtree(target)
            (staging_root / name).rename(target)
            shutil.rmtree(staging_root, ignore_errors=True)
            keep_last(final_root, self.args.save_total_limit)
            log.info("checkpoint saved: %s", target)
        self.accelerator.wait_for_everyone()
