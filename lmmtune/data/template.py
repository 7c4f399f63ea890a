"""The Vicuna v1 conversation template LLaVA 1.5 was trained with, and its label mask.

    A chat between ... questions. USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

Only the answers and their `</s>` carry labels; BOS, the system line, every
`USER: ... ASSISTANT:` span and all image positions are -100. Labels are found by
character spans over the rendered text and the tokenizer's offset mapping, so the
mask is exact for any fast tokenizer, whatever it does with spaces.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
EOS = "</s>"


@dataclass
class Rendered:
    text: str
    """The prompt with each image placeholder expanded to its image tokens."""
    answer_spans: list[tuple[int, int]]
    """Character spans [start, end) of " answer</s>", the text the model must generate."""


def render_conversation(
    turns: list[tuple[str, str]], has_image: bool, image_tokens: str, eos: str = EOS
) -> Rendered:
    """Render (question, answer) turns; the image goes to the front of the first question."""
    text = SYSTEM_PROMPT
    spans: list[tuple[int, int]] = []
    for index, (question, answer) in enumerate(turns):
        if index == 0 and has_image:
            question = f"{image_tokens}\n{question}"
        text += (" " if index == 0 else "") + f"USER: {question} ASSISTANT:"
        start = len(text)
        text += f" {answer}{eos}"
        spans.append((start, len(text)))  # the space too: the model generates " yes</s>"
    return Rendered(text=text, answer_spans=spans)


def render_prompt(question: str, has_image: bool, image_tokens: str, history=()) -> str:
    """The generation prompt: earlier turns, then the question and `ASSISTANT:`."""
    rendered = render_conversation([*history, (question, "")], has_image, image_tokens)
    return rendered.text[: rendered.answer_spans[-1][0]]


def label_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens whose characters overlap an answer span."""
    mask = []
    for token_start, token_end in offsets:
        mask.append(
            token_end > token_start
            and any(token_start < end and token_end > start for start, end in spans)
        )
    return mask
