"""data.group_by_image: the questions of one image merged into one conversation, as LLaVA 1.5 did."""

from __future__ import annotations

import shutil

import pytest

from lmmtune.data.batches import TokenizedConversation, token_lengths
from lmmtune.data.grouping import GroupedDataset, turn_order
from lmmtune.data.prompt import IGNORE_INDEX
from lmmtune.data.records import Sample
from lmmtune.training.trainer import EpochSeededRandomSampler, EpochTagged
from tests.data.helpers import llava, save_image, write_json

QUESTIONS = [
    ("Is there a lesion?", "yes"),
    ("Which side is the lesion on? Answer with a single word.", "left"),
    ("Is the scan normal?", "no"),
]


def typed(record: dict, question_type: str) -> dict:
    return {**record, "question_type": question_type}


@pytest.fixture()
def grouped_set(tmp_path):
    """Image a (three questions, one of them under a copy named a_copy.png), image b (one
    question), a multi-turn record on b, a text-only record."""
    save_image(tmp_path / "img" / "a.png", colour=(10, 20, 30))
    shutil.copy(tmp_path / "img" / "a.png", tmp_path / "img" / "a_copy.png")
    save_image(tmp_path / "img" / "b.png", colour=(90, 20, 30))
    multi = llava("m", "img/b.png", "Describe the image.", "a scan")
    multi["conversations"] += [{"from": "human", "value": "Is it normal?"}]
    multi["conversations"] += [{"from": "gpt", "value": "yes"}]
    records = [
        typed(llava("a1", "img/a.png", *QUESTIONS[0]), "closed"),
        llava("b1", "img/b.png", "What is shown in the image?", "a scan"),
        typed(llava("a2", "img/a_copy.png", *QUESTIONS[1]), "open"),
        multi,
        llava("t", None, "What is a lesion?", "An abnormal area."),
        typed(llava("a3", "img/a.png", *QUESTIONS[2]), "closed"),
    ]
    return write_json(tmp_path / "train.json", records)


def ids_of(grouping) -> list[list[str]]:
    return [[member.id for member in c.members] for c in grouping.conversations]


def test_records_of_one_image_by_content_become_one_conversation(inspect, grouped_set):
    report = inspect(train=str(grouped_set), eval_fraction=0)

    grouping = report.grouping
    assert ids_of(grouping) == [["a1", "a2", "a3"], ["b1"], ["m"], ["t"]]
    assert grouping.samples == 6 and grouping.ratio == 1.5
    assert grouping.lengths[1:] == report.train_lengths[1:2] + report.train_lengths[3:5]
    sample = grouping.conversations[0].sample()
    assert sample.turns == QUESTIONS  # each question keeps its text, its format prompt too
    assert sample.extra["question_types"] == ["closed", "open", "closed"]
    assert sample.image.endswith("a.png")


def test_the_image_stands_in_the_first_turn_only(inspect, grouped_set, tiny_processor):
    conversation = inspect(train=str(grouped_set), eval_fraction=0).grouping.conversations[0]
    tokenize = TokenizedConversation(tiny_processor, max_length=2048)
    ids, labels = tokenize(conversation.sample([2, 0, 1]))
    image_id = tokenize.image_id
    image_at = [i for i, token in enumerate(ids) if token == image_id]
    assert len(image_at) == tokenize.image_tokens  # one image
    assert image_at == list(range(image_at[0], image_at[0] + len(image_at)))
    text = tiny_processor.tokenizer.decode(ids[image_at[-1] + 1 :])
    first_turn, *later_turns = text.split("USER:")  # the image's newline decodes as <unk>
    assert first_turn.endswith("Is the scan normal? ASSISTANT: no</s>") and len(later_turns) == 2
    answers = tiny_processor.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert answers.split() == ["no</s>", "yes</s>", "left</s>"]
    assert len(ids) <= conversation.length  # the counted length holds for any order


