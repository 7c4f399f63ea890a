"""The prompt: the Vicuna v1 template LLaVA 1.5 was trained with, its label mask, and its token ids whatever the tokenizer file's format; and stage 1's `plain` template.

The Vicuna v1 conversation template LLaVA 1.5 was trained with, and its label mask.

    A chat between ... questions. USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

Only the answers and their `</s>` carry labels; BOS, the system line, every
`USER: ... ASSISTANT:` span and all image positions are -100. Labels are found by
character spans over the rendered text and the tokenizer's offset mapping, so the
mask is exact for any fast tokenizer, whatever it does with spaces.

Stage 1 (`data.template=plain`, LLaVA's `preprocess_plain`) renders `<image>caption\\n`
alone: BOS and the image are -100, the caption and its newline labelled, no `</s>`.

Token ids as LLaVA 1.5's own preprocessing gives them, whatever the tokenizer file says.

LLaVA 1.5 (`tokenizer_image_token`) tokenizes the text around each `<image>`
separately, so every chunk starts a new text: SentencePiece puts its `▁` in front
of it, also of the `\\n` right after the image (`..., 29871, <image>, 29871, 13, ...`).
Inside a chunk, text after a special token such as `</s>` gets no `▁`: a second
turn starts with `USER` (11889), as LLaVA's current code gives it.

Published Llama tokenizer.json files mark word starts in different ways: transformers
4.3x wrote a normalizer (`Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer) that
puts a `▁` after every special token; transformers 5 writes a Metaspace pre-tokenizer
(`prepend_scheme` first or always, or the older `add_prefix_space` key), and rebuilds
it from `legacy` when it loads a folder without a model `config.json`. Tokenizing the
whole rendered string in one call therefore depends on the file. This module does not:
it reads the pipeline (`text_pipeline`), refuses one it does not understand, and
encodes with two copies of the tokenizer's own vocabulary in one fixed SentencePiece
pipeline, one that prepends `▁` and one that never does, deciding per chunk.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass

from tokenizers import Tokenizer

from lmmtune.errors import LmmtuneError

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


PLAIN_SEP = "\n"
"""What ends a caption in LLaVA's `plain` template (conv_llava_plain's separator)."""


def render_plain(caption: str) -> str:
    """LLaVA's `plain` template (stage 1, `preprocess_plain`): the image, the caption, a
    newline; no system line, no question, no `</s>`."""
    return f"{IMAGE_PLACEHOLDER}{caption}{PLAIN_SEP}"


def plain_labels(ids: list[int], image_id: int) -> list[int]:
    """`preprocess_plain`'s mask: BOS and the image -100, every token after them labelled
    (the caption, and the newline that teaches the model where it ends)."""
    start = ids.index(image_id) + 1
    return [IGNORE_INDEX] * start + ids[start:]


def label_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens whose characters overlap an answer span."""
    mask = []
    for token_start, token_end in offsets:
        mask.append(
            token_end > token_start
            and any(token_start < end and token_end > start for start, end in spans)
        )
    return mask


Offsets = list[tuple[int, int]]
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SPACE_MARKERS = ("Prepend", "Replace")
"""The normalizers of a SentencePiece-style pipeline (transformers 4.3x's Llama converter)."""
WORD_MODELS = ("BPE", "Unigram")


class UnknownTokenizer(LmmtuneError):
    """A tokenizer.json pipeline lmmtune cannot reproduce LLaVA's ids with: refused at start."""


def chunk_tokenizer(tokenizer) -> ChunkTokenizer:
    """The `ChunkTokenizer` of `tokenizer`, built once (copying a 32k vocabulary takes a second)."""
    if tokenizer not in _CACHE:
        _CACHE[tokenizer] = ChunkTokenizer(tokenizer)
    return _CACHE[tokenizer]


@dataclass(frozen=True)
class TextPipeline:
    """How a tokenizer.json turns text into pieces, as far as ids depend on it."""

    replacement: str
    """SentencePiece's word marker (`▁`) that stands for a space."""
    found: str
    """The pipeline in words (`normalizer Prepend+Replace, pre_tokenizer none`)."""


def text_pipeline(backend: Tokenizer | dict) -> TextPipeline:
    """Read the normalizer and pre-tokenizer of a tokenizer (or its tokenizer.json content);
    raise `UnknownTokenizer` naming what was found."""
    state = backend if isinstance(backend, dict) else json.loads(backend.to_str())
    normalizers = _parts(state.get("normalizer"), "normalizers")
    pre_tokenizers = _parts(state.get("pre_tokenizer"), "pretokenizers")
    model = (state.get("model") or {}).get("type", "?")
    found = (
        f"normalizer {_names(normalizers)}, pre_tokenizer {_names(pre_tokenizers)}, model {model}"
    )
    markers = {part.get("prepend") for part in normalizers if part.get("type") == "Prepend"}
    markers |= {
        part.get("content")
        for part in normalizers
        if part.get("type") == "Replace" and part.get("pattern") == {"String": " "}
    }
    markers |= {
        part.get("replacement") for part in pre_tokenizers if part.get("type") == "Metaspace"
    }
    understood = (
        model in WORD_MODELS
        and all(part.get("type") in SPACE_MARKERS for part in normalizers)
        and all(part.get("type") == "Metaspace" for part in pre_tokenizers)
        and len(markers) == 1
        and None not in markers
        and (_replaces_spaces(normalizers) or pre_tokenizers)
    )
    if not understood:
        raise UnknownTokenizer(
            f"tokenizer.json has a pipeline lmmtune does not understand ({found}); lmmtune "
            "reads SentencePiece-style Llama tokenizers: a Prepend/Replace('▁') normalizer or a "
            "Metaspace pre-tokenizer over a BPE or Unigram model"
        )
    return TextPipeline(replacement=markers.pop(), found=found)


