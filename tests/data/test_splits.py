"""Splits, token lengths, on_error, image roots and the report's numbers."""

from __future__ import annotations

import json

import pytest

from lmmtune.config import DataConfig
from lmmtune.data.batches import TokenizedConversation
from lmmtune.data.checks import load_splits
from lmmtune.data.report import format_report
from lmmtune.errors import DataError, Kind
from tests.data.helpers import kinds, llava, save_image, write_json


def _images(folder, count, colour_of=lambda i: (i, 255 - i, 7)):
    for index in range(count):
        save_image(folder / f"{index}.png", colour=colour_of(index))


def test_seeded_split_keeps_records_of_one_image_on_one_side(tmp_path, inspect):
    _images(tmp_path / "img", 20)
    save_image(tmp_path / "img" / "copy_of_0.png", colour=(0, 255, 7))  # same bytes as 0.png
    records = [llava(f"{i}-{q}", f"img/{i}.png", f"Q{q}") for i in range(20) for q in range(3)]
    records.append(llava("copy", "img/copy_of_0.png"))
    path = write_json(tmp_path / "train.json", records)

    first = inspect(train=str(path), eval_fraction=0.25, seed=3)
    again = inspect(train=str(path), eval_fraction=0.25, seed=3)
    other = inspect(train=str(path), eval_fraction=0.25, seed=4)

    eval_ids = {s.id for s in first.eval}
    assert eval_ids == {s.id for s in again.eval} != {s.id for s in other.eval}
    assert len(first.eval) == 15 and len(first.train) == 46  # 5 of 20 images, 3 records each
    groups = {s.id.split("-")[0] for s in first.eval}
    assert all(f"{g}-{q}" in eval_ids for g in groups for q in range(3))
    assert ("copy" in eval_ids) == ("0-0" in eval_ids)  # same content, same side
    assert first.warnings == []


def test_same_image_in_train_and_eval_is_warned_and_counted(tmp_path, inspect):
    _images(tmp_path, 3)
    train = write_json(tmp_path / "train.json", [llava(f"t{i}", f"{i}.png") for i in range(3)])
    save_image(tmp_path / "again.png", colour=(2, 253, 7))  # a copy of 2.png under a new name
    evaluation = write_json(
        tmp_path / "eval.json", [llava("e0", "0.png", "Other question?"), llava("e1", "again.png")]
    )
    report = inspect(train=str(train), eval=str(evaluation))
    assert report.problems == [] and len(report.eval) == 2
    assert [(w.kind, w.source, w.record_id) for w in report.warnings] == [
        (Kind.TRAIN_EVAL_OVERLAP, f"{evaluation}[0]", "e0"),
        (Kind.TRAIN_EVAL_OVERLAP, f"{evaluation}[1]", "e1"),
    ]
    assert f"is also in train ({train}[2], id t2)" in report.warnings[1].reason
    assert "same image in train and eval (2):" in format_report(report)


def test_token_lengths_count_image_tokens_exactly(tmp_path, inspect, tiny_processor):
    save_image(tmp_path / "a.png")
    multi = llava("m", "a.png")
    multi["conversations"] += [
        {"from": "human", "value": "Which side is the lesion on?"},
        {"from": "gpt", "value": "left"},
    ]
    path = write_json(tmp_path / "t.json", [llava("i", "a.png"), llava("t", None), multi])
    report = inspect(train=str(path), eval_fraction=0.0)
    tokenize = TokenizedConversation(tiny_processor, max_length=10_000)
    assert report.token_lengths == [len(tokenize(s)[0]) for s in report.train]
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    assert tokenize(report.train[0])[0].count(image_id) == 16  # expanded, and counted
    assert report.answer_lengths == [1, 1, 1, 1]  # yes, yes, yes, left


def test_train_lengths_follow_the_train_split_past_bad_and_eval_records(
    tmp_path, inspect, tiny_processor
):
    """What length grouping and the memory planner use, without tokenizing again."""
    save_image(tmp_path / "a.png")
    long_text = llava("t", None, "Describe the scan in full detail, please.", "A long answer.")
    train = write_json(
        tmp_path / "train.json", [llava("i", "a.png"), llava("bad", "gone.png"), long_text]
    )
    evaluation = write_json(tmp_path / "eval.json", [llava("e", "a.png")])
    report = inspect(train=str(train), eval=str(evaluation))
    tokenize = TokenizedConversation(tiny_processor, max_length=10_000)
    assert [s.id for s in report.train] == ["i", "t"]
    assert report.train_lengths == [len(tokenize(s)[0]) for s in report.train]
    assert len(report.token_lengths) == 4  # every parsed record, the bad and the eval one too


def _long_set(tmp_path):
    save_image(tmp_path / "a.png")
    records = [llava("short", "a.png"), llava("long", "a.png", "Is there a lesion? " * 30)]
    return write_json(tmp_path / "train.json", records)


def test_too_long_sample_stops_training_with_the_report(tmp_path, tiny_processor):
    data_cfg = DataConfig(train=str(_long_set(tmp_path)), max_length=80, num_workers=0)
    with pytest.raises(DataError) as error:
        load_splits(data_cfg, tmp_path / "run", tiny_processor)
    message = str(error.value)
    assert message.startswith("1 invalid record(s); fix them, or pass data.on_error=skip")
    assert "longer than data.max_length (1):" in message
    assert f"{tmp_path / 'train.json'}[1] (id long): " in message
    assert "exceed data.max_length=80; samples are never truncated" in message
    assert (tmp_path / "run" / "data_report.txt").read_text().strip() in message
    assert not (tmp_path / "run" / "skipped_records.jsonl").exists()