def test_multi_turn_and_text_only_records_are_left_as_they_are(inspect, grouped_set):
    report = inspect(train=str(grouped_set), eval_fraction=0)
    by_id = {s.id: s for s in report.train}
    for conversation in report.grouping.conversations[2:]:
        (member,) = conversation.members
        assert conversation.sample() is by_id[member.id]


def test_a_conversation_is_cut_between_turns_to_fit_max_length(inspect, grouped_set):
    whole = inspect(train=str(grouped_set), eval_fraction=0).grouping
    two_turns = whole.conversations[0]
    limit = two_turns.length - 1  # three turns do not fit, any two do

    cut = inspect(train=str(grouped_set), eval_fraction=0, max_length=limit).grouping

    assert ids_of(cut)[:2] == [["a1", "a2"], ["a3"]]
    assert max(cut.lengths) <= limit
    assert sum(c.turns for c in cut.conversations) == 7  # every turn kept, none cut
    assert cut.conversations[0].sample().turns == QUESTIONS[:2]


def test_the_lengths_are_the_longest_order_exactly(inspect, grouped_set, tiny_processor):
    conversation = inspect(train=str(grouped_set), eval_fraction=0).grouping.conversations[0]
    orders = [[0, 1, 2], [1, 0, 2], [2, 1, 0], [0, 2, 1], [1, 2, 0], [2, 0, 1]]
    counted, _ = token_lengths([conversation.sample(o) for o in orders], tiny_processor)
    assert max(counted) == conversation.length


def test_the_eval_split_stays_per_question(inspect, grouped_set):
    report = inspect(train=str(grouped_set), eval_fraction=0.5, seed=1)
    assert sum(c.turns for c in report.grouping.conversations) == sum(
        len(s.turns) for s in report.train
    )
    held_out = {s.id for s in report.eval}
    grouped = {m.id for c in report.grouping.conversations for m in c.members}
    assert held_out and not held_out & grouped


def test_the_turn_order_changes_per_epoch_from_the_seed_alone(inspect, grouped_set, tiny_processor):
    conversations = inspect(train=str(grouped_set), eval_fraction=0).grouping.conversations
    dataset = GroupedDataset(conversations, tiny_processor, 2048, None, seed=42)
    again = GroupedDataset(conversations, tiny_processor, 2048, None, seed=42)
    orders = [tuple(dataset.sample((epoch, 0)).turns) for epoch in range(8)]
    assert len(set(orders)) > 1  # reshuffled
    assert orders == [tuple(again.sample((epoch, 0)).turns) for epoch in range(8)]
    assert dataset[(3, 0)]["input_ids"] == again[(3, 0)]["input_ids"]
    other_seed = GroupedDataset(conversations, tiny_processor, 2048, None, seed=7)
    assert orders != [tuple(other_seed.sample((epoch, 0)).turns) for epoch in range(8)]
    assert dataset.sample(0).turns == dataset.sample((0, 0)).turns  # plain int: epoch 0


def test_turn_order_is_a_pure_function():
    assert turn_order(42, 3, 5, 6) == turn_order(42, 3, 5, 6)
    assert sorted(turn_order(42, 3, 5, 6)) == list(range(6))
    assert len({tuple(turn_order(42, epoch, 5, 6)) for epoch in range(10)}) > 1


def test_the_sampler_tags_each_index_with_its_epoch():
    sampler = EpochTagged(EpochSeededRandomSampler(5, seed=3))
    sampler.set_epoch(2)
    first = list(sampler)
    assert {epoch for epoch, _ in first} == {2}
    assert sorted(index for _, index in first) == list(range(5))
    sampler.set_epoch(0)
    sampler.set_epoch(2)  # a resumed run: epoch 2 again, the same order
    assert list(sampler) == first


def test_grouped_items_are_the_record_items_for_a_single_record(tiny_processor):
    from lmmtune.data.batches import SupervisedDataset
    from lmmtune.data.grouping import Conversation

    sample = Sample(id="x", turns=[("Is there a lesion?", "yes")], source="t")
    grouped = GroupedDataset([Conversation([sample], 40)], tiny_processor, 2048, None, seed=1)
    single = SupervisedDataset([sample], tiny_processor, 2048, None)
    assert grouped[(5, 0)] == single[0]


