"""Token ids as LLaVA 1.5's own preprocessing gives them, whatever the tokenizer's `legacy` flag.

LLaVA 1.5 (`tokenizer_image_token`) tokenizes the text around each `<image>`
separately, so every chunk starts a new text: SentencePiece puts its `▁` in front
of it, also of the `\\n` right after the image (`..., 29871, <image>, 29871, 13, ...`).
Inside a chunk, text after a special token such as `</s>` gets no `▁`: a second
turn starts with `USER` (11889), as LLaVA's current code gives it.

Tokenizing the whole rendered string in one call, as a fast tokenizer does, differs
by the tokenizer's `legacy` flag (transformers builds the pre-tokenizer from it):
`legacy=false` drops the `▁` after the image, `legacy=true` adds one after `</s>`.
So this module splits the text at special tokens itself and decides the `▁` per
chunk, with two copies of the tokenizer's own model: one that prepends `▁`, one that
never does. Tokenizers without a Metaspace (`▁`) pre-tokenizer are used as they are.
"""

from __future__ import annotations

import re
import weakref

from tokenizers import Tokenizer, pre_tokenizers

from lmmtune.data.template import IMAGE_PLACEHOLDER

Offsets = list[tuple[int, int]]
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chunk_tokenizer(tokenizer) -> ChunkTokenizer:
    """The `ChunkTokenizer` of `tokenizer`, built once (copying a 32k vocabulary takes a second)."""
    if tokenizer not in _CACHE:
        _CACHE[tokenizer] = ChunkTokenizer(tokenizer)
    return _CACHE[tokenizer]


class ChunkTokenizer:
    """Encode rendered prompts (BOS once, specials by id, `▁` per chunk) with character offsets."""

    def __init__(self, tokenizer):
        self.bos_id = tokenizer.bos_token_id
        specials = [tokenizer.eos_token or "</s>", IMAGE_PLACEHOLDER]
        if tokenizer.bos_token:
            specials.append(tokenizer.bos_token)
        self.special_ids = {text: tokenizer.convert_tokens_to_ids(text) for text in specials}
        pattern = "|".join(re.escape(text) for text in sorted(specials, key=len, reverse=True))
        self.splitter = re.compile(f"({pattern})")
        self.prefixed = _with_prepend(tokenizer.backend_tokenizer, "always")
        self.plain = _with_prepend(tokenizer.backend_tokenizer, "never")

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

    def _encoder(self, previous_special: str | None) -> Tokenizer:
        """A chunk at the start or after an image starts a new text (`▁`); after `</s>` not."""
        if previous_special is None or previous_special == IMAGE_PLACEHOLDER:
            return self.prefixed
        return self.plain


def _with_prepend(backend: Tokenizer, scheme: str) -> Tokenizer:
    """A copy of `backend` whose Metaspace pre-tokenizer prepends `▁` by `scheme`."""
    copy = Tokenizer.from_str(backend.to_str())
    metaspace = copy.pre_tokenizer
    if isinstance(metaspace, pre_tokenizers.Metaspace):
        copy.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=metaspace.replacement, prepend_scheme=scheme, split=metaspace.split
        )
    return copy
