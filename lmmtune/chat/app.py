"""The Gradio app: upload an image, ask, read the base and adapted answers side by side.

Two events reach the model, both through one queue slot (`concurrency_id="model"`,
limit 1), so tabs wait their turn instead of running the GPU out of memory; Gradio shows
each waiting tab its place in the queue, and turns requests away once `chat.queue_size`
wait. `ask` is the chat (multi-turn, streamed into two Chatbots); `answer` is the same
single-turn question for scripts (`gradio_client`), returning (base, adapted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import gradio as gr

from lmmtune.chat.generation import Answerer, Settings, conversation
from lmmtune.chat.model import ChatModel
from lmmtune.data.images import mean_colour, open_image, pad_to_square
from lmmtune.data.problems import RecordInvalid
from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)

QUEUE = "model"
"""The one concurrency group every model call joins."""
IMAGE_TYPES = "PNG, JPEG, TIFF (16-bit too), DICOM"


def build_app(chat_model: ChatModel, chat_cfg) -> gr.Blocks:
    """The Blocks app for `chat_model`; `chat_cfg` gives the generation settings' start values."""
    answerer = Answerer(chat_model)
    columns = ("base", "adapted") if chat_model.has_base else ("adapted",)
    with gr.Blocks(title="lmmtune chat") as app:
        gr.Markdown(header(chat_model))
        state = gr.State(new_state(None))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label=f"Image ({IMAGE_TYPES})", type="filepath", elem_id="image")
                preview = gr.Image(
                    label="What the model sees", interactive=False, height=240, elem_id="preview"
                )
                with gr.Accordion("Generation", open=False):
                    max_new_tokens = gr.Slider(
                        1, 1024, value=chat_cfg.max_new_tokens, step=1, label="Max new tokens"
                    )
                    temperature = gr.Slider(
                        0, 2, value=chat_cfg.temperature, step=0.05,
                        label="Temperature (0: greedy, as eval)",
                    )  # fmt: skip
                    top_p = gr.Slider(0.05, 1, value=chat_cfg.top_p, step=0.05, label="Top-p")
            with gr.Column(scale=2):
                with gr.Row():
                    chats = {
                        "base": gr.Chatbot(
                            label="Base model (adapter off)",
                            elem_id="base-answers",
                            visible=chat_model.has_base,
                        ),
                        "adapted": gr.Chatbot(
                            label="Adapted model" if chat_model.has_base else "Model",
                            elem_id="adapted-answers",
                        ),
                    }
                question = gr.Textbox(label="Question", elem_id="question", lines=2)
                reference = gr.Textbox(
                    label="Reference answer (eval split)",
                    interactive=False,
                    visible=bool(chat_model.examples),
                    elem_id="reference",
                )
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear_button = gr.Button("Clear conversation", elem_id="clear")
                status = gr.Markdown(elem_id="status")
        if chat_model.examples:
            gr.Examples(
                [[s.image, s.turns[-1][0], s.turns[-1][1]] for s in chat_model.examples],
                inputs=[image, question, reference],
                label="Examples from the run's eval split",
            )
        settings = [max_new_tokens, temperature, top_p]

        def ask(path, text, conv, tokens, temp, p) -> Iterator[tuple]:
            started = time.monotonic()
            conv = conv if conv["image"] == path else new_state(path)  # new image: new chat
            shown = {name: messages(conv[name]) for name in columns}
            for name, answer_so_far in chat_answers(
                answerer, columns, path, conv, text, settings_of(tokens, temp, p)
            ):
                shown[name] = [*messages(conv[name]), *turn(text, answer_so_far)]
                yield shown.get("base", []), shown["adapted"], conv, "answering…"
            for name in columns:
                conv[name] = [*conv[name], (text.strip(), shown[name][-1]["content"])]
            done = f"answered in {time.monotonic() - started:.1f} s"
            yield shown.get("base", []), shown["adapted"], conv, done

        def answer(path, text, tokens, temp, p) -> Iterator[tuple[str, str]]:
            latest = {"base": "", "adapted": ""}
            for name, text_so_far in chat_answers(
                answerer, columns, path, new_state(path), text, settings_of(tokens, temp, p)
            ):
                latest[name] = text_so_far
                yield latest["base"], latest["adapted"]

        gr.on(
            [ask_button.click, question.submit],
            ask,
            inputs=[image, question, state, *settings],
            outputs=[chats["base"], chats["adapted"], state, status],
            concurrency_id=QUEUE,
            concurrency_limit=1,
            api_visibility="private",
        )
        gr.on(  # the Chatbots' own bin icons forget the conversation too
            [clear_button.click, chats["base"].clear, chats["adapted"].clear],
            lambda path: ([], [], new_state(path), "", ""),
            inputs=image,
            outputs=[chats["base"], chats["adapted"], state, status, question],
            queue=False,
            api_visibility="private",
        )
        image.change(
            lambda path: show_image(path, chat_model),
            inputs=image,
            outputs=[preview, status],
            concurrency_limit=None,
            api_visibility="private",
        )
        api_outputs = [gr.Textbox(visible=False), gr.Textbox(visible=False)]
        gr.Button(visible=False).click(
            answer,
            inputs=[image, question, *settings],
            outputs=api_outputs,
            api_name="answer",
            api_description="One question about one image: (base answer, adapted answer); "
            "the base answer is empty for a merged model.",
            concurrency_id=QUEUE,
            concurrency_limit=1,
        )
    return app


def chat_answers(
    answerer: Answerer, columns, path: str | None, conv: dict, text: str, settings: Settings
) -> Iterator[tuple[str, str]]:
    """(column, answer so far) as each column's answer streams; bad input becomes a gr.Error.

    Every column's input is checked before any generation, so a bad image or an overlong
    question is reported at once and nothing is half answered.
    """
    max_length = answerer.chat_model.max_length
    try:
        inputs = {
            name: answerer.inputs(conversation(path, conv[name], text, max_length))
            for name in columns
        }
        for name in columns:
            for so_far in answerer.stream(inputs[name], settings, adapter=name == "adapted"):
                yield name, so_far
    except LmmtuneError as exc:
        raise gr.Error(str(exc), title="Cannot answer", print_exception=False) from None
    except Exception as exc:  # out of memory, a kernel error: say so, keep serving
        log.exception("generation failed")
        raise gr.Error(f"the model failed: {exc}", title="Generation failed") from None


def show_image(path: str | None, chat_model: ChatModel) -> tuple:
    """The uploaded image padded to a square, as the model gets it; a message if it cannot be read."""
    if not path:
        return None, ""
    try:
        image = open_image(path, max_pixels=chat_model.max_image_pixels)
    except RecordInvalid as exc:
        return None, f"**Cannot use this file:** {exc.reason}"
    return pad_to_square(image, mean_colour(chat_model.processor.image_processor)), ""


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
