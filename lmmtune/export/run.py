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

from omegaconf import DictConfig, OmegaConf

from lmmtune.atomic import STAGING_MARKER, remove_stale_staging, staged_directory
from lmmtune.errors import LmmtuneError
from lmmtune.export.chat_template import export_processor
from lmmtune.export.merge import (
    PARITY_TOLERANCE,
    Parity,
    compare_logits,
    load_exported,
    merge_and_save,
    parity_batch,
    token_logits,
)
from lmmtune.owned import OwnedFolder, adopt, files_under, foreign_files, read_manifest
from lmmtune.redact import redact_value
from lmmtune.rundir import RunDir
from lmmtune.runs import (
    command_tags,
    eval_samples,
    find_adapter,
    find_run_dir,
    load_run_processor,
    run_settings,
    source_run_id,
)
from lmmtune.track.mlflow_tracker import tracked_run
from lmmtune.track.tracker import start_tracker

log = logging.getLogger(__name__)

FORMATS = ("merged", "adapter")
REPORT = "export_report.json"
EXPORT_KIND = "export"


def run_export(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Export the run's adapter as configured in `cfg.export`; return the export report."""
    export_cfg = cfg.export
    check_options(export_cfg, cfg.tracking.backend)
    run_dir = find_run_dir(cfg, export_cfg.adapter)
    adapter = find_adapter(export_cfg.adapter, run_dir, cfg)
    settings = run_settings(cfg, run_dir, adapter, overrides)
    base_dir = run_dir or adapter.parent
    target = Path(export_cfg.dir) if export_cfg.dir else RunDir(base_dir).export(export_cfg.format)
    check_target(target, export_cfg.overwrite, protected=[base_dir, adapter])
    processor = export_processor(load_run_processor(adapter, settings.model))

    record_folder = tracking_record_folder(target)
    tracker = start_tracker(
        cfg.tracking,
        settings.name,
        f"{base_dir.name}-export",
        record_folder,
        "the export",
        only_if_needed=True,  # no tracking files in or beside a model folder MLflow has whole
        required_for="export.register_name needs MLflow" if export_cfg.register_name else None,
    )
    with tracked_run(tracker):
        tags = command_tags("export", settings, run_dir, adapter, export_format=export_cfg.format)
        tracker.set_tags(tags)
        tracker.log_params({f"export.{k}": v for k, v in export_cfg.items()})
        report = {
            "format": export_cfg.format,
            "base_model": settings.model.path,
            "adapter": portable_path(adapter, target),
            "source_run_id": source_run_id(run_dir),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        end_killed_exports(remove_stale_staging(target), cfg.tracking)
        adopt(target)  # a run's own export: the run's overwrite=true clears it
        with staged_directory(
            target, export_cfg.overwrite, marked=True, note=tracker.run_id or ""
        ) as tmp:
            if export_cfg.format == "adapter":
                shutil.copytree(adapter, tmp, dirs_exist_ok=True)
                processor.save_pretrained(tmp)  # adds the chat template and padding processor
            else:
                report.update(export_merged(settings, run_dir, adapter, tmp, processor, export_cfg))
                parity = report["parity"]
                tracker.log_metrics({f"parity/{k}": float(v) for k, v in parity.items()})
                if not parity["passed"]:
                    raise LmmtuneError(parity_failure(parity))
            (tmp / REPORT).write_text(json.dumps(report, indent=2))
            mark_export(tmp)
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


def check_options(export_cfg, tracking_backend: str) -> None:
    """Refuse bad settings before any model is loaded."""
    if export_cfg.format not in FORMATS:  # gguf: lmmtune.export.gguf.run_gguf_export
        raise LmmtuneError(f"export.format must be merged or adapter, not '{export_cfg.format}'")
    if export_cfg.dtype is not None and export_cfg.dtype not in PARITY_TOLERANCE:
        raise LmmtuneError(
            f"export.dtype must be one of {', '.join(PARITY_TOLERANCE)}, not '{export_cfg.dtype}'"
        )
    if export_cfg.register_name and export_cfg.format != "merged":
        raise LmmtuneError("export.register_name needs export.format=merged (a loadable model)")
    if export_cfg.register_name and (tracking_backend == "none" or not export_cfg.log_model):
        raise LmmtuneError("export.register_name needs tracking on and export.log_model=true")


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

            from lmmtune.track.mlflow_tracker import resolve_tracking_uri

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


def export_merged(
    settings: DictConfig, run_dir: Path | None, adapter: Path, tmp: Path, processor, export_cfg
) -> dict:
    """Merge into an unquantized base, save to `tmp`, reload it with transformers, check parity."""
    dtype = export_cfg.dtype or settings.model.dtype
    model_cfg = OmegaConf.merge(settings.model, {"dtype": dtype})
    samples = parity_samples(settings, run_dir, processor, export_cfg.parity_samples)
    batch = parity_batch(processor, samples, settings.data.max_image_pixels) if samples else None
    reference = merge_and_save(model_cfg, adapter, tmp, processor, batch)
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


def parity_samples(settings: DictConfig, run_dir: Path | None, processor, count: int) -> list:
    """The first `count` eval samples of the run (real images and answers)."""
    if count <= 0:
        return []
    try:
        return eval_samples(settings, run_dir, processor, None)[:count]
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
