"""The per-image grouping benchmark: its data set, its model's geometry, and its code path at a toy size."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np

from benchmarks.bench.grouping import GroupingSettings, bench_config, ratios, run_benchmark
from benchmarks.bench.vqa_set import QUESTIONS, Finding, draw_scan, write_vqa_set


def test_the_model_gives_576_image_tokens_of_clip_l_width():
    config = bench_config(vision_layers=1)
    vision = config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == config.image_seq_length == 576
    assert (vision.hidden_size, vision.num_attention_heads) == (1024, 16)


def test_the_set_is_vqa_rad_shaped(tmp_path):
    train, evaluation = write_vqa_set(tmp_path, train_images=30, eval_images=6, seed=3)
    records = json.loads(train.read_text())
    per_image = Counter(record["image"] for record in records)
    assert len(per_image) == 30 and 9 <= len(records) / 30 <= 11
    closed = sum(record["question_type"] == "closed" for record in records) / len(records)
    assert 0.45 < closed < 0.7  # VQA-RAD: ~58% closed
    held_out = {record["image"] for record in json.loads(evaluation.read_text())}
    assert len(held_out) == 6 and not held_out & set(per_image)


def test_each_answer_is_in_the_pixels():
    """The lesion is the brightest thing, on the side and in the half the answers name."""
    rng = random.Random(0)
    for finding in (Finding("left", "upper", "large"), Finding("right", "lower", "small")):
        pixels = np.asarray(draw_scan(rng, finding).convert("L"))
        rows, columns = np.nonzero(pixels > 150)
        middle = pixels.shape[0] / 2
        assert (columns.mean() < middle) == (finding.side == "left")
        assert (rows.mean() < middle) == (finding.half == "upper")
    answers = {question: answer(Finding(None)) for question, _, answer in QUESTIONS}
    assert answers["Is the scan normal?"] == "yes" and answers["Where is the lesion?"] == "none"


def test_the_benchmark_counts_the_tokens_the_data_check_counts(tmp_path, tiny_model_path):
    """Both arms train through lmmtune's stage; the tokens they train on are the data check's."""
    settings = GroupingSettings(
        train_images=3,
        eval_images=1,
        epochs=1,
        seeds=(0,),
        arms=("per-question", "grouped"),
        evaluate=False,
    )
    report = run_benchmark(settings, tmp_path, model=tiny_model_path)

    check = report["data_check"]
    per_question, grouped = report["rows"]
    assert per_question["epoch_tokens"] == check["tokens_per_question"]
    assert grouped["epoch_tokens"] <= check["tokens_grouped"] < check["tokens_per_question"]
    assert grouped["epoch_tokens"] > 0.95 * check["tokens_grouped"]  # the longest order's count
    assert grouped["steps"] == check["conversations"] == 3
    assert per_question["steps"] == -(-check["samples"] // settings.questions_per_step)
    fewer = ratios(report["arms"])["epoch_tokens"]
    assert fewer == per_question["epoch_tokens"] / grouped["epoch_tokens"] > 1
