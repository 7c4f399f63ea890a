"""One record (a dict from any input format) -> one `Sample`, or a named problem.

Three record shapes are accepted, whatever file they come from:

- LLaVA: `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}, ...]}`; no `image` means a text-only record.
- Chat (TRL's and Hugging Face's VLM data sets): `{"images": [img], "messages":
  [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
  {"role": "assistant", "content": [{"type": "text", "text": "A"}]}, ...]}`; a
  content may also be a plain string. The image comes from `data.columns.image`
  when the record has it, else from `images`.
- Flat: one question and one answer per record, in the columns `data.columns` names.
- Caption (stage 1): an image and its caption (`data.columns.caption`, else `text`), read
  as one turn with an empty question and the caption as the answer.

LLaVA 1.5 was trained with exactly one image per sample, so a record with more than
one image is refused (`more than one image`) instead of silently dropping images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lmmtune.config import DataColumns
from lmmtune.data.prompt import IMAGE_PLACEHOLDER
from lmmtune.errors import DataError, Kind, RecordInvalid, RecordProblem

__all__ = ["DataError", "ImageRef", "RecordInvalid", "RecordProblem", "Sample", "record_to_sample"]

HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
CHAT_IMAGES = "images"
"""Where chat-shaped records keep their images, unless `data.columns.image` is there."""
TEXT_COLUMN = "text"
"""The caption column of `datasets` image-text tables, when `data.columns.caption` is absent."""


def caption_field(names, columns: DataColumns) -> str | None:
    """The field holding an image's caption: `data.columns.caption`, else `text`, or None."""
    return next((name for name in (columns.caption, TEXT_COLUMN) if name in names), None)


def image_field(names, columns: DataColumns) -> str | None:
    """The field holding a record's image: `data.columns.image`, else a chat record's `images`."""
    if columns.image in names:
        return columns.image
    return CHAT_IMAGES if CHAT_IMAGES in names else None


@runtime_checkable
class ImageRef(Protocol):
    """An image stored inside a data set (encoded bytes), read only when it is needed."""

    label: str

    def read(self) -> tuple[bytes, str]:
        """The encoded image and a file name (its suffix tells DICOM apart)."""
        ...


@dataclass
class Sample:
    id: str
    turns: list[tuple[str, str]]
    """(question, answer) pairs, image placeholders removed."""
    image: str | None = None
    """Image path (resolved against the image root when loaded), or the label of an
    in-data image (`file[row]:column`) whose bytes `image_ref` reads; None: text-only."""
    question_type: str | None = None
    source: str = ""
    """Where the record came from, for error messages: `file:line` or `file[index]`."""
    extra: dict = field(default_factory=dict)
    image_ref: ImageRef | None = None
    """An image held inside a datasets table, read lazily (in DataLoader workers)."""


def record_to_sample(record, source: str, columns: DataColumns) -> Sample:
    """Validate one record and turn it into a Sample; raise RecordInvalid naming what is wrong."""
    if not isinstance(record, dict):
        raise RecordInvalid(Kind.NOT_A_RECORD, f"expected an object, got {type(record).__name__}")
    image_key = image_field(record, columns) or columns.image
    image = single_image(record.get(image_key), image_key)
    images = int(image is not None)
    if "conversations" in record:
        turns, placeholders = llava_turns(record["conversations"], image is not None)
        mismatch = placeholders != images  # LLaVA records mark the image's place
    elif "messages" in record:
        turns, placeholders = chat_turns(record["messages"], image is not None)
        mismatch = placeholders != images  # {"type": "image"} marks the image's place
    elif columns.question in record or columns.answer in record:
        turns, placeholders = flat_turns(record, columns, image is not None)
        mismatch = placeholders > images  # flat records may leave the placeholder out
    elif caption_field(record, columns) is not None:
        turns, mismatch = caption_turns(record, caption_field(record, columns), image), False
    else:
        raise RecordInvalid(
            Kind.NO_CONVERSATIONS,
            f"no 'conversations' or 'messages' list, no '{columns.question}'/"
            f"'{columns.answer}' fields and no '{columns.caption}' caption",
        )
    if mismatch:
        raise RecordInvalid(
            Kind.PLACEHOLDER_MISMATCH,
            f"{placeholders} '<image>' placeholder(s) for {images} image(s)",
        )
    record_id = optional_text(record.get(columns.id))
    is_ref = isinstance(image, ImageRef)
    return Sample(
        id=source if record_id is None else record_id,
        turns=turns,
        image=image.label if is_ref else image,
        question_type=optional_text(record.get(columns.question_type)),
        source=source,
        image_ref=image if is_ref else None,
    )


