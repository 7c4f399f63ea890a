"""The model the chat app talks to, loaded as `eval` and `predict` load it (`load_finished_run`).

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
from lmmtune.runs import FinishedRun

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
    """The model named by `chat.model` (an export, or a registered model), else the run's
    base with its adapter."""
    from lmmtune.runs import load_finished_run

    source = cfg.chat.model
    if source and source.startswith(REGISTRY_PREFIX):
        with tempfile.TemporaryDirectory(prefix="lmmtune-chat-") as download:
            model_dir = registered_model_dir(source, cfg, Path(download))
            run = load_finished_run(
                cfg,
                model=str(model_dir),
                overrides=overrides,
                model_key="chat.model",
                in_a_run=False,
            )
            return chat_model(run, cfg)  # loaded before the download is removed
    run = load_finished_run(cfg, cfg.chat.adapter, source, overrides, model_key="chat.model")
    return chat_model(run, cfg)


def chat_model(run: FinishedRun, cfg: DictConfig) -> ChatModel:
    """The run's model and processor, described for the header, with examples of its eval split."""
    processor = run.processor
    return ChatModel(
        model=run.load_model(),
        processor=processor,
        description=description(run, cfg),
        max_length=run.settings.data.max_length,
        max_image_pixels=run.settings.data.max_image_pixels,
        examples=eval_examples(run.settings, run.run_dir, processor, cfg.chat.examples),
    )


def description(run: FinishedRun, cfg: DictConfig) -> str:
    """What was loaded, in words: the base as the run names it, quantized or not, and the
    adapter; or the merged model as `chat.model` names it."""
    if run.merged is not None:
        return f"the merged model {cfg.chat.model}"
    quant = run.settings.quant.mode
    quant = quant if quant != "none" else "unquantized"
    name = model_name(run.settings, run.run_dir, run.adapter)
    return f"{name} ({quant}) with the adapter {run.adapter}"


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
