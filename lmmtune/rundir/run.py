"""The run folder: `RunDir` and every path in it, created once, locked, never overwritten by accident, resumable from its checkpoints.

The run directory: created once, never overwritten by accident, resumable.

`RunDir` names every path of a run. `RUN/.lmmtune.json` (the manifest, see
`lmmtune.rundir.folders`) marks a directory that holds a run and lists the files lmmtune wrote.
Starting again in it needs `overwrite=true` (which deletes those files and nothing
else) or `train.resume=auto|PATH` (which continues from the latest finished checkpoint).

Checkpoints that are never half-written, and finding the one to resume from.

The Trainer writes a checkpoint into a staging folder; only when every file is
there is it renamed to `checkpoints/checkpoint-N` (a rename within one folder is
atomic). A crash mid-save leaves only the staging folder, which resume ignores.

What a training stage runs inside, as context managers its `setup()` enters: the process
group, the removal of a failed start, and the locked run folder.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from lmmtune import distributed
from lmmtune.errors import LmmtuneError
from lmmtune.redact import redact
from lmmtune.rundir.files import write_text_atomic
from lmmtune.rundir.folders import (
    LOCK,
    MANIFEST,
    RUN_KIND,
    OwnedFolder,
    files_under,
    read_manifest,
    refuse_links,
)

log = logging.getLogger(__name__)


BASE_RECORD = "lmmtune_base.json"
"""In an adapter folder: the resolved base directory it was trained on (`{"base_model": ...}`)."""


PROJECTOR_DIR = "projector"
"""In a stage-1 run (`stage=align`): the aligned projector, what `model.projector=RUN` loads."""
PROJECTOR_FILE = "projector.safetensors"
"""The projector's weights in PROJECTOR_DIR: llava-hf keys `multi_modal_projector.linear_1.weight`,
`.linear_1.bias`, `.linear_2.weight`, `.linear_2.bias`, in fp32."""
PROJECTOR_CARD = "README.md"
"""The projector's card in PROJECTOR_DIR: base model, caption data, steps, loss, how to use it."""


def base_model_file(adapter_dir: Path | str) -> Path:
    """The base record of an adapter folder, inside a run or copied anywhere."""
    return Path(adapter_dir) / BASE_RECORD


