"""The chat's models and answers: base and adapted loaded from a run or an export, one streamed answer each.

One streamed answer: the prompt as training renders it, decoded as `eval` decodes.

The inputs are `BatchBuilder`'s prompt batch (Vicuna v1, earlier turns included, image
tokens expanded; the image through lmmtune's decoder, padded to a square), so a greedy
answer here equals `eval`'s and `predict`'s for the same image and question. Tokens are streamed with transformers' TextIteratorStreamer
while `generate` runs in a thread; the last text yielded is the whole answer decoded
at once, exactly as `eval` decodes it.

The model the chat app talks to, loaded as `eval` and `predict` load it (`load_finished_run`).

Three sources:
- a run directory (`output_dir=RUN`): the base quantized as trained, with the adapter
  attached by peft; the base answer is the same model with the adapter switched off,
  as `eval`'s "before" is, so one model in memory serves both columns;
- an exported merged directory (`chat.model=DIR`): plain transformers, one answer;
- a registered MLflow model (`chat.model=models:/NAME/VERSION`): its merged directory
  is downloaded and loaded as above.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from lmmtune.data.batches import BatchBuilder
from lmmtune.data.checks import checked_question, special_texts
from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError
from lmmtune.eval.generate import to_model
from lmmtune.finished_run import FinishedRun


@dataclass
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy, as eval decodes."""
    top_p: float = 1.0

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"max_new_tokens": int(self.max_new_tokens), "do_sample": False}
        return {
            "max_new_tokens": int(self.max_new_tokens),
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
        }


def conversation(
    image: str | None, history: list[tuple[str, str]], question: str, tokenizer, max_length: int
) -> Sample:
    """The sample to answer: earlier (question, answer) turns, then `question`, checked as
    training checks its records (`checked_question`: one leading `<image>` dropped, other
    `<image>`s, special-token text such as `</s>` and overlong text refused)."""
    if not (question or "").strip():
        raise LmmtuneError("type a question first")
    question = checked_question(question, image is not None, tokenizer, max_length)
    specials = special_texts(tokenizer)
    for number, (_, answer) in enumerate(history, start=1):
        found = next((token for token in specials if token in answer), None)
        if found is not None:  # the model wrote it; read back it would be that token
            raise LmmtuneError(
                f"answer {number} of this conversation contains {found!r}, the text of a "
                "special token: clear the conversation to go on"
            )
    name = image.rsplit("/", 1)[-1] if image else "none"
    return Sample(id="upload", turns=[*history, (question, "")], image=image, source=name)


class Answerer:
    """Builds prompts and streams answers from one ChatModel (one request at a time)."""

    def __init__(self, chat_model: ChatModel):
        self.chat_model = chat_model
        processor = chat_model.processor
        self.tokenizer = processor.tokenizer
        self.build = BatchBuilder(processor, chat_model.max_length, chat_model.max_image_pixels)
        self.lock = threading.Lock()

    def inputs(self, sample: Sample) -> dict:
        """Model inputs for the sample's last question; a readable error for a bad image or length."""
        batch = self.build.batch([sample], prompt=True)  # LmmtuneError naming an image's problem
        length, limit = batch["input_ids"].shape[1], self.chat_model.max_length
        if length > limit:
            raise LmmtuneError(
                f"the conversation is {length} tokens long (image tokens included), past "
                f"data.max_length={limit} the model was trained with; shorten the question "
                "or clear the conversation"
            )
        return to_model(self.chat_model.model, batch)

    def stream(self, inputs: dict, settings: Settings, adapter: bool = True) -> Iterator[str]:
        """The answer so far, growing token by token; the last item is the whole answer.

        Stopping the iteration (a closed tab) stops the generation at the next token, and
        one generation runs at a time: the adapter switch is the model's, not the thread's.
        """
        from transformers import TextIteratorStreamer

        model = self.chat_model.model
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        result: dict = {}

        def work() -> None:
            switch = contextlib.nullcontext() if adapter else model.disable_adapter()
            try:
                with self.lock, switch:
                    result["ids"] = model.generate(
                        **inputs,
                        **settings.generate_kwargs(),
                        streamer=streamer,
                        stopping_criteria=[StopWhenSet(stop)],
                        pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                    )
            except BaseException as exc:  # handed to the caller's thread below
                result["error"] = exc
                streamer.end()  # unblock the iteration

        thread = threading.Thread(target=work, name="lmmtune-chat-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text
        finally:
            stop.set()  # a no-op once generation has ended
            thread.join()
        if "error" in result:
            raise result["error"]
        new_tokens = result["ids"][:, inputs["input_ids"].shape[1] :]
        yield self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


class StopWhenSet:
    """A stopping criterion for `generate`: stop every sequence once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


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
    from lmmtune.finished_run import load_finished_run

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
    from lmmtune.finished_run import trained_base
    from lmmtune.rundir.files import hub_id_of
    from lmmtune.rundir.run import RunDir
    from lmmtune.yaml_config import load_yaml_config

    named = str(settings.model.path)
    config = RunDir(run_dir).config if run_dir is not None else None
    if named == trained_base(adapter_dir) and config is not None and config.is_file():
        named = str(load_yaml_config(config, "the run's config").model.path)
    return hub_id_of(named) or Path(named).name


def eval_examples(
    settings: DictConfig, run_dir: Path | None, processor, count: int
) -> list[Sample]:
    """The first `count` image records of the run's eval split, read as `eval` reads it."""
    from lmmtune.finished_run import eval_samples

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

    from lmmtune.tracking.mlflow_run import resolve_tracking_uri

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
