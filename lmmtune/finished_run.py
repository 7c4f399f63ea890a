"""A finished training run, loaded one way for `eval`, `export`, `predict` and `chat`.

`load_finished_run` finds the run (or an export of it) and returns a `FinishedRun`: its
settings, its folders, its processor and `load_model()`. A run directory holds the
resolved config it trained with (`config.yaml`) and the adapter (`adapter/`). The
commands take the run's model, quantization, LoRA and data settings from there (and its
eval generation settings), so `python -m lmmtune eval output_dir=RUN` needs no recipe;
`model.*`, `quant.*`, `peft.*`, `data.*` and `eval.*` given on the command line still win."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError
from lmmtune.rundir.files import require_safetensors
from lmmtune.rundir.run import RunDir, base_model_file

log = logging.getLogger(__name__)

RUN_SECTIONS = ("model", "quant", "peft", "data", "eval")
"""Sections read from the run's config.yaml; the rest (tracking, export, predict) from the command."""
ADAPTER_CONFIG = "adapter_config.json"
"""Written by training next to the adapter: the resolved base model path."""


@dataclass(eq=False)
class FinishedRun:
    """A finished training run as `eval`, `export`, `predict` and `chat` use it: its settings,
    where it lies, and its model, loaded only when asked for."""

    settings: DictConfig
    """The command's config with the run's model/quant/peft/data/eval sections and name
    (the command line wins)."""
    run_dir: Path | None
    """The training run folder (config.yaml), when the adapter or export sits in one."""
    adapter: Path | None
    """The adapter folder (RUN/adapter, an adapter export); None for a merged model."""
    merged: Path | None = None
    """A merged model folder (an export, a registry download); None for an adapter."""

    @property
    def base_model(self) -> str:
        """The base model the adapter attaches to (a folder or hub id), or the merged folder."""
        return str(self.merged) if self.merged is not None else self.settings.model.path

    @property
    def folder(self) -> Path:
        """Where the run's own outputs go (RUN/eval, RUN/export-merged): the run folder, else
        the folder holding the adapter."""
        return self.run_dir or (self.adapter or self.merged).parent

    @cached_property
    def processor(self):
        """The processor saved with the model (what training used), else the base model's."""
        from lmmtune.model import load_processor

        if self.merged is not None:
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(self.merged)
        if (self.adapter / "processor_config.json").is_file():
            return load_processor(self.settings.model, source=self.adapter)
        return load_processor(self.settings.model)

    def load_model(self, unquantized_dtype: str | None = None):
        """The model in eval mode: the merged model, or the base (quantized as trained, with the
        aligned projector it started from, if any) with the adapter and trained projector
        attached by peft, so `disable_adapter()` gives the base.
        `unquantized_dtype`: the base unquantized in that dtype instead, as a merge needs it."""
        if self.merged is not None:
            return load_merged_model(self.merged).eval()
        from peft import PeftModel

        from lmmtune.model import disable_bnb_cpu_repack

        base = self.load_base(unquantized_dtype)
        model = PeftModel.from_pretrained(base, str(self.adapter), is_trainable=False)
        disable_bnb_cpu_repack(model)
        return model.eval()

    def load_base(self, unquantized_dtype: str | None = None):
        """The base model the adapter attaches to, quantized as trained (or unquantized in
        `unquantized_dtype`), without the adapter."""
        from lmmtune.config import QuantConfig
        from lmmtune.model import load_model

        model_cfg, quant_cfg = self.settings.model, self.settings.quant
        if unquantized_dtype is not None:
            model_cfg = OmegaConf.merge(model_cfg, {"dtype": unquantized_dtype})
            quant_cfg = QuantConfig(mode="none")
        return load_model(model_cfg, quant_cfg, self.aligned_projector())

    def data_settings(self) -> DictConfig:
        """The run's data section with `data.train=demo` replaced by the demo files it wrote
        (RUN/demo_data, absolute), so that the settings stand without the run folder beside them."""
        return demo_files(self.settings.data, self.run_dir.resolve() if self.run_dir else None)

    def aligned_projector(self):
        """The projector the run's base started from (stage 2 after stage 1): the copy its
        adapter carries, else `model.projector`; None: the base's own."""
        from lmmtune.model import read_aligned_projector
        from lmmtune.model_projector import adapter_copy

        return adapter_copy(self.adapter) or read_aligned_projector(self.settings.model)

    def eval_samples(self, data: str | None = None) -> list[Sample]:
        """`data` (a file, all its records), else the run's own eval split, as training had it."""
        return eval_samples(self.settings, self.run_dir, self.processor, data)

    def command_tags(self, command: str, **extra: str) -> dict:
        """MLflow tags of an eval/export run: what it ran on, linked to the training run if known."""
        tags = {
            "command": command,
            **extra,
            "recipe": self.settings.name,
            "base_model": self.settings.model.path,
            "adapter": str(self.adapter.resolve()),
        }
        run_id = source_run_id(self.run_dir)
        if run_id:
            tags["source_run_id"] = run_id
        return tags