class RunDir:
    """Every path of a run directory, in one place: what lmmtune writes and reads there."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.json")
    tracking = property(lambda self: self.root / "tracking.json")  # the MLflow run, its experiment
    tracking_record = property(lambda self: self.root / "tracking_record.jsonl")
    tracking_import = property(lambda self: self.root / "tracking_import.json")  # `import` state
    adapter = property(lambda self: self.root / "adapter")
    projector_dir = property(lambda self: self.root / PROJECTOR_DIR)  # stage 1's result
    projector_file = property(lambda self: self.projector_dir / PROJECTOR_FILE)
    base_model_file = property(lambda self: base_model_file(self.adapter))
    checkpoints = property(lambda self: self.root / "checkpoints")
    best = property(lambda self: self.root / "best")  # train.keep_best
    eval = property(lambda self: self.root / "eval")  # the eval command's results
    eval_before = property(lambda self: self.root / "eval_before.json")
    eval_predictions = property(lambda self: self.root / "eval_predictions.jsonl")
    data_report = property(lambda self: self.root / "data_report.txt")
    skipped_records = property(lambda self: self.root / "skipped_records.jsonl")
    data_digest = property(lambda self: self.root / "data_digest.json")  # see lmmtune.rundir.resume
    lock = property(lambda self: self.root / LOCK)  # held while a train runs in it

    def export(self, export_format: str) -> Path:
        return self.root / f"export-{export_format}"

    def holds_run(self) -> bool:
        """An lmmtune run: its manifest says so (a folder without one is not lmmtune's)."""
        return (read_manifest(self.root) or {}).get("kind") == RUN_KIND

    def finished(self) -> bool:
        """The run got to its end: metrics.json is written last."""
        return self.metrics.is_file()


_opened: dict[Path, OwnedFolder] = {}  # run directories this process writes into
_locks: dict[Path, int] = {}  # their lock files, open (and locked) while this process runs


def take_lock(run: RunDir) -> None:
    """Lock the run directory for this process; a second train on it is refused, naming the first.

    An advisory `flock` (POSIX): the kernel drops it when the process ends, even on kill -9.
    """
    import fcntl

    key = run.root.resolve() if run.root.exists() else run.root.absolute()
    if key in _locks:
        return
    run.root.mkdir(parents=True, exist_ok=True)
    try:  # O_NOFOLLOW: a lock file that is a link is refused, never truncated through
        fd = os.open(run.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise LmmtuneError(f"{run.lock} cannot be used as the run's lock: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LmmtuneError(
            f"{run.root} is in use by another lmmtune train (process {holder}); wait for it to "
            "end, or stop it first. Two trainings never write into one run directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _locks[run.root.resolve()] = fd


def release_lock(run_dir: Path) -> None:
    """Give the run directory free for the next train (the end of the process does it too)."""
    fd = _locks.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def check_tracking_state(run: RunDir) -> None:
    """A resume reads the MLflow run id from tracking.json: refuse an unreadable one up front."""
    if not run.tracking.exists():
        return
    try:
        json.loads(run.tracking.read_text())["run_id"]
    except (ValueError, KeyError, TypeError):
        raise LmmtuneError(
            f"{run.tracking} is damaged (it holds the MLflow run id to continue). Delete it to "
            "continue the training in a new MLflow run"
        ) from None


def prepare_run_dir(
    run_dir: Path, overwrite: bool, resume: str | None, inputs: Iterable[tuple[str, str]] = ()
) -> Path | None:
    """Create or reopen the run directory; return the checkpoint to resume from, if any.

    Refused: what `check_run_dir` refuses, and an existing run without overwrite or resume.
    overwrite=true clears only the files this run directory's manifest lists, and refuses
    to delete any of `inputs` (setting -> path: what the command reads).
    """
    run = RunDir(run_dir)
    holds_run = check_run_dir(run, overwrite, resume)
    take_lock(run)
    checkpoint = None
    if resume is not None and not (holds_run and run.finished()):
        checkpoint = resume_checkpoint(run, resume)
    elif holds_run and not overwrite:
        raise LmmtuneError(
            f"{run_dir} already holds a run. Continue it with train.resume=auto, "
            "choose another output_dir=..., or pass overwrite=true to replace it"
        )
    elif holds_run:
        clear_run(run, inputs)
    open_run_dir(run_dir)
    return checkpoint


def check_run_dir(run: RunDir, overwrite: bool, resume: str | None) -> bool:
    """Whether the folder holds a run. Refused: a file, a folder that is not empty and not
    an lmmtune run (whatever overwrite says), resuming a finished run without overwrite,
    a run that holds a link."""
    if run.root.exists() and not run.root.is_dir():
        raise LmmtuneError(f"output_dir={run.root} is a file; choose a folder")
    holds_run = run.holds_run()
    if run.root.is_dir() and files_under(run.root) and not holds_run:
        raise LmmtuneError(
            f"output_dir={run.root} holds files and is not an lmmtune run (no {MANIFEST}): "
            "lmmtune never writes into or clears such a folder. Choose an empty or new "
            "output_dir"
        )
    if resume is not None and holds_run and run.finished() and not overwrite:
        raise LmmtuneError(
            f"{run.root} holds a finished run (metrics.json is written): train.resume={resume} "
            "would train on and replace its adapter. Choose a new output_dir=..., or pass "
            "overwrite=true to replace the run"
        )
    if holds_run:
        refuse_links(run.root, "output_dir")
    return holds_run


def resume_checkpoint(run: RunDir, resume: str) -> Path | None:
    """The latest finished checkpoint of the run to continue from (None: start over)."""
    check_tracking_state(run)
    checkpoint = find_resume_checkpoint(run.checkpoints, resume)
    if checkpoint is None:
        log.info(
            "train.resume=%s: no finished checkpoint in %s, starting from the beginning",
            resume,
            run.root,
        )
    else:
        log.info("resuming from %s", checkpoint)
    return checkpoint


def clear_run(run: RunDir, inputs: Iterable[tuple[str, str]] = ()) -> None:
    """overwrite=true: delete what lmmtune wrote into the run (its manifest), nothing else,
    and nothing of `inputs`, what the command reads."""
    folder = OwnedFolder(run.root, RUN_KIND)
    folder.planned_deletions()  # refused (a link, a bad manifest) before the warning
    log.warning("overwrite=true: replacing the run in %s (only the files lmmtune wrote)", run.root)
    folder.clear(inputs)


def open_run_dir(run_dir: Path) -> OwnedFolder:
    """Create the run directory with its manifest; files written from now on are recorded."""
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = OwnedFolder(run_dir, RUN_KIND)
    if read_manifest(run_dir) is None:
        folder.write_manifest(set())
    _opened[run_dir.resolve()] = folder
    return folder


def record_run_files(run_dir: Path) -> None:
    """Add the files this process wrote into `run_dir` to its manifest (what overwrite clears)."""
    folder = _opened.get(Path(run_dir).resolve())
    if folder is not None:
        folder.record()


def job_output_dir(output_dir: str) -> str:
    """The run directory of this process.

    In a Hydra multirun every job gets its own, Hydra's job directory SWEEP_DIR/JOB_NUM
    (output_dir itself is the sweep's and the same for every job); a folder inside it (a
    stage of a two-stage job) is kept. Under torchrun every rank takes rank 0's: the
    default's timestamp can differ by a second between ranks.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job_dir = HydraConfig.get().runtime.output_dir
        inside = Path(job_dir).absolute() in Path(output_dir).absolute().parents
        return output_dir if inside else job_dir
    return distributed.agree_on_output_dir(output_dir)


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config with secrets masked."""
    path = RunDir(run_dir).config
    clean = OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True)))
    write_text_atomic(path, OmegaConf.to_yaml(clean))
    return path


class RecordRunFiles(TrainerCallback):
    """After each checkpoint, add its files to the run's manifest."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            record_run_files(self.run_dir)


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
        "model.projector": cfg.model.projector,
        "train.resume": resume,
    }
    return [
        (key, path)
        for key, value in settings.items()
        if value
        for path in (glob.glob(value, recursive=True) if glob.has_magic(value) else [value])
    ]
