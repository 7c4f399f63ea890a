"""The model the chat app talks to, loaded the way `eval` and `predict` load it.

Three sources:
- a run directory (`output_dir=RUN`): the base quantized as trained, with the adapter
  attached by peft; the base answer is the same model with the adapter switched off,
  as `eval`'s "before" is, so one model in memory serves both columns;
- an exported merged directory (`chat.model=DIR`): plain transformers, one answer;
- a registered MLflow model (`chat.model=models:/NAME/VERSION`): its merged directory
  is downloaded and loaded as above.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)

REGISTRY_PREFIX = "models:/"


@dataclass
class ChatModel:
    model: object
    """A PeftModel (base + adapter) or a merged transformers model."""
    processor: object
    description: str
    """What was loaded, in words, for the app's header."""
    max_length: int
    """data.max_length the model was trained with: longer prompts are refused."""
    max_image_pixels: int | None
    examples: list[Sample] = field(default_factory=list)
    """Records of the run's eval split (image, question, reference answer)."""

    @property
    def has_base(self) -> bool:
        """Whether a base answer exists: only with an adapter that can be switched off."""
        return hasattr(self.model, "disable_adapter")


def load_chat_model(cfg: DictConfig, overrides: list[str] | None = None) -> ChatModel:
    """The model named by `chat.model`, else the run's base with its adapter."""
    from lmmtune.runs import ADAPTER_CONFIG

    source = cfg.chat.model
    if source and source.startswith(REGISTRY_PREFIX):
        with tempfile.TemporaryDirectory(prefix="lmmtune-chat-") as download:
            return _load_merged(cfg, registered_model_dir(source, cfg, Path(download)), overrides)
    if source and (Path(source) / ADAPTER_CONFIG).is_file():
        return _load_adapted(cfg, source, overrides)  # an adapter export
    if source:
        return _load_merged(cfg, Path(source), overrides)
    return _load_adapted(cfg, cfg.chat.adapter, overrides)


def _load_adapted(cfg: DictConfig, adapter: str | None, overrides) -> ChatModel:
    from lmmtune.runs import (
        find_adapter,
        find_run_dir,
        load_adapted_model,
        load_run_processor,
        run_settings,
    )

    run_dir = find_run_dir(cfg, adapter)
    adapter_dir = find_adapter(adapter, run_dir, cfg)
    settings = run_settings(cfg, run_dir, adapter_dir, overrides)
    processor = load_run_processor(adapter_dir, settings.model)
    model = load_adapted_model(settings.model, settings.quant, adapter_dir)
    quant = settings.quant.mode if settings.quant.mode != "none" else "unquantized"
    name = model_name(settings, run_dir, adapter_dir)
    description = f"{name} ({quant}) with the adapter {adapter_dir}"
    return _chat_model(model, processor, description, settings, run_dir, cfg)


def model_name(settings: DictConfig, run_dir: Path | None, adapter_dir: Path) -> str:
    """The base model as the run's config names it (a hub id, `tiny`, a folder's name), not
    the local folder it resolved to (a cache path in someone's home directory)."""
    from lmmtune.config import load_yaml_config
    from lmmtune.rundir import RunDir
    from lmmtune.runs import trained_base
    from lmmtune.weights import hub_id_of

    named = str(settings.model.path)
    config = RunDir(run_dir).config if run_dir is not None else None
    if named == trained_base(adapter_dir) and config is not None and config.is_file():
        named = str(load_yaml_config(config, "the run's config").model.path)
    return hub_id_of(named) or Path(named).name


def _load_merged(cfg: DictConfig, model_dir: Path, overrides) -> ChatModel:
    """A merged export; settings and examples from its run when it sits in one (RUN/export-merged)."""
    from lmmtune.predict import load_merged
    from lmmtune.runs import find_run_dir, run_settings

    if not (model_dir / "config.json").is_file():
        raise LmmtuneError(
            f"chat.model={model_dir} is not a model directory (no config.json): pass an export "
            "directory, models:/NAME/VERSION, or leave chat.model unset for OUTPUT_DIR's adapter"
        )
    registered = cfg.chat.model.startswith(REGISTRY_PREFIX)
    run_dir = None if registered else find_run_dir(cfg, str(model_dir))
    settings = run_settings(cfg, run_dir, None, overrides)
    model, processor = load_merged(model_dir)
    model.eval()
    return _chat_model(
        model, processor, f"the merged model {cfg.chat.model}", settings, run_dir, cfg
    )


def _chat_model(model, processor, description, settings, run_dir, cfg) -> ChatModel:
    return ChatModel(
        model=model,
        processor=processor,
        description=description,
        max_length=settings.data.max_length,
        max_image_pixels=settings.data.max_image_pixels,
        examples=eval_examples(settings, run_dir, processor, cfg.chat.examples),
    )


def eval_examples(
    settings: DictConfig, run_dir: Path | None, processor, count: int
) -> list[Sample]:
    """The first `count` image records of the run's eval split, read as `eval` reads it."""
    from lmmtune.runs import eval_samples

    if count <= 0 or run_dir is None:
        return []
    try:
        samples = eval_samples(settings, run_dir, processor, None)
    except LmmtuneError as exc:  # the app is still useful without examples
        log.warning("no examples from the eval split: %s", exc)
        return []
    with_images = [s for s in samples if s.image is not None and s.image_ref is None]
    return with_images[:count]


def registered_model_dir(uri: str, cfg: DictConfig, download: Path) -> Path:
    """Download a registered model (logged by `export`) and return its merged model directory."""
    import mlflow
    import yaml

    from lmmtune.track.mlflow_tracker import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(cfg.tracking)
    mlflow.set_tracking_uri(tracking_uri)  # the registry too, unless MLFLOW_REGISTRY_URI says else
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download)))
    except Exception as exc:  # mlflow raises several types (not found, store, network)
        raise LmmtuneError(
            f"chat.model={uri}: could not download it from {tracking_uri}: {exc}"
        ) from None
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        model_dir = local / flavor["artifacts"]["model"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise LmmtuneError(
            f"chat.model={uri} is not a model logged by `lmmtune export` (no merged model artifact)"
        ) from None
    log.info("downloaded %s to %s", uri, model_dir)
    return model_dir
