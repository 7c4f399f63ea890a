"""What `eval`, `export` and `predict` need from a finished training run.

A run directory holds the resolved config it trained with (`config.yaml`) and the
adapter (`adapter/`). These commands take the run's model, quantization, LoRA and data
settings from there (and its eval generation settings), so `python -m lmmtune eval
output_dir=RUN` needs no recipe; `model.*`, `quant.*`, `peft.*`, `data.*` and `eval.*`
given on the command line still win.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError
from lmmtune.rundir import RunDir, base_model_file
from lmmtune.weights import require_safetensors

log = logging.getLogger(__name__)

RUN_SECTIONS = ("model", "quant", "peft", "data", "eval")
"""Sections read from the run's config.yaml; the rest (tracking, export, predict) from the command."""
ADAPTER_CONFIG = "adapter_config.json"
"""Written by training next to the adapter: the resolved base model path."""


def command_line_overrides() -> list[str]:
    """The `key=value` overrides of the running Hydra command ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def find_run_dir(cfg: DictConfig, adapter: str | None) -> Path | None:
    """The training run to read settings from: OUTPUT_DIR, else the adapter's run (its parents)."""
    candidates = [Path(cfg.output_dir)]
    if adapter is not None:
        candidates += list(Path(adapter).resolve().parents)[:2]
    return next((c for c in candidates if RunDir(c).config.is_file()), None)


def run_settings(
    cfg: DictConfig,
    run_dir: Path | None,
    adapter: Path | None = None,
    overrides: list[str] | None = None,
) -> DictConfig:
    """`cfg` with the run's model/quant/peft/data/eval sections and name; command-line overrides win.

    The base is the one the adapter was trained on (`adapter/lmmtune_base.json`) while
    that directory exists: `model.path=tiny` or a hub cache may resolve elsewhere later.
    """
    overrides = command_line_overrides() if overrides is None else overrides
    keys = [item.split("=", 1)[0].lstrip("+~") for item in overrides if "=" in item]
    settings = OmegaConf.merge(
        OmegaConf.structured(_schema()), OmegaConf.to_container(cfg, resolve=True)
    )
    if run_dir is not None:
        _apply_run_config(settings, cfg, RunDir(run_dir).config, keys)
    trained_on = trained_base(adapter) if adapter is not None else None
    if trained_on and not {"model", "model.path"} & set(keys):
        settings.model.path = trained_on
    return settings


def _apply_run_config(settings: DictConfig, cfg: DictConfig, saved_file: Path, keys: list[str]):
    """The saved run sections over `settings`, then the command line's keys over those."""
    from lmmtune.config import load_yaml_config

    saved = load_yaml_config(saved_file, "the run's config")
    try:
        for section in RUN_SECTIONS:
            if section in saved and section not in keys:  # `quant=none` replaces the section
                settings[section] = OmegaConf.merge(settings[section], saved[section])
        for key in keys:
            if key.split(".", 1)[0] in RUN_SECTIONS and "." in key:
                OmegaConf.update(settings, key, OmegaConf.select(cfg, key), merge=False)
    except Exception as exc:  # omegaconf raises several types for a key or type mismatch
        raise LmmtuneError(f"{saved_file} does not fit this lmmtune: {exc}") from None
    settings.name = saved.get("name", settings.name)


