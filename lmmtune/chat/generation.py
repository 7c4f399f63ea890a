"""One streamed answer: the prompt as training renders it, decoded as `eval` decodes.

The inputs are `BatchBuilder`'s prompt batch (Vicuna v1, earlier turns included, image
tokens expanded; the image through lmmtune's decoder, padded to a square), so a greedy
answer here equals `eval`'s and `predict`'s for the same image and question. Tokens are streamed with transformers' TextIteratorStreamer
while `generate` runs in a thread; the last text yielded is the whole answer decoded
at once, exactly as `eval` decodes it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from lmmtune.chat.model import ChatModel
from lmmtune.data.dataset import BatchBuilder
from lmmtune.data.records import Sample
from lmmtune.data.validate import checked_question, special_texts
from lmmtune.errors import LmmtuneError
from lmmtune.eval.generate import to_model


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
