"""`data.group_by_image`: the questions of one image trained as one conversation, as LLaVA 1.5 did.

LLaVA 1.5 merged the QA pairs of each VQA training image into one multi-turn
conversation (arXiv 2310.03744, Appendix A.2): the image and the system prompt are
paid for once instead of once per question. `group_by_image` does that to the
training split, after the train/eval split (eval stays per question):

- single-turn records with an image are grouped by the image's content (the data
  check's digest; the path when `data.verify_images=false`), in file order;
- `<image>` stands before the first question only (the Vicuna v1 template puts it
  there); each question keeps its own text, a response-format prompt included, and
  its record's `question_type`;
- a group is cut into several conversations where it would exceed `data.max_length`
  tokens in its longest question order, between whole turns, never inside an answer;
- multi-turn records and text-only records stay conversations of their own.

`GroupedDataset` puts the turns of each conversation in a new order every epoch,
from (seed, epoch, conversation index) alone: the sampler tags each index with its
epoch (`EpochTagged`), so DataLoader workers, persistent or not, a resumed run and
every DDP rank see the same order. DDP shards conversations, as any dataset's items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from lmmtune.data.batches import BatchBuilder, token_lengths
from lmmtune.data.records import Sample

PROBE = ("Q", "A")
"""A first turn of fixed text: what a question adds as a later turn is measured after it."""


@dataclass
class Conversation:
    """Training records merged into one sample: the turns of `members`, one per record."""

    members: list[Sample]
    """The records, in file order (a record that is not grouped: itself alone)."""
    length: int
    """Tokens in its longest question order, image tokens included (at most max_length)."""

    @property
    def turns(self) -> int:
        return sum(len(member.turns) for member in self.members)

    def sample(self, order: list[int] | None = None) -> Sample:
        """The conversation as one Sample, its members' turns in `order` (default: file order);
        `extra["question_types"]` holds each turn's question type."""
        if len(self.members) == 1:
            return self.members[0]
        ordered = [self.members[i] for i in order] if order else self.members
        first = self.members[0]  # the image: every member's has the same content
        return Sample(
            id=first.id,
            turns=[member.turns[0] for member in ordered],
            image=first.image,
            image_ref=first.image_ref,
            source=", ".join(member.source for member in ordered),
            extra={"question_types": [member.question_type for member in ordered]},
        )


@dataclass
class Grouping:
    """The training split as conversations, and the numbers `check` and MLflow report."""

    conversations: list[Conversation]
    samples: int
    """Training samples before grouping (one per record)."""
    tokens_before: int
    """Tokens of an epoch, one sample per record."""
    lengths: list[int] = field(default_factory=list)
    """Tokens of each conversation (length grouping, the memory planner)."""

    @property
    def tokens_after(self) -> int:
        return sum(self.lengths)

    @property
    def ratio(self) -> float:
        """Training samples per conversation (1.0: nothing grouped)."""
        return self.samples / max(len(self.conversations), 1)

    def describe(self, on: bool | None = None) -> str:
        """Both ways of an epoch; `on`: whether data.group_by_image picks the grouped one."""
        turns = sum(c.turns for c in self.conversations)
        fewer = self.tokens_before / max(self.tokens_after, 1)
        setting = "" if on is None else f" (data.group_by_image={str(on).lower()})"
        return (
            f"per epoch{setting}: one sample per record: {self.samples} samples, "
            f"{self.tokens_before:,} tokens; grouped by image: {len(self.conversations)} "
            f"conversations of {turns} turns, {self.tokens_after:,} tokens ({fewer:.2f}x fewer)"
        )


def groupable(sample: Sample) -> bool:
    return sample.image is not None and len(sample.turns) == 1


def group_by_image(
    samples: list[Sample], lengths: list[int], keys: list[str | None], processor, max_length: int
) -> Grouping:
    """Merge the single-turn image records of `samples` that share an image key.

    `lengths`: each sample's tokens as the data check counted them; `keys`: each
    sample's image key (same content, same key).
    """
    later = later_turn_lengths(samples, processor)
    groups: dict[str, list[int]] = {}
    order: list[list[int]] = []
    for index, (sample, key) in enumerate(zip(samples, keys, strict=True)):
        if groupable(sample) and key is not None:
            if key not in groups:
                groups[key] = []
                order.append(groups[key])
            groups[key].append(index)
        else:
            order.append([index])
    conversations = []
    for members in order:
        conversations += cut_to_fit(members, samples, lengths, later, max_length)
    return Grouping(
        conversations=conversations,
        samples=len(samples),
        tokens_before=sum(lengths),
        lengths=[c.length for c in conversations],
    )


def later_turn_lengths(samples: list[Sample], processor) -> list[int]:
    """Tokens each single-turn image record's turn adds when it is not the first turn."""
    probe = Sample(id="probe", turns=[PROBE], image="probe")
    pairs = [
        Sample(id=s.id, turns=[PROBE, s.turns[0]], image="probe") for s in samples if groupable(s)
    ]
    counted, _ = token_lengths([probe, *pairs], processor)
    added = iter(n - counted[0] for n in counted[1:])
    return [next(added) if groupable(s) else 0 for s in samples]


def conversation_length(members: list[int], lengths: list[int], later: list[int]) -> int:
    """Tokens of the members' turns in their longest order: the first turn costs its whole
    record's length, every other turn what it adds after a first one."""
    if len(members) == 1:
        return lengths[members[0]]
    added = sum(later[i] for i in members)
    return added + max(lengths[i] - later[i] for i in members)


def cut_to_fit(
    members: list[int], samples: list[Sample], lengths: list[int], later: list[int], limit: int
) -> list[Conversation]:
    """The members in file order, cut into conversations of at most `limit` tokens (between
    whole turns: each record alone fits, the data check refused longer ones)."""
    conversations, current = [], []
    for index in members:
        if current and conversation_length([*current, index], lengths, later) > limit:
            conversations.append(current)
            current = []
        current.append(index)
    conversations.append(current)
    return [
        Conversation([samples[i] for i in part], conversation_length(part, lengths, later))
        for part in conversations
    ]


def turn_order(seed: int, epoch: int, index: int, turns: int) -> list[int]:
    """The order of a conversation's turns in an epoch: from (seed, epoch, index) alone."""
    order = list(range(turns))
    random.Random(f"{seed}/{epoch}/{index}").shuffle(order)  # str seeds hash with sha512
    return order


class GroupedDataset(Dataset):
    """Conversations as `input_ids`, `labels` and `pixel_values`, turns reshuffled per epoch.

    An index is an int (epoch 0) or `(epoch, index)`, as `EpochTagged` samplers yield it.
    """

    reorders_per_epoch = True
    """Tells lmmtune's Trainer to tag the indices it samples with their epoch."""

    def __init__(
        self,
        conversations: list[Conversation],
        processor,
        max_length: int,
        max_image_pixels: int | None,
        seed: int,
    ):
        self.conversations = conversations
        self.build = BatchBuilder(processor, max_length, max_image_pixels)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.conversations)

    def sample(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        conversation = self.conversations[index]
        order = turn_order(self.seed, epoch, index, len(conversation.members))
        return conversation.sample(order)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        return self.build.item(self.sample(key))
