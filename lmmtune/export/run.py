"""`python -m lmmtune export output_dir=RUN`: ship the adapted model.

- `export.format=merged` (default): the adapter and the trained projector merged into
  the base, reloaded unquantized in `export.dtype`, saved in the llava-hf layout
  (safetensors, config, processor with the Vicuna v1 chat template); plain
  transformers loads it. Parity of the reloaded export against the adapter on the same
  unquantized base is checked; the export fails if it does not hold.
- `export.format=adapter`: the peft adapter (projector inside) and the processor alone.

Everything is written to a temporary directory next to the target and renamed into
place only when complete; an existing target is replaced only with `export.overwrite=true`.
The export is logged to its own MLflow run (the merged model as a pyfunc model,
registered as `export.register_name` when set).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from lmmtune.errors import LmmtuneError
from lmmtune.export.merge import (
    PARITY_TOLERANCE,
    Parity,
    compare_logits,
    load_exported,
    merge_and_save,
    parity_batch,
    token_logits,
)
from lmmtune.export.processor import export_processor
from lmmtune.finished_run import FinishedRun, eval_samples, load_finished_run, source_run_id
from lmmtune.redact import redact_value
from lmmtune.rundir.files import STAGING_MARKER, remove_stale_staging, staged_directory
from lmmtune.rundir.folders import (
    EXPORT_KIND,
    OwnedFolder,
    adopt,
    files_under,
    foreign_files,
    read_manifest,
)
from lmmtune.rundir.run import RunDir
from lmmtune.tracking.mlflow_run import tracked_run
from lmmtune.tracking.tracker import start_tracker

log = logging.getLogger(__name__)

REPORT = "export_report.json"


def run_export(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Export the run's adapter as configured in `cfg.export`; return the export report.

    The settings were checked when the config was composed (`lmmtune.validate`)."""
    export_cfg = cfg.export
    run = load_finished_run(cfg, adapter=export_cfg.adapter, overrides=overrides)
    target = (
        Path(export_cfg.dir) if export_cfg.dir else RunDir(run.folder).export(export_cfg.format)
    )
    check_target(target, export_cfg.overwrite, protected=[run.folder, run.adapter])
    processor = export_processor(run.processor)

    record_folder = tracking_record_folder(target)
    tracker = start_tracker(
        cfg.tracking,
        run.settings.name,
        f"{run.folder.name}-export",
        record_folder,
        "the export",
        only_if_needed=True,  # no tracking files in or beside a model folder MLflow has whole
        required_for="export.register_name needs MLflow" if export_cfg.register_name else None,
    )
    with tracked_run(tracker):
        tracker.set_tags(run.command_tags("export", export_format=export_cfg.format))
        tracker.log_params({f"export.{k}": v for k, v in export_cfg.items()})
        end_killed_exports(remove_stale_staging(target), cfg.tracking)
        adopt(target)  # a run's own export: the run's overwrite=true clears it
        report = write_export(run, target, processor, export_cfg, tracker)
        log.info("export written to %s", target)
        report["mlflow"] = log_export(tracker, target, export_cfg)
        if report["mlflow"]:
            (target / REPORT).write_text(json.dumps(report, indent=2))
    if export_cfg.register_name and not report["mlflow"]:
        raise LmmtuneError(
            f"the export is complete in {target}, but registering it as "
            f"'{export_cfg.register_name}' failed (MLflow stopped answering). When MLflow is "
            f"back, `python -m lmmtune import {record_folder}` logs and registers it"
        )
    return report


