"""`data.demo_task`: the demo's second domain asks other questions of scans drawn the same way."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from lmmtune.demo import write_demo_dataset


def test_vertical_task_asks_normal_and_top_or_bottom_where_the_lesion_is(tmp_path):
    train, evaluation = write_demo_dataset(tmp_path, 24, 0, task="vertical")
    records = json.loads(train.read_text()) + json.loads(evaluation.read_text())
    answers = {r["conversations"][1]["value"] for r in records}
    assert answers == {"normal", "abnormal", "top", "bottom"}
    for record in records:
        question, answer = (turn["value"] for turn in record["conversations"])
        if answer in ("top", "bottom"):
            assert question.endswith("Is the lesion at the top or the bottom?")
            pixels = np.asarray(Image.open(tmp_path / record["image"]).convert("L"))
            rows = np.nonzero((pixels > 200).any(axis=1))[0]  # the bright lesion's rows
            middle = pixels.shape[0] / 2
            assert (rows.max() < middle) if answer == "top" else (rows.min() > middle)


def test_the_side_task_is_the_demo_as_before(tmp_path):
    default = write_demo_dataset(tmp_path / "default", 12, 3)
    side = write_demo_dataset(tmp_path / "side", 12, 3, task="side")
    assert [p.read_text() for p in default] == [p.read_text() for p in side]
    answers = {r["conversations"][1]["value"] for r in json.loads(default[0].read_text())}
    assert answers <= {"yes", "no", "left", "right"}