def single_image(value, column: str) -> str | ImageRef | None:
    """The record's one image (a path or an in-data image), None for text-only records."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    images = (
        [v for v in value if v not in (None, "")] if isinstance(value, list | tuple) else [value]
    )
    if len(images) > 1:
        raise RecordInvalid(
            Kind.MULTIPLE_IMAGES,
            f"{len(images)} images in one record: LLaVA 1.5 takes one image per sample "
            "(write one record per image)",
        )
    if not images:
        return None
    image = images[0]
    if isinstance(image, str):
        return image.strip()
    if isinstance(image, ImageRef):
        return image
    raise RecordInvalid(
        Kind.UNSUPPORTED_IMAGE, f"'{column}' holds a {type(image).__name__}, expected a path"
    )


def llava_turns(conversations, has_image: bool) -> tuple[list[tuple[str, str]], int]:
    """(question, answer) pairs of a LLaVA `conversations` list and its `<image>` count."""
    if not isinstance(conversations, list) or not conversations:
        raise RecordInvalid(Kind.NO_CONVERSATIONS, "'conversations' is empty or not a list")
    messages = [_message(index, message) for index, message in enumerate(conversations)]
    return _paired_turns(messages, has_image)


def chat_turns(messages, has_image: bool) -> tuple[list[tuple[str, str]], int]:
    """(question, answer) pairs of a chat `messages` list and its image-part count."""
    if not isinstance(messages, list) or not messages:
        raise RecordInvalid(Kind.NO_CONVERSATIONS, "'messages' is empty or not a list")
    parsed = [_chat_message(index, message) for index, message in enumerate(messages)]
    return _paired_turns(parsed, has_image)


def _paired_turns(
    messages: list[tuple[str, str]], has_image: bool
) -> tuple[list[tuple[str, str]], int]:
    """Check that (role, text) messages alternate human/assistant; pair them into turns."""
    for index, (role, _) in enumerate(messages):
        expected = HUMAN_ROLES if index % 2 == 0 else ASSISTANT_ROLES
        if role not in expected:
            want = "human" if index % 2 == 0 else "gpt"
            raise RecordInvalid(
                Kind.ROLES_OUT_OF_ORDER,
                f"message {index} is from '{role}', expected '{want}' (human and gpt alternate, "
                "human first)",
            )
    if len(messages) % 2:
        raise RecordInvalid(
            Kind.ROLES_OUT_OF_ORDER,
            f"the last message ({len(messages) - 1}) is a question without an answer",
        )
    turns, placeholders = [], 0
    for index in range(0, len(messages), 2):
        question, answer = messages[index][1], messages[index + 1][1]
        if IMAGE_PLACEHOLDER in answer:
            raise RecordInvalid(
                Kind.PLACEHOLDER_MISMATCH, f"'<image>' in an answer (message {index + 1})"
            )
        if index > 0 and IMAGE_PLACEHOLDER in question:
            raise RecordInvalid(
                Kind.PLACEHOLDER_MISMATCH,
                f"'<image>' in a later question (message {index}): LLaVA 1.5 sees the image "
                "before the first question only (move the placeholder to message 0)",
            )
        placeholders += question.count(IMAGE_PLACEHOLDER)
        where = (f"question (message {index})", f"answer (message {index + 1})")
        turns.append(_turn(question, answer, where, image_first=has_image and index == 0))
    return turns, placeholders


def flat_turns(
    record: dict, columns: DataColumns, has_image: bool
) -> tuple[list[tuple[str, str]], int]:
    """The single (question, answer) turn of a flat record and its `<image>` count."""
    question, answer = (
        _text(record.get(key), f"'{key}'") for key in (columns.question, columns.answer)
    )
    if IMAGE_PLACEHOLDER in answer:
        raise RecordInvalid(Kind.PLACEHOLDER_MISMATCH, f"'<image>' in '{columns.answer}'")
    where = (f"'{columns.question}'", f"'{columns.answer}'")
    turn = _turn(question, answer, where, image_first=has_image)
    return [turn], question.count(IMAGE_PLACEHOLDER)


def caption_turns(record: dict, column: str, image) -> list[tuple[str, str]]:
    """The one turn of an image + caption record: no question, the caption as the answer."""
    if image is None:
        raise RecordInvalid(Kind.NOT_A_CAPTION, f"a '{column}' caption without an image")
    caption = _text(record.get(column), f"'{column}'")
    if IMAGE_PLACEHOLDER in caption:
        raise RecordInvalid(Kind.PLACEHOLDER_MISMATCH, f"'<image>' in the caption '{column}'")
    return [_turn("", caption, ("", f"caption '{column}'"), image_first=True)]


def _turn(question: str, answer: str, where: tuple[str, str], image_first: bool) -> tuple[str, str]:
    """Strip a turn; an empty question is fine only where the image stands in for it."""
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    answer = answer.strip()
    if IMAGE_PLACEHOLDER in question:  # "<im<image>age>": what is tokenized must be checked
        raise RecordInvalid(
            Kind.PLACEHOLDER_MISMATCH,
            f"'<image>' in {where[0]} once its placeholder is removed (a placeholder inside "
            "another); write exactly one '<image>'",
        )
    if not answer:
        raise RecordInvalid(Kind.EMPTY_ANSWER, f"empty {where[1]}")
    if not question and not image_first:
        raise RecordInvalid(Kind.EMPTY_QUESTION, f"empty {where[0]}")
    return question, answer


def _message(index: int, message) -> tuple[str, str]:
    if not isinstance(message, dict) or "from" not in message or "value" not in message:
        raise RecordInvalid(
            Kind.NO_CONVERSATIONS, f"message {index} is not a {{'from': ..., 'value': ...}} object"
        )
    role = _text(message["from"], f"message {index} 'from'")
    return role.strip().lower(), _text(message["value"], f"message {index} 'value'")


def _chat_message(index: int, message) -> tuple[str, str]:
    """(role, text) of one chat message; an image part becomes the `<image>` placeholder."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise RecordInvalid(
            Kind.NO_CONVERSATIONS,
            f"message {index} is not a {{'role': ..., 'content': ...}} object",
        )
    role = _text(message["role"], f"message {index} 'role'").strip().lower()
    if role == "system":
        raise RecordInvalid(
            Kind.ROLES_OUT_OF_ORDER,
            f"message {index} is a system message: LLaVA 1.5's prompt has a fixed system line "
            "(remove system messages)",
        )
    content = message["content"]
    if not isinstance(content, list):
        return role, _text(content, f"message {index} 'content'")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            parts.append(_text(part.get("text"), f"message {index} text part"))
        else:
            raise RecordInvalid(
                Kind.NO_CONVERSATIONS,
                f"message {index}: a content part of type {kind!r}, expected 'text' or 'image'",
            )
    return role, "\n".join(parts)


def _text(value, where: str) -> str:
    """A text field as text; None/NaN is empty. A list, number or object is not text:
    `str(value)` would train on "['a', 'b']" or "42.0" (a table column of another type)."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    if not isinstance(value, str):
        raise RecordInvalid(Kind.NOT_TEXT, f"{where} is a {type(value).__name__}, expected text")
    return value


def problem_for(record, source: str, columns: DataColumns, error: RecordInvalid) -> RecordProblem:
    """A RecordProblem for a record that failed, with its id if it has one."""
    record_id = optional_text(record.get(columns.id)) if isinstance(record, dict) else None
    return RecordProblem(source, record_id, error.reason, error.kind)


def optional_text(value) -> str | None:
    """An optional field as text: None when it is missing or empty."""
    return None if value in (None, "") else str(value)