def load_finished_run(
    cfg: DictConfig,
    adapter: str | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
    *,
    model_key: str = "predict.model",
    in_a_run: bool = True,
) -> FinishedRun:
    """The finished run to use: `model` (an adapter export or a merged export), else `adapter`,
    else OUTPUT_DIR's adapter; its settings read from the run it sits in (`in_a_run=False`: a
    folder with no run behind it, such as a registry download). Nothing is loaded yet.

    `model_key` names the setting `model` came from, in errors.
    """
    if model and (Path(model) / ADAPTER_CONFIG).is_file():
        adapter, model = model, None  # an adapter export
    if model:
        merged = Path(model)
        if not (merged / "config.json").is_file():
            raise LmmtuneError(
                f"{model_key}={model} is not a model directory (no config.json): pass an "
                "export folder (RUN/export-merged, RUN/export-adapter)"
            )
        require_safetensors(merged, model_key)
        run_dir = find_run_dir(cfg, model) if in_a_run else None
        return FinishedRun(run_settings(cfg, run_dir, None, overrides), run_dir, None, merged)
    run_dir = find_run_dir(cfg, adapter)
    adapter_dir = find_adapter(adapter, run_dir, cfg)
    return FinishedRun(run_settings(cfg, run_dir, adapter_dir, overrides), run_dir, adapter_dir)


def load_given_adapter(cfg: DictConfig, given: str, setting: str = "adapters") -> FinishedRun:
    """A run folder or an adapter folder as a command names it among several (`merge`'s
    adapters=[...]): the run's settings when the adapter sits in one. Nothing is loaded yet."""
    path = Path(given)
    if not path.is_dir():
        raise LmmtuneError(
            f"{setting}: {given} is not a folder (a run folder or an adapter folder)"
        )
    adapter = given if (path / ADAPTER_CONFIG).is_file() else None
    return load_finished_run(OmegaConf.merge(cfg, {"output_dir": given}), adapter=adapter)


def load_merged_model(path: Path, dtype="auto"):
    """A merged model as a user loads it: plain transformers, safetensors only; `dtype`: a
    torch dtype, or "auto" (the one it was saved in)."""
    from transformers import AutoModelForImageTextToText

    from lmmtune.model import device_map

    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, device_map=device_map(), use_safetensors=True
    )


def find_run_dir(cfg: DictConfig, adapter: str | None) -> Path | None:
    """The training run to read settings from: OUTPUT_DIR, else the adapter's run (its parents)."""
    candidates = [Path(cfg.output_dir)]
    if adapter is not None:
        candidates += list(Path(adapter).resolve().parents)[:2]
    return next((c for c in candidates if RunDir(c).config.is_file()), None)


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
    from lmmtune.yaml_config import load_yaml_config

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


def command_line_overrides() -> list[str]:
    """The `key=value` overrides of the running Hydra command ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


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


def eval_samples(
    settings: DictConfig, run_dir: Path | None, processor, data: str | None
) -> list[Sample]:
    """`data` (a file, all its records), else the run's own eval split, as training had it."""
    from lmmtune.errors import DataError

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
    """Every valid record of the file at `path` (of a data set in splits: its
    data.train_split), checked as training checks its data."""
    whole = {"train": path, "eval": None, "eval_split": None, "eval_fraction": 0.0}
    file_cfg = OmegaConf.merge(data_cfg, whole)
    report = _inspect(file_cfg, processor)
    return report.train, report.problems


def _run_split(data_cfg, run_dir: Path | None, processor) -> tuple[list[Sample], list]:
    """The same eval records training evaluated on (same files, checks, split and cap)."""
    from lmmtune.data.checks import capped_eval

    data_cfg = demo_files(data_cfg, run_dir)
    report = _inspect(data_cfg, processor)
    return capped_eval(report, data_cfg), report.problems


def demo_files(data_cfg: DictConfig, run_dir: Path | None) -> DictConfig:
    """`data_cfg`, with `data.train=demo` turned into the demo files the run wrote (data.eval,
    when given, replaces the demo's own eval split)."""
    from lmmtune.demo import DEMO

    if data_cfg.train != DEMO:
        return data_cfg
    demo = (run_dir or Path(".")) / "demo_data"
    if not (demo / "eval.json").is_file():
        raise LmmtuneError(f"no demo data in {demo}: pass output_dir=RUN of a demo run")
    return OmegaConf.merge(
        data_cfg,
        {
            "train": str(demo / "train.json"),
            "eval": data_cfg.eval or str(demo / "eval.json"),
            "image_root": None,
        },
    )


def _inspect(data_cfg, processor):
    """`inspect_data` with a throwaway work directory (nothing of a run is written)."""
    from lmmtune.data.checks import inspect_data

    with tempfile.TemporaryDirectory(prefix="lmmtune-eval-") as work_dir:
        return inspect_data(data_cfg, processor, Path(work_dir))
