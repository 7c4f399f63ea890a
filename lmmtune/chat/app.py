"""The `chat` command: the Gradio app, base and adapted answers side by side.

The Gradio app: upload an image, ask, read the base and adapted answers side by side.

Two events reach the model, both through one queue slot (`concurrency_id="model"`,
limit 1), so tabs wait their turn instead of running the GPU out of memory; Gradio shows
each waiting tab its place in the queue, and turns requests away once `chat.queue_size`
wait. `ask` is the chat (multi-turn, streamed into two Chatbots); `answer` is the same
single-turn question for scripts (`gradio_client`), returning (base, adapted). Every
other event is in the same bounded queue too: the image preview (it decodes the
upload) one at a time in a slot of its own, clearing the conversation beside it.

`python -m lmmtune chat output_dir=RUN`: load the model, start the Gradio app, serve until Ctrl-C.

    python -m lmmtune chat output_dir=RUN                       # base + adapter, side by side
    python -m lmmtune chat chat.model=RUN/export-merged         # a merged export
    python -m lmmtune chat chat.model=models:/NAME/VERSION      # a registered MLflow model

The app listens on 127.0.0.1:7860 unless `chat.host` / `chat.port` say otherwise, and
asks Gradio for a public link only with `chat.share=true`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from omegaconf import DictConfig

from lmmtune.chat.answer import Answerer, ChatModel, Settings, conversation
from lmmtune.data.images import open_image, padded_to_square
from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError, RecordInvalid

log = logging.getLogger(__name__)

QUEUE = "model"
"""The one concurrency group every model call joins."""
PREVIEW_QUEUE = "preview"
"""The concurrency group of the image preview: one decode at a time."""
PREVIEW_SIDE = 1024
"""Longest side of the preview image (the model sees 336 px)."""
IMAGE_TYPES = "PNG, JPEG, TIFF (16-bit too), DICOM"


def build_app(chat_model: ChatModel, chat_cfg) -> gr.Blocks:
    """The Blocks app for `chat_model`; `chat_cfg` gives the generation settings' start values."""
    with gr.Blocks(title="lmmtune chat") as app:
        ui = layout(chat_model, chat_cfg)
        connect(ui, Answerer(chat_model))
    return app


def layout(chat_model: ChatModel, chat_cfg) -> SimpleNamespace:
    """The components: image and settings on the left, the two conversations on the right."""
    ui = SimpleNamespace()
    gr.Markdown(header(chat_model))
    ui.state = gr.State(new_state(None))
    with gr.Row():
        with gr.Column(scale=1):
            ui.image = gr.File(label=f"Image ({IMAGE_TYPES})", type="filepath", elem_id="image")
            ui.preview = gr.Image(
                label="What the model sees", interactive=False, height=240, elem_id="preview"
            )
            ui.settings = generation_settings(chat_cfg)
        with gr.Column(scale=2):
            conversation_column(ui, chat_model)
    if chat_model.examples:
        gr.Examples(
            [[s.image, s.turns[-1][0], s.turns[-1][1]] for s in chat_model.examples],
            inputs=[ui.image, ui.question, ui.reference],
            label="Examples from the run's eval split",
        )
    return ui


def generation_settings(chat_cfg) -> list:
    """The sliders of the generation settings, in `Settings`' order, in a closed accordion."""
    with gr.Accordion("Generation", open=False):
        return [
            gr.Slider(1, 1024, chat_cfg.max_new_tokens, step=1, label="Max new tokens"),
            gr.Slider(
                0,
                2,
                chat_cfg.temperature,
                step=0.05,
                label="Temperature (0: greedy, as eval)",
            ),
            gr.Slider(0.05, 1, chat_cfg.top_p, step=0.05, label="Top-p"),
        ]


def conversation_column(ui: SimpleNamespace, chat_model: ChatModel) -> None:
    """The two conversations side by side, the question, the reference answer and the buttons."""
    with gr.Row():
        ui.base = gr.Chatbot(
            label="Base model (adapter off)",
            elem_id="base-answers",
            visible=chat_model.has_base,
        )
        ui.adapted = gr.Chatbot(
            label="Adapted model" if chat_model.has_base else "Model",
            elem_id="adapted-answers",
        )
    ui.question = gr.Textbox(label="Question", elem_id="question", lines=2)
    ui.reference = gr.Textbox(
        label="Reference answer (eval split)",
        interactive=False,
        visible=bool(chat_model.examples),
        elem_id="reference",
    )
    with gr.Row():
        ui.ask = gr.Button("Ask", variant="primary", elem_id="ask")
        ui.clear = gr.Button("Clear conversation", elem_id="clear")
    ui.status = gr.Markdown(elem_id="status")