def trained_base(adapter: Path) -> str | None:
    """The resolved base directory the adapter was trained on, if it is still there."""
    import json

    record = base_model_file(adapter)
    try:
        path = json.loads(record.read_text())["base_model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if Path(path).is_dir() else None


def _schema():
    from lmmtune.config import Config

    return Config


def find_adapter(adapter: str | None, run_dir: Path | None, cfg: DictConfig) -> Path:
    """The adapter directory (`adapter` or RUN/adapter); a clear error if it holds no adapter."""
    path = Path(adapter) if adapter else RunDir(run_dir or cfg.output_dir).adapter
    if not (path / ADAPTER_CONFIG).is_file():
        raise LmmtuneError(
            f"no adapter in {path} ({ADAPTER_CONFIG} missing): pass output_dir=RUN of a finished "
            "training run, or the adapter directory itself (eval.adapter=, export.adapter=, "
            "predict.adapter=)"
        )
    require_safetensors(path, "adapter")
    return path


def source_run_id(run_dir: Path | None) -> str | None:
    """The training run's MLflow run id (RUN/tracking.json), to link eval and export runs to it."""
    import json

    state = RunDir(run_dir).tracking if run_dir else None
    if state is None or not state.is_file():
        return None
    try:
        return json.loads(state.read_text()).get("run_id")
    except (ValueError, AttributeError):
        return None


def command_tags(
    command: str, settings: DictConfig, run_dir: Path | None, adapter: Path, **extra: str
) -> dict:
    """MLflow tags of an eval/export run: what it ran on, linked to the training run if known."""
    tags = {
        "command": command,
        **extra,
        "recipe": settings.name,
        "base_model": settings.model.path,
        "adapter": str(adapter.resolve()),
    }
    run_id = source_run_id(run_dir)
    if run_id:
        tags["source_run_id"] = run_id
    return tags


def load_run_processor(adapter_dir: Path, model_cfg):
    """The processor saved with the adapter (what training used), else the base model's."""

    from lmmtune.model.load import load_processor

    if (adapter_dir / "processor_config.json").is_file():
        return load_processor(model_cfg, source=adapter_dir)
    return load_processor(model_cfg)


def load_adapted_model(model_cfg, quant_cfg, adapter_dir: Path):
    """The base (quantized as configured) with the adapter and trained projector attached by peft."""
    from peft import PeftModel

    from lmmtune.model.load import disable_bnb_cpu_repack, load_model

    base = load_model(model_cfg, quant_cfg)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    disable_bnb_cpu_repack(model)
    model.eval()
    return model


def eval_samples(
    settings: DictConfig, run_dir: Path | None, processor, data: str | None
) -> list[Sample]:
    """`data` (a file, all its records), else the run's own eval split, as training had it."""
    from lmmtune.data.problems import DataError

    if data is not None:
        samples, problems = _read_file(data, settings.data, processor)
    else:
        samples, problems = _run_split(settings.data, run_dir, processor)
    if problems and settings.data.on_error == "fail":
        raise DataError(problems, header="invalid eval records (data.on_error=fail)")
    if problems:
        log.warning("skipped %d invalid eval record(s)", len(problems))
    if not samples:
        raise LmmtuneError("no eval samples: pass eval.data=PATH or a run with an eval split")
    return samples


def _read_file(path: str, data_cfg, processor) -> tuple[list[Sample], list]:
    """Every valid record of the file at `path`, checked as training checks its data."""
    file_cfg = OmegaConf.merge(data_cfg, {"train": path, "eval": None, "eval_fraction": 0.0})
    report = _inspect(file_cfg, processor)
    return report.train, report.problems


def _run_split(data_cfg, run_dir: Path | None, processor) -> tuple[list[Sample], list]:
    """The same eval records training evaluated on (same files, checks, split and cap)."""
    from lmmtune.data.splits import DEMO, capped_eval

    if data_cfg.train == DEMO:  # data.eval, when given, replaces the demo's own eval split
        demo = (run_dir or Path(".")) / "demo_data"
        if not (demo / "eval.json").is_file():
            raise LmmtuneError(f"no demo data in {demo}: pass output_dir=RUN of a demo run")
        data_cfg = OmegaConf.merge(
            data_cfg,
            {
                "train": str(demo / "train.json"),
                "eval": data_cfg.eval or str(demo / "eval.json"),
                "image_root": None,
            },
        )
    report = _inspect(data_cfg, processor)
    return capped_eval(report, data_cfg), report.problems


def _inspect(data_cfg, processor):
    """`inspect_data` with a throwaway work directory (nothing of a run is written)."""
    from lmmtune.data.splits import inspect_data

    with tempfile.TemporaryDirectory(prefix="lmmtune-eval-") as work_dir:
        return inspect_data(data_cfg, processor, Path(work_dir))