def write_export(run: FinishedRun, target: Path, processor, export_cfg, tracker) -> dict:
    """The export, its report and its manifest in a staging folder renamed to `target` when
    complete; the report. A merged export that fails its parity check writes nothing."""
    report = {
        "format": export_cfg.format,
        "base_model": run.settings.model.path,
        "adapter": portable_path(run.adapter, target),
        "source_run_id": source_run_id(run.run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with staged_directory(
        target, export_cfg.overwrite, marked=True, note=tracker.run_id or ""
    ) as tmp:
        if export_cfg.format == "adapter":
            shutil.copytree(run.adapter, tmp, dirs_exist_ok=True)
            processor.save_pretrained(tmp)  # adds the chat template and padding processor
        else:
            report.update(export_merged(run, tmp, processor, export_cfg))
            parity = report["parity"]
            tracker.log_metrics({f"parity/{k}": float(v) for k, v in parity.items()})
            if not parity["passed"]:
                raise LmmtuneError(parity_failure(parity))
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        mark_export(tmp)
    return report


def check_target(target: Path, overwrite: bool, protected: list[Path]) -> None:
    """Refuse an existing export directory unless an earlier export made it and `overwrite`.

    Never the run itself or a parent of it, never a link, never a folder without an export
    manifest (a user's), never one holding files the export did not write.
    """
    if target.is_symlink():
        raise LmmtuneError(
            f"export.dir={target} is a link (to {os.readlink(target)}): lmmtune never replaces "
            "a folder through a link. Choose another export.dir"
        )
    resolved = target.resolve()
    for keep in protected:
        if resolved == keep.resolve() or resolved in keep.resolve().parents:
            raise LmmtuneError(
                f"export.dir={target} would replace {keep}; choose another directory"
            )
    if not target.exists():
        return
    manifest = read_manifest(target) if target.is_dir() else None
    if manifest is None or manifest.get("kind") != EXPORT_KIND:
        raise LmmtuneError(
            f"export.dir={target} exists and was not made by lmmtune export: lmmtune never "
            "replaces it. Choose a new export.dir"
        )
    if not overwrite:
        raise LmmtuneError(
            f"{target} already exists; pass export.overwrite=true to replace it, "
            "or export.dir=OTHER_DIR"
        )
    foreign = foreign_files(target)
    if foreign:
        raise LmmtuneError(
            f"{target} holds files the export did not write ({', '.join(foreign[:5])}); "
            "move them away or choose another export.dir"
        )


def portable_path(path: Path, start: Path) -> str:
    """`path` relative to the export folder (`../adapter`): no home directory in a shared file."""
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows): only the name
        return path.name


def end_killed_exports(stale: list[dict], tracking_cfg) -> None:
    """A killed export left its staging folder (now removed) and its MLflow run RUNNING: end it."""
    for left in stale:
        log.warning("removed %s, left by a killed export", left["path"])
        if left["note"] and tracking_cfg.backend == "mlflow":
            from mlflow.tracking import MlflowClient

            from lmmtune.tracking.mlflow_run import resolve_tracking_uri

            try:
                client = MlflowClient(resolve_tracking_uri(tracking_cfg))
                if client.get_run(left["note"]).info.status == "RUNNING":
                    client.set_terminated(left["note"], "KILLED")
            except Exception as exc:  # noqa: BLE001 - tracking never stops an export
                log.warning(
                    "could not end a killed export's MLflow run: %s", redact_value(str(exc))
                )


def tracking_record_folder(target: Path) -> Path:
    """Where the export keeps its tracking record if MLflow misses a call: beside the export
    (`RUN/export-merged.tracking-20260101-120000`), never inside a model folder people share
    (the record holds this machine's paths), and written even when the export fails."""
    return target.with_name(f"{target.name}.tracking-{time.strftime('%Y%m%d-%H%M%S')}")


def mark_export(folder: Path) -> None:
    """The export manifest: what export.overwrite=true may replace later."""
    OwnedFolder(folder, EXPORT_KIND).write_manifest(files_under(folder) - {STAGING_MARKER})


def export_merged(run: FinishedRun, tmp: Path, processor, export_cfg) -> dict:
    """Merge into an unquantized base, save to `tmp`, reload it with transformers, check parity."""
    dtype = export_cfg.dtype or run.settings.model.dtype
    samples = parity_samples(run, processor, export_cfg.parity_samples)
    max_pixels = run.settings.data.max_image_pixels
    batch = parity_batch(processor, samples, max_pixels) if samples else None
    reference = merge_and_save(run, dtype, tmp, processor, batch)
    report: dict = {"dtype": dtype}
    if batch is None:
        log.warning("export.parity_samples=0: the merge is not checked")
        return report
    tolerance = export_cfg.parity_tolerance
    tolerance = PARITY_TOLERANCE[dtype] if tolerance is None else tolerance
    reloaded = load_exported(tmp, dtype)
    parity: Parity = compare_logits(
        reference, token_logits(reloaded, batch), tolerance, len(samples)
    )
    del reloaded
    log.info(
        "parity: max logit difference %.3g (%.2g of the logit scale %.3g, tolerance %.2g), "
        "argmax agreement %.4f on %d tokens",
        parity.max_abs_diff,
        parity.relative_diff,
        parity.logit_scale,
        parity.tolerance,
        parity.argmax_agreement,
        parity.tokens,
    )
    report["parity"] = parity.as_dict()
    return report


def parity_samples(run: FinishedRun, processor, count: int) -> list:
    """The first `count` eval samples of the run (real images and answers), read with the
    exported processor."""
    if count <= 0:
        return []
    try:
        return eval_samples(run.settings, run.run_dir, processor, None)[:count]
    except LmmtuneError as exc:
        raise LmmtuneError(
            f"no samples for the parity check ({exc}); set export.parity_samples=0 to skip it"
        ) from None


def parity_failure(parity: dict) -> str:
    return (
        f"parity check failed: the merged model's logits differ from the adapter's by "
        f"{parity['max_abs_diff']:.3g} ({parity['relative_diff']:.2g} of the logit scale "
        f"{parity['logit_scale']:.3g}; tolerance {parity['tolerance']:.2g}), argmax agreement "
        f"{parity['argmax_agreement']:.3f}. Nothing was written. A bf16/fp16 merge rounds "
        "LoRA updates smaller than the weights' resolution away (short runs): try "
        "export.dtype=float32."
    )


def log_export(tracker, target: Path, export_cfg) -> dict | None:
    """The report and the model (merged: a pyfunc model, registered if named; adapter: files)."""
    tracker.log_artifact(target / REPORT, "export")
    if export_cfg.format == "adapter":
        tracker.log_artifact(target, "adapter_export")
        return None
    if not export_cfg.log_model:
        return None
    return tracker.log_model(target, export_cfg.register_name)
