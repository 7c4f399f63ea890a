"""The checks around a training run: before its first step, everything that could otherwise
fail after it; after it, a failing step turned into one line that keeps the weights.

A training run either refuses at start or finishes: hours of GPU time must not end in an
error that was knowable before the first step. Checked here, cheapest first:

- the exported chat template reproduces training's token ids (`export_processor`, which
  the run's `adapter/` and every export ship);
- an aligned projector (`model.projector`): its file, keys, shapes and values;
- the export settings the config names (`export.format`, `export.dtype`,
  `export.register_name`, and an `export.dir` that exists and is no export, or that
  cannot be written: a real folder is made and removed there, as root ignores modes);
- every eval prompt tokenizes, and every eval image opens where the data check did not
  decode them (`data.verify_images=false`);
- the processor and the adapter can be written: a dry run of `save_pretrained` into a
  scratch folder of the run, reloaded and checked again;
- roughly enough disk for the checkpoints: the measured adapter size and the optimizer
  state, times the checkpoints kept (`train.save_total_limit`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from lmmtune.data.batches import ImageLoader, TokenizedConversation
from lmmtune.errors import LmmtuneError, RunInterrupted
from lmmtune.export.processor import check_prompt_ids, export_processor
from lmmtune.model import read_aligned_projector
from lmmtune.model_projector import AlignedProjector
from lmmtune.rundir.folders import EXPORT_KIND, read_manifest
from lmmtune.rundir.run import RunDir, completed_checkpoints

log = logging.getLogger(__name__)

SCRATCH = ".preflight"
"""The run's scratch folder of the dry-run save (removed again)."""
GIB = 2**30


def check_exported_processor(processor):
    """The processor every export and the run's adapter/ ship, its ids checked (raises)."""
    try:
        return export_processor(processor)
    except LmmtuneError as exc:
        raise LmmtuneError(f"refused before training: {exc}") from None


def check_aligned_projector(cfg) -> AlignedProjector | None:
    """model.projector read and checked against the model's config before the run folder is
    touched (None: not set); the sha256 it has goes into the config the run saves."""
    try:
        aligned = read_aligned_projector(cfg.model)
    except LmmtuneError as exc:
        raise LmmtuneError(f"refused before training: {exc}") from None
    if aligned is not None:
        cfg.model.projector_sha256 = aligned.sha256
    return aligned


def check_export_settings(export_cfg, tracking_backend: str, run_dir: Path) -> None:
    """The export the config names can run after training: its folder (its options were
    checked when the config was composed)."""
    target = Path(export_cfg.dir) if export_cfg.dir else RunDir(run_dir).export(export_cfg.format)
    if target.exists():
        manifest = read_manifest(target) if target.is_dir() else None
        if manifest is None or manifest.get("kind") != EXPORT_KIND:
            raise LmmtuneError(
                f"refused before training: export.dir={target} exists and is not an lmmtune "
                "export, so the export after training would refuse it. Choose a new export.dir"
            )
    problem = unwritable(target)
    if problem:
        raise LmmtuneError(
            f"refused before training: export.dir={target} cannot be written ({problem}), so "
            "the export after training would fail. Choose a writable export.dir"
        )


def unwritable(target: Path) -> str | None:
    """Why a folder cannot be made at `target` (a real try in its nearest existing folder), or None."""
    existing = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        tempfile.TemporaryDirectory(prefix=".lmmtune-probe-", dir=existing).cleanup()
    except OSError as exc:
        return f"{existing}: {exc.strerror or exc}"
    return None


def check_eval_prompts(samples, processor, data_cfg, evaluates: bool) -> None:
    """Every eval sample's prompt tokenizes and, where the data check skipped decoding, its
    image opens: the evaluation after training reads them."""
    if not evaluates or not samples:
        return
    tokenize = TokenizedConversation(processor, max_length=10**9)
    load_image = (
        None if data_cfg.verify_images else ImageLoader(processor, data_cfg.max_image_pixels)
    )
    for sample in samples:
        try:
            tokenize.prompt_ids(sample)
            if load_image is not None and sample.image is not None:
                load_image(sample)
        except Exception as exc:  # noqa: BLE001 - any failure here would end a trained run
            raise LmmtuneError(
                f"refused before training: the eval sample {sample.source} (id {sample.id}) "
                f"cannot be evaluated after training: {exc}"
            ) from None