def test_skip_trains_on_the_rest_and_writes_the_skipped_records(tmp_path, tiny_processor):
    data_cfg = DataConfig(
        train=str(_long_set(tmp_path)),
        max_length=80,
        on_error="skip",
        eval_fraction=0.0,
        num_workers=0,
    )
    splits = load_splits(data_cfg, tmp_path / "run", tiny_processor)
    assert [s.id for s in splits.train] == ["short"]
    assert kinds(splits.problems) == [Kind.TOO_LONG]
    (line,) = (tmp_path / "run" / "skipped_records.jsonl").read_text().splitlines()
    skipped = json.loads(line)
    assert (skipped["source"], skipped["record_id"], skipped["kind"]) == (
        f"{tmp_path / 'train.json'}[1]",
        "long",
        Kind.TOO_LONG,
    )
    assert skipped["reason"].startswith(
        "197 tokens (image tokens included) exceed data.max_length=80"
    )


def test_relative_image_paths_may_not_climb_out_of_image_root_absolute_ones_are_kept(
    tmp_path, inspect
):
    save_image(tmp_path / "images" / "a.png")
    save_image(tmp_path / "outside.png")
    records = [
        llava("in", "a.png"),
        llava("up", "../outside.png"),
        llava("abs", str(tmp_path / "outside.png")),  # written so by the data's author
        llava("sneaky", "sub/../../outside.png"),
    ]
    (tmp_path / "data").mkdir()
    path = write_json(tmp_path / "data" / "train.json", records)
    report = inspect(train=str(path), image_root=str(tmp_path / "images"), eval_fraction=0.0)
    assert [s.image for s in report.train] == [
        str(tmp_path / "images" / "a.png"),
        str(tmp_path / "outside.png"),
    ]
    assert [(p.kind, p.record_id) for p in report.problems] == [
        (Kind.PATH_ESCAPES_ROOT, "up"),
        (Kind.PATH_ESCAPES_ROOT, "sneaky"),
    ]
    assert report.problems[0].reason == (
        f"image path '../outside.png' leads outside data.image_root {tmp_path / 'images'}, "
        "links resolved (refused; set data.image_root to the folder a link points into)"
    )


def test_image_check_in_a_worker_pool_finds_the_same_problems(tmp_path, inspect):
    _images(tmp_path / "img", 150, colour_of=lambda i: (i, i, i))
    (tmp_path / "img" / "77.png").write_bytes(b"")
    path = write_json(tmp_path / "t.json", [llava(f"r{i}", f"img/{i}.png") for i in range(150)])
    pooled, serial = (inspect(train=str(path), num_workers=n) for n in (2, 0))
    assert [(p.kind, p.record_id) for p in pooled.problems] == [(Kind.EMPTY_IMAGE, "r77")]
    assert [s.id for s in pooled.eval] == [s.id for s in serial.eval]


def test_report_numbers(tmp_path, inspect):
    _images(tmp_path, 3)
    multi = llava("multi", "2.png")
    multi["conversations"] += [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "no"}]
    records = [
        llava("a", "0.png", answer="left"),
        llava("b", "1.png", answer="It is a round lesion on the left side."),
        llava("text", None, "Define lesion.", "An abnormal area of tissue."),
        multi,
        llava("broken", "missing.png"),
    ]
    path = write_json(tmp_path / "train.json", records)
    report = inspect(train=str(path), eval_fraction=0.0, max_length=60)
    text = format_report(report)
    # a, b (long answer), text-only, multi, broken: every parsed record is counted.
    # (multi: its second turn starts with "USER" without "▁" after "</s>", as in LLaVA)
    assert report.token_lengths == [52, 68, 47, 60, 52]
    assert (report.records, report.invalid_records, report.over_max_length) == (5, 2, 1)
    assert report.kinds() == {"with image": 2, "text-only": 1, "single-turn": 2, "multi-turn": 1}
    expected = [
        "records: 5 read, 3 valid, 2 invalid",
        "  split: 3 train, 0 eval",
        "  kinds: 2 with image, 1 text-only, 2 single-turn, 1 multi-turn",
        "tokens per sample (16 per image included): min 47 / median 52 / max 68; "
        "1 over data.max_length=60",
        "tokens per answer: min 1 / median 1 / max 17",
        "problems (invalid records): 2",
        "  longer than data.max_length (1):",
        f"    {path}[1] (id b): 68 tokens (image tokens included) exceed data.max_length=60; "
        "samples are never truncated (raise data.max_length or shorten the record)",
        "  missing image file (1):",
        f"    {path}[4] (id broken): image not found: {tmp_path / 'missing.png'}",
        "warnings (records still used): none",
    ]
    assert "\n".join(expected) in text


def test_verify_images_false_still_finds_missing_files(tmp_path, inspect):
    save_image(tmp_path / "a.png")
    (tmp_path / "empty.png").write_bytes(b"")
    records = [llava("a", "a.png"), llava("e", "empty.png"), llava("m", "gone.png")]
    path = write_json(tmp_path / "t.json", records)
    checked, unchecked = (inspect(train=str(path), verify_images=v) for v in (True, False))
    assert kinds(checked.problems) == [Kind.EMPTY_IMAGE, Kind.MISSING_IMAGE]
    assert kinds(unchecked.problems) == [Kind.MISSING_IMAGE]