def connect(ui: SimpleNamespace, answerer: Answerer) -> None:
    """The events: ask (the chat), clear, image preview, and `/answer` for scripts."""
    gr.on(
        [ui.ask.click, ui.question.submit],
        partial(ask, answerer),
        inputs=[ui.image, ui.question, ui.state, *ui.settings],
        outputs=[ui.base, ui.adapted, ui.state, ui.status],
        concurrency_id=QUEUE,
        concurrency_limit=1,
        api_visibility="private",
    )
    gr.on(  # the Chatbots' own bin icons forget the conversation too
        [ui.clear.click, ui.base.clear, ui.adapted.clear],
        lambda path: ([], [], new_state(path), "", ""),
        inputs=ui.image,
        outputs=[ui.base, ui.adapted, ui.state, ui.status, ui.question],
        concurrency_id="clear",
        concurrency_limit=4,  # touches no file and no model
        api_visibility="private",
    )
    ui.image.change(
        partial(show_image, chat_model=answerer.chat_model),
        inputs=ui.image,
        outputs=[ui.preview, ui.status],
        concurrency_id=PREVIEW_QUEUE,
        concurrency_limit=1,
        api_visibility="private",
    )
    gr.Button(visible=False).click(
        partial(answer, answerer),
        inputs=[ui.image, ui.question, *ui.settings],
        outputs=[gr.Textbox(visible=False), gr.Textbox(visible=False)],
        api_name="answer",
        api_description="One question about one image: (base answer, adapted answer); "
        "the base answer is empty for a merged model.",
        concurrency_id=QUEUE,
        concurrency_limit=1,
    )


def ask(answerer: Answerer, path, text, conv, tokens, temp, top_p) -> Iterator[tuple]:
    """The chat turn: both conversations with the new answers streaming in, the state, a status.

    Bad input leaves the conversations as they were and says what is wrong in the status.
    """
    started = time.monotonic()
    conv = conv if conv["image"] == path else new_state(path)  # a new image: a new chat
    try:
        question, inputs = checked_inputs(answerer, path, conv, text)
    except LmmtuneError as exc:
        yield gr.skip(), gr.skip(), gr.skip(), f"**Cannot answer:** {exc}"
        return
    shown = {name: messages(conv[name]) for name in inputs}
    for name, so_far in streamed(answerer, inputs, settings_of(tokens, temp, top_p)):
        shown[name] = [*messages(conv[name]), *turn(question, so_far)]
        yield shown.get("base", []), shown["adapted"], conv, "answering…"
    for name in inputs:
        conv[name] = [*conv[name], (question, shown[name][-1]["content"])]
    done = f"answered in {time.monotonic() - started:.1f} s"
    yield shown.get("base", []), shown["adapted"], conv, done


def answer(answerer: Answerer, path, text, tokens, temp, top_p) -> Iterator[tuple[str, str]]:
    """`/answer`: one question, no history; (base, adapted) as they grow. Bad input: an error."""
    try:
        _, inputs = checked_inputs(answerer, path, new_state(path), text)
    except LmmtuneError as exc:
        raise gr.Error(str(exc), title="Cannot answer", print_exception=False) from None
    latest = {"base": "", "adapted": ""}
    for name, so_far in streamed(answerer, inputs, settings_of(tokens, temp, top_p)):
        latest[name] = so_far
        yield latest["base"], latest["adapted"]


def checked_inputs(answerer: Answerer, path: str | None, conv: dict, text: str) -> tuple[str, dict]:
    """The question as asked (`<image>` prefix dropped) and each column's model inputs,
    all checked before any generation starts.

    A bad image, a bad or overlong question raises LmmtuneError naming the upload by its
    file name (not the server's temporary path).
    """
    columns = ("base", "adapted") if answerer.chat_model.has_base else ("adapted",)
    max_length = answerer.chat_model.max_length
    try:
        samples = {
            name: conversation(path, conv[name], text, answerer.tokenizer, max_length)
            for name in columns
        }
        inputs = {name: answerer.inputs(sample) for name, sample in samples.items()}
    except LmmtuneError as exc:
        raise LmmtuneError(without_upload_dir(str(exc), path)) from None
    return samples["adapted"].turns[-1][0], inputs


def streamed(answerer: Answerer, inputs: dict, settings: Settings) -> Iterator[tuple[str, str]]:
    """(column, answer so far) as each column's answer streams, the base (adapter off) first."""
    try:
        for name, column_inputs in inputs.items():
            for so_far in answerer.stream(column_inputs, settings, adapter=name == "adapted"):
                yield name, so_far
    except Exception as exc:  # out of memory, a kernel error: say so, keep serving
        log.exception("generation failed")
        raise gr.Error(f"the model failed: {exc}", title="Generation failed") from None