def _parts(component: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer or pre-tokenizer: none, one, or those of a Sequence."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [part for step in component.get(key, []) for part in _parts(step, key)]
    return [component]


def _names(parts: list[dict]) -> str:
    return "+".join(str(part.get("type")) for part in parts) or "none"


def _replaces_spaces(normalizers: list[dict]) -> bool:
    return any(part.get("type") == "Replace" for part in normalizers)


def sentencepiece_copy(state: dict, replacement: str, prepend: bool) -> Tokenizer:
    """The tokenizer of `state` (tokenizer.json's content) in SentencePiece's own pipeline:
    spaces become `replacement`, and with `prepend` the text starts with one (as
    `add_dummy_prefix` does, even before a space). No pre-tokenizer splits the text, as
    SentencePiece splits nothing."""
    state = dict(state)
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": replacement}
    steps = [{"type": "Prepend", "prepend": replacement}] if prepend else []
    state["normalizer"] = {"type": "Sequence", "normalizers": [*steps, replace]}
    state["pre_tokenizer"] = None
    return Tokenizer.from_str(json.dumps(state))


class ChunkTokenizer:
    """Encode rendered prompts (BOS once, specials by id, `▁` per chunk) with character offsets."""

    def __init__(self, tokenizer):
        state = json.loads(tokenizer.backend_tokenizer.to_str())  # read once: 32k pieces
        self.pipeline = text_pipeline(state)
        self.bos_id = tokenizer.bos_token_id
        specials = [tokenizer.eos_token or "</s>", IMAGE_PLACEHOLDER]
        if tokenizer.bos_token:
            specials.append(tokenizer.bos_token)
        self.special_ids = {text: tokenizer.convert_tokens_to_ids(text) for text in specials}
        pattern = "|".join(re.escape(text) for text in sorted(specials, key=len, reverse=True))
        self.splitter = re.compile(f"({pattern})")
        marker = self.pipeline.replacement
        self.prefixed = sentencepiece_copy(state, marker, prepend=True)
        self.plain = sentencepiece_copy(state, marker, prepend=False)

    def pieces(self, text: str) -> list[tuple[int, str, bool]]:
        """(start, text, is_special) parts of `text`, split at special tokens."""
        parts, start = [], 0
        for part in self.splitter.split(text):
            if part:
                parts.append((start, part, part in self.special_ids))
            start += len(part)
        return parts

    def encode(self, text: str) -> tuple[list[int], Offsets]:
        """Ids with BOS and the characters each id covers (`(0, 0)` for BOS)."""
        ids = [self.bos_id] if self.bos_id is not None else []
        offsets: Offsets = [(0, 0)] * len(ids)
        previous = None
        for start, part, special in self.pieces(text):
            if special:
                ids.append(self.special_ids[part])
                offsets.append((start, start + len(part)))
            else:
                encoding = self._encoder(previous).encode(part, add_special_tokens=False)
                ids += encoding.ids
                offsets += [(start + a, start + b) for a, b in encoding.offsets]
            previous = part if special else None
        return ids, offsets

    def count(self, texts: list[str]) -> list[int]:
        """`len(encode(text)[0])` for many texts, tokenized in batches (fast)."""
        jobs: dict[int, list[tuple[int, str]]] = {id(self.prefixed): [], id(self.plain): []}
        counts = [int(self.bos_id is not None)] * len(texts)
        for index, text in enumerate(texts):
            previous = None
            for _, part, special in self.pieces(text):
                if special:
                    counts[index] += 1
                else:
                    jobs[id(self._encoder(previous))].append((index, part))
                previous = part if special else None
        for encoder in (self.prefixed, self.plain):
            batch = jobs[id(encoder)]
            encodings = encoder.encode_batch([part for _, part in batch], add_special_tokens=False)
            for (index, _), encoding in zip(batch, encodings, strict=True):
                counts[index] += len(encoding.ids)
        return counts

    def text_lengths(self, texts: list[str]) -> list[int]:
        """Tokens of each text on its own (a new text: `▁` in front), without BOS."""
        encodings = self.prefixed.encode_batch(texts, add_special_tokens=False)
        return [len(encoding.ids) for encoding in encodings]

    def _encoder(self, previous_special: str | None) -> Tokenizer:
        """A chunk at the start or after an image starts a new text (`▁`); after `</s>` not."""
        if previous_special is None or previous_special == IMAGE_PLACEHOLDER:
            return self.prefixed
        return self.plain
