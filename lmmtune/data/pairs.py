"""Preference pairs for DPO: read as Samples, checked, and collated with SFT's token ids.

Preference pairs: one prompt (with its image), a chosen and a rejected answer.

A pair is read as the `Sample` of its chosen conversation, with the rejected answer in
`Sample.extra["rejected"]`: every check, split and eval that works on samples works on
pairs (eval scores generation against the chosen answer). Accepted shapes:

- LLaVA-style: `{"id", "image", "conversations": [..., {"from": "human", "value":
  "<image>\\nQ"}], "chosen": "A", "rejected": "B"}`; the conversation ends with the
  question (earlier turns are history).
- TRL's vision preference layout: `{"images": [img], "prompt": ..., "chosen": ...,
  "rejected": ...}`, in JSON/JSONL or `datasets` tables; the prompt is a string or a
  list of chat messages, each answer a string or a one-message assistant list.

Pairs -> the batch TRL's DPOTrainer computes on, tokenized exactly as SFT tokenizes.

TRL's own vision collator renders prompts with the processor's chat template, which
is not the Vicuna v1 prompt LLaVA 1.5 was trained on. Here each side of a pair goes
through SFT's `BatchBuilder`, so a DPO stage on an SFT adapter sees the same
ids; the completion is the last answer (its `</s>` included), as SFT labels it.
"""

from __future__ import annotations

import dataclasses

import torch

from lmmtune.config import DataColumns
from lmmtune.data.batches import BatchBuilder, PaddingCollator, token_lengths
from lmmtune.data.prompt import IGNORE_INDEX, IMAGE_PLACEHOLDER
from lmmtune.data.records import Sample, record_to_sample
from lmmtune.errors import Kind, RecordInvalid, RecordProblem

CHOSEN, REJECTED, PROMPT = "chosen", "rejected", "prompt"
SPECIAL_TOKENS = ("</s>", "<s>", "<unk>", "<pad>", IMAGE_PLACEHOLDER)
"""Text that would tokenize to a control token of the LLaVA 1.5 vocabulary, not to words."""


class PairKind:
    """Problem kinds only preference pairs have (reports group by them)."""

    EMPTY_CHOSEN = "empty chosen answer"
    EMPTY_REJECTED = "empty rejected answer"
    IDENTICAL = "identical chosen and rejected"
    SPECIAL_TOKEN = "special token in an answer"
    NOT_AN_ANSWER = "answer is not text"
    MISSING_ANSWER = "chosen or rejected missing"
    NOT_A_PAIR = "not a preference pair"
    TOO_LONG = "rejected longer than data.max_length"


def is_pair_record(record) -> bool:
    """A record meant as a pair: it names a chosen or a rejected answer (a half pair is a
    bad pair, not an answer record with odd roles)."""
    return isinstance(record, dict) and (CHOSEN in record or REJECTED in record)


def is_pair_columns(names) -> bool:
    """Whether a table's columns are a preference table's (no question/answer columns needed)."""
    return CHOSEN in names or REJECTED in names


def is_pair(sample: Sample) -> bool:
    return REJECTED in sample.extra


def pair_to_sample(record: dict, source: str, columns: DataColumns) -> Sample:
    """The chosen conversation as a Sample (the record's checks apply), the rejected answer beside it."""
    for field in (CHOSEN, REJECTED):
        if field not in record:
            raise RecordInvalid(
                PairKind.MISSING_ANSWER,
                f"no '{field}' answer: a preference pair needs both 'chosen' and 'rejected'",
            )
    if PROMPT in record and not isinstance(record[PROMPT], str | list):
        held = "null" if record[PROMPT] is None else f"a {type(record[PROMPT]).__name__}"
        raise RecordInvalid(
            Kind.NOT_TEXT, f"'prompt' is {held}, expected the question as text or chat messages"
        )
    chosen, rejected = answer_text(record[CHOSEN], CHOSEN), answer_text(record[REJECTED], REJECTED)
    check_answers(chosen, rejected)
    sft_record = {k: v for k, v in record.items() if k not in (CHOSEN, REJECTED, PROMPT)}
    if "conversations" in record:
        turns = record["conversations"] if isinstance(record["conversations"], list) else []
        sft_record["conversations"] = [*turns, {"from": "gpt", "value": chosen}]
    elif isinstance(record.get(PROMPT), list):
        answer = {"role": "assistant", "content": chosen}
        sft_record["messages"] = [*record[PROMPT], answer]
    else:
        sft_record[columns.question] = record.get(PROMPT, record.get(columns.question))
        sft_record[columns.answer] = chosen
    sample = record_to_sample(sft_record, source, columns)
    sample.extra[REJECTED] = rejected
    return sample