def without_upload_dir(message: str, path: str | None) -> str:
    return message.replace(path, Path(path).name) if path else message


def show_image(path: str | None, chat_model: ChatModel) -> tuple:
    """The uploaded image padded to a square, as the model gets it (at most PREVIEW_SIDE px
    a side); a message if it cannot be read."""
    if not path:
        return None, ""
    try:
        image = open_image(path, max_pixels=chat_model.max_image_pixels)
    except RecordInvalid as exc:
        return None, f"**Cannot use this file:** {without_upload_dir(exc.reason, path)}"
    square = padded_to_square(image, chat_model.processor.image_processor)
    square.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return square, ""


def settings_of(max_new_tokens, temperature, top_p) -> Settings:
    return Settings(int(max_new_tokens), float(temperature), float(top_p))


def new_state(image: str | None) -> dict:
    """One conversation per column: (question, answer) turns about `image`."""
    return {"image": image, "base": [], "adapted": []}


def turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer}]


def messages(turns: list[tuple[str, str]]) -> list[dict]:
    return [message for question, answer in turns for message in turn(question, answer)]


def header(chat_model: ChatModel) -> str:
    lines = ["## lmmtune chat", f"Model: {chat_model.description}."]
    if chat_model.has_base:
        lines.append(
            "Each question is answered twice by the same model in memory: with the adapter "
            "switched off (the base, left) and on (right), so you see what training changed."
        )
    else:
        lines.append("A merged model has no base/adapter split: one answer per question.")
    lines.append(
        f"Prompts and image padding are the ones training used (at most {chat_model.max_length} "
        "tokens, image included). A new image starts a new conversation."
    )
    return "\n\n".join(lines)


def require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LmmtuneError(
            "the chat app needs gradio, which is not installed: pip install 'lmmtune[chat]'"
        ) from None


def run_chat(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Serve the app until Ctrl-C or SIGTERM.

    The app serves nothing but what it made: uploads, previews and copies of the example
    images all live in one folder of its own (mode 0700, Gradio's GRADIO_TEMP_DIR and
    examples cache), which is removed when the app stops. No folder of the user's is handed to Gradio, so
    `/gradio_api/file=...` reaches no data file beside the example images.
    """
    require_gradio()
    app_dir = Path(tempfile.mkdtemp(prefix="lmmtune-chat-"))  # mode 0700
    os.environ["GRADIO_TEMP_DIR"] = str(app_dir)  # read by Gradio when the app is built
    # Gradio also serves its examples cache, `.gradio/cached_examples` of the working folder
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(app_dir / "cached_examples")
    try:
        serve(cfg, overrides, app_dir)
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)


def serve(cfg: DictConfig, overrides: list[str] | None, app_dir: Path) -> None:
    from lmmtune.chat.answer import load_chat_model
    from lmmtune.chat.app import build_app

    started = time.monotonic()
    chat_model = load_chat_model(cfg, overrides)
    chat_model.examples = example_copies(chat_model.examples, app_dir / "examples")
    app = build_app(chat_model, cfg.chat)
    app.queue(default_concurrency_limit=1, max_size=cfg.chat.queue_size)
    _, url, share_url = app.launch(
        server_name=cfg.chat.host,
        server_port=cfg.chat.port,
        share=cfg.chat.share,
        max_file_size=f"{cfg.chat.max_upload_mb}mb",
        prevent_thread_lock=True,
        quiet=True,
    )
    log.info("model loaded and app started in %.1f s", time.monotonic() - started)
    print(f"lmmtune chat: {share_url or url} (Ctrl-C stops it)", flush=True)
    try:
        with sigterm_as_interrupt():
            app.block_thread()  # returns on Ctrl-C (and SIGTERM), having closed the server
    finally:
        app.close()


def example_copies(examples: list[Sample], folder: Path) -> list[Sample]:
    """The examples with their images copied into the app's own folder: the app serves the
    copies, never the data folder they sit in (its other files, `train.json`, ...)."""
    from dataclasses import replace

    folder.mkdir(mode=0o700)
    copied: dict[str, Path] = {}  # one copy per image, however many questions it has
    for sample in examples:
        if sample.image not in copied:
            copy = folder / f"{len(copied):02d}" / Path(sample.image).name  # its name shown
            copy.parent.mkdir(mode=0o700, parents=True)
            shutil.copyfile(sample.image, copy)  # the file's bytes; never a link
            copied[sample.image] = copy
    return [replace(sample, image=str(copied[sample.image])) for sample in examples]


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a service manager, `kill`) stops the app as Ctrl-C does, so its folder goes too."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