REAL_RECORDS = [
    ("Is there a pneumothorax?", "no"),
    ("Which lobe is affected? Answer with a single word.", "right upper lobe"),
    ("How many nodules are there?", "3 nodules, 12.5 mm and 7 mm."),
    ("Décrivez l'image.", "Un poumon 中文 🫁 é."),
]


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
def test_grouped_ids_and_labels_equal_llavas_multi_turn_on_the_real_vocabulary(legacy):
    from lmmtune.data.grouping import group_by_image
    from tests.llava_reference import preprocess_v1
    from tests.real_tokenizer import real_processor

    processor = real_processor(legacy)
    reference = real_processor(False).tokenizer
    samples = [
        Sample(id=f"r{i}", turns=[turn], image="scan.png", source=f"f:{i}")
        for i, turn in enumerate(REAL_RECORDS)
    ]
    lengths, _ = token_lengths(samples, processor)
    grouping = group_by_image(samples, lengths, ["same"] * 4, processor, max_length=4096)
    (conversation,) = grouping.conversations
    dataset = GroupedDataset([conversation], processor, 4096, None, seed=0)
    tokenize = TokenizedConversation(processor, max_length=4096)
    seen = []
    for epoch in range(6):
        sample = dataset.sample((epoch, 0))
        expected = preprocess_v1(
            sample.turns, True, lambda text: reference(text).input_ids, 32000, 576
        )
        assert tokenize(sample) == expected
        seen.append(len(expected[0]))
    assert max(seen) <= conversation.length
    assert conversation.length < sum(lengths) - 3 * 576  # the image and system line once


@pytest.mark.parametrize("on", [True, False])
def test_check_reports_an_epoch_both_ways_and_plans_memory_for_the_chosen_one(
    grouped_set, capsys, on
):
    from lmmtune.commands import check
    from lmmtune.config import Config, DataConfig, ModelConfig, TrainConfig

    data = DataConfig(train=str(grouped_set), num_workers=0, eval_fraction=0, group_by_image=on)
    budget = TrainConfig(batch_size=1, grad_accum=8, gpu_memory_gb=8)
    report = check(Config(data=data, model=ModelConfig(path="tiny"), train=budget))

    printed = capsys.readouterr().out
    per_record = sum(report.train_lengths)
    grouped = sum(report.grouping.lengths)
    assert (
        f"per epoch (data.group_by_image={str(on).lower()}): one sample per record: 6 samples, "
        f"{per_record:,} tokens; grouped by image: 4 conversations of 7 turns, "
        f"{grouped:,} tokens ({per_record / grouped:.2f}x fewer)"
    ) in printed
    assert (per_record, grouped) == (333, 249)  # the tiny tokenizer's counts, pinned
    # three questions on image a: its 16 image tokens and the system line once, not thrice
    assert per_record - grouped > 2 * 16
    longest = max(report.grouping.lengths if on else report.train_lengths)
    assert f"(samples up to {longest} tokens;" in printed


def test_persistent_workers_build_each_epochs_order(inspect, grouped_set, tiny_processor):
    from torch.utils.data import DataLoader

    conversations = inspect(train=str(grouped_set), eval_fraction=0).grouping.conversations
    dataset = GroupedDataset(conversations, tiny_processor, 2048, None, seed=42)
    sampler = EpochTagged(EpochSeededRandomSampler(len(dataset), seed=42))
    loader = DataLoader(
        dataset, sampler=sampler, num_workers=2, persistent_workers=True, collate_fn=list
    )
    for epoch in range(3):
        sampler.set_epoch(epoch)  # what the Trainer does at each epoch start
        got = [item["input_ids"] for (item,) in loader]
        expected = [dataset[key]["input_ids"] for key in sampler]
        assert got == expected