def dry_run_save(model, exported, processor, run_dir: Path) -> int:
    """Save the adapter and the processor into a scratch folder of the run, reload the
    processor and check its ids again; the adapter's size in bytes (the folder is removed)."""
    from transformers import AutoProcessor

    scratch = Path(run_dir) / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        model.save_pretrained(scratch)
        adapter_bytes = folder_bytes(scratch)
        exported.save_pretrained(scratch)
        check_prompt_ids(AutoProcessor.from_pretrained(scratch), processor)
    except LmmtuneError as exc:
        raise LmmtuneError(f"refused before training: the saved processor: {exc}") from None
    except OSError as exc:
        raise LmmtuneError(
            f"refused before training: the adapter and processor cannot be saved in {run_dir} "
            f"({exc}); the run could not keep its result"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return adapter_bytes


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def checkpoint_space(
    adapter_bytes: int, trainable_params: int, train_cfg, total_steps: int
) -> tuple[int, int]:
    """(bytes needed, checkpoints alive at once): each checkpoint holds the adapter and the
    optimizer state (8-bit optimizers 2 bytes per trainable weight, others 8); one more is
    staged before the oldest is deleted; then the final adapter, and RUN/best/."""
    state_bytes = trainable_params * (2 if "8bit" in str(train_cfg.optim) else 8)
    saves = max(1, math.ceil(total_steps / train_cfg.save_steps))
    limit = train_cfg.save_total_limit
    alive = saves if limit is None else min(saves, limit + 1)
    needed = alive * (adapter_bytes + state_bytes) + adapter_bytes
    if train_cfg.keep_best:
        needed += trainable_params * 4
    return needed, alive


def check_disk_space(needed: int, alive: int, run_dir: Path, free: int | None = None) -> None:
    """Refuse a run whose checkpoints will not fit (the bytes already in checkpoints/ count)."""
    run = RunDir(run_dir)
    held = folder_bytes(run.checkpoints) if run.checkpoints.is_dir() else 0
    free = shutil.disk_usage(run_dir).free if free is None else free
    if needed - held > free:
        raise LmmtuneError(
            f"refused before training: about {needed / GIB:.1f} GiB of disk are needed in "
            f"{run_dir} ({alive} checkpoint(s) at once and the adapter), {free / GIB:.1f} GiB "
            "are free. Free space, lower train.save_total_limit, or choose another output_dir"
        )


def total_steps(train_cfg, samples: int, world_size: int) -> int:
    """Optimizer steps the run will take (what the Trainer computes from the same numbers)."""
    if train_cfg.max_steps > 0:
        return train_cfg.max_steps
    per_epoch = math.ceil(samples / (train_cfg.batch_size * world_size))
    return max(1, math.ceil(per_epoch / train_cfg.grad_accum * train_cfg.epochs))


def check_space_for_checkpoints(model, adapter_bytes: int, train_cfg, samples: int, run_dir):
    """The disk check with the model's trainable weights and the run's step count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world = int(os.environ.get("WORLD_SIZE", 1))
    needed, alive = checkpoint_space(
        adapter_bytes, trainable, train_cfg, total_steps(train_cfg, samples, world)
    )
    log.info(
        "pre-flight: adapter %.1f MiB; checkpoints need about %.2f GiB",
        adapter_bytes / 2**20,
        needed / GIB,
    )
    check_disk_space(needed, alive, run_dir)


def check_saving(model, exported, processor, train_cfg, samples: int, run_dir: Path) -> None:
    """Rank 0, before the first step: the dry-run save, then the disk space for checkpoints."""
    adapter_bytes = dry_run_save(model, exported, processor, run_dir)
    check_space_for_checkpoints(model, adapter_bytes, train_cfg, samples, run_dir)


@contextlib.contextmanager
def after_training(step: str, run: RunDir, redo: str | None = None):
    """Turn a failure of a step after training into one line: what failed, where the trained
    weights are kept, and the command that redoes it (by default: resume from the last
    checkpoint, which trains no step again and does everything after training)."""
    try:
        yield
    except RunInterrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever it is, the run keeps its weights
        redo = redo or (
            f"the same command plus: output_dir={run.root} train.resume=auto (it continues "
            "from the last checkpoint: no training step is repeated)"
        )
        reason = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise LmmtuneError(
            f"training finished, but {step} failed: {reason}. The trained weights are kept in "
            f"{kept_weights(run)}; nothing of the run was deleted. Redo it with {redo}"
        ) from exc


def kept_weights(run: RunDir) -> Path:
    """Where the trained weights are: the adapter folder once saved, else the last checkpoint."""
    if any(run.adapter.glob("adapter_model.*")):
        return run.adapter
    checkpoints = completed_checkpoints(run.checkpoints)
    return checkpoints[-1] if checkpoints else run.checkpoints