def answer_text(value, field: str) -> str:
    """An answer as text: a string, or TRL's `[{"role": "assistant", "content": ...}]`."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")
        if isinstance(value, list):  # [{"type": "text", "text": ...}]
            value = " ".join(str(p.get("text", "")) for p in value if isinstance(p, dict))
    if value is None or (isinstance(value, float) and value != value):  # a table's empty cell
        return ""
    if not isinstance(value, str):
        raise RecordInvalid(
            PairKind.NOT_AN_ANSWER,
            f"'{field}' holds a {type(value).__name__}, expected text or one assistant message",
        )
    return value.strip()


def check_answers(chosen: str, rejected: str) -> None:
    """Raise RecordInvalid for an empty, identical or control-token answer."""
    if not chosen:
        raise RecordInvalid(PairKind.EMPTY_CHOSEN, "empty 'chosen' answer")
    if not rejected:
        raise RecordInvalid(PairKind.EMPTY_REJECTED, "empty 'rejected' answer")
    if chosen == rejected:
        raise RecordInvalid(
            PairKind.IDENTICAL, f"'chosen' and 'rejected' are the same text ({chosen[:60]!r})"
        )
    for field, text in ((CHOSEN, chosen), (REJECTED, rejected)):
        found = [token for token in SPECIAL_TOKENS if token in text]
        if found:
            raise RecordInvalid(
                PairKind.SPECIAL_TOKEN,
                f"'{field}' contains {', '.join(found)}: control tokens are added by lmmtune, "
                "an answer must not spell them",
            )


def unpaired(samples: list[Sample]) -> list[RecordProblem]:
    """The samples that are no pair, as problems: the preference stage trains on pairs only."""
    return [
        RecordProblem(
            s.source,
            s.id,
            "no 'chosen' and 'rejected' answers: the preference stage trains on pairs only",
            PairKind.NOT_A_PAIR,
        )
        for s in samples
        if not is_pair(s)
    ]


def as_rejected(sample: Sample) -> Sample:
    """The same prompt and image with the rejected answer as the last turn."""
    *history, (question, _) = sample.turns
    return dataclasses.replace(
        sample, turns=[*history, (question, sample.extra[REJECTED])], extra=dict(sample.extra)
    )


def check_rejected_lengths(
    samples: list[Sample], processor, max_length: int
) -> tuple[list[RecordProblem], dict[str, int]]:
    """Pairs whose rejected conversation exceeds `max_length` tokens, and each pair's rejected length."""
    pairs = [s for s in samples if is_pair(s)]
    if not pairs:
        return [], {}
    lengths, _ = token_lengths([as_rejected(s) for s in pairs], processor)
    problems = [
        RecordProblem(
            s.source,
            s.id,
            f"the rejected answer makes {length} tokens (image tokens included), over "
            f"data.max_length={max_length}; samples are never truncated",
            PairKind.TOO_LONG,
        )
        for s, length in zip(pairs, lengths, strict=True)
        if length > max_length
    ]
    return problems, {s.source: length for s, length in zip(pairs, lengths, strict=True)}


PAIR = "pair"
"""Column of the index table TRL iterates over: the pair's position in the sample list."""


def last_answer_labels(labels: list[int]) -> list[int]:
    """SFT's labels with every answer but the last masked: the completion DPO scores."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [label if start <= i <= end else IGNORE_INDEX for i, label in enumerate(labels)]


class PreferenceCollator:
    """Index rows -> `input_ids`, `attention_mask`, `completion_mask` ([chosen..., rejected...])
    and `pixel_values` (each image twice), the layout DPOTrainer's loss reads."""

    def __init__(
        self,
        samples: list[Sample],
        processor,
        max_length: int,
        max_image_pixels: int | None,
    ):
        self.samples = samples
        self.build = BatchBuilder(processor, max_length, max_image_pixels)
        self.pad = PaddingCollator(processor.tokenizer.pad_token_id)

    def sequence(self, sample: Sample, pixel_values: torch.Tensor | None) -> dict:
        """SFT's item of one side of a pair, only its last answer labelled."""
        item = self.build.item(sample, pixel_values=pixel_values)
        item["labels"] = last_answer_labels(item["labels"])
        return item

    def __call__(self, rows: list[dict]) -> dict:
        pairs = [self.samples[int(row[PAIR])] for row in rows]
        images = [self.build.load_image(s) if s.image is not None else None for s in pairs]
        chosen = [self.sequence(s, image) for s, image in zip(pairs, images, strict=True)]
        rejected = [
            self.sequence(as_rejected(s), image) for s, image in zip(pairs, images, strict=True)
        ]
        batch = self.pad(chosen + rejected)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        return batch
