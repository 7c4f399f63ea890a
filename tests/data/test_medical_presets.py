"""`data=vqa_rad|slake|pathvqa`: the public medical VQA sets as Hydra presets, read offline
from local replicas of each set's published schema (Hub layout, column names, the datasets
Image feature, split names), from the hub cache, or refused with the download hint."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lmmtune.data.batches import load_sample_image
from lmmtune.data.checks import inspect_data
from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.readers import Source, read_data
from lmmtune.errors import LmmtuneError
from lmmtune.eval.metrics import is_closed
from tests.conftest import compose_config

datasets = pytest.importorskip("datasets")

PUBLISHED = {
    # preset: (Hub id, its splits as the dataset card lists them, train shards on the Hub)
    "vqa_rad": ("flaviagiammarino/vqa-rad", ("train", "test"), 1),
    "slake": ("mdwiratathya/SLAKE-vqa-english", ("train", "validation", "test"), 2),
    "pathvqa": ("flaviagiammarino/path-vqa", ("train", "validation", "test"), 1),
}
QUESTIONS = [
    ("Is there a pneumothorax?", "no"),
    ("Which organ is abnormal?", "left lung"),
    ("Is this a CT scan?", "yes"),
    ("What modality is used?", "mri"),
]
IMAGES_PER_SPLIT = {"train": 3, "validation": 1, "test": 2}
"""Replica sizes: images per split, each asked every question of QUESTIONS."""


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """The datasets cache (where parquet splits are converted) inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def colour(split: str, image: int) -> tuple[int, int, int]:
    return (40 + 60 * image, {"train": 0, "validation": 100, "test": 200}[split], 90)


def png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), rgb).save(buffer, "PNG")
    return buffer.getvalue()


def write_replica(root: Path, splits: tuple[str, ...], train_shards: int) -> Path:
    """A folder as `hf download --repo-type dataset` writes it for these sets: a card whose
    YAML lists the features and splits, and `data/{split}-0000i-of-0000n.parquet` files
    with the columns image (datasets Image feature), question and answer."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    card_splits = []
    for split in splits:
        rows = [
            ({"bytes": png(colour(split, image)), "path": None}, question, answer)
            for image in range(IMAGES_PER_SPLIT[split])
            for question, answer in QUESTIONS
        ]
        shards = train_shards if split == "train" else 1
        for shard in range(shards):
            part = rows[shard::shards]
            table = datasets.Dataset.from_dict(
                {key: [row[i] for row in part] for i, key in enumerate(features)}, features=features
            )
            (root / "data").mkdir(parents=True, exist_ok=True)
            table.to_parquet(root / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet")
        card_splits.append(
            {"name": split, "num_bytes": 1000 * len(rows), "num_examples": len(rows)}
        )
    info = {
        "features": [{"name": "image", "dtype": "image"}]
        + [{"name": n, "dtype": "string"} for n in ("question", "answer")],
        "splits": card_splits,
    }
    (root / "README.md").write_text(f"---\ndataset_info: {json.dumps(info)}\n---\n# replica\n")
    return root


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_names_the_hub_set_its_columns_splits_and_grouping(preset):
    hub_id, splits, _ = PUBLISHED[preset]
    data = compose_config(["recipe=medical", f"data={preset}"]).data
    assert (data.train, data.train_split, data.eval, data.eval_split) == (
        hub_id,
        "train",
        None,
        "test",
    )
    assert (data.columns.image, data.columns.question, data.columns.answer) == (
        "image",
        "question",
        "answer",
    )
    assert data.group_by_image is True and data.max_length == 2048  # the recipe's, kept
    assert data.eval_split in splits


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_reads_a_replica_of_the_published_set(preset, tmp_path, tiny_processor):
    hub_id, splits, shards = PUBLISHED[preset]
    replica = write_replica(tmp_path / hub_id.split("/")[1], splits, shards)
    cfg = compose_config(
        ["recipe=medical", f"data={preset}", f"data.train={replica}", "data.num_workers=0"]
    )
    report = inspect_data(cfg.data, tiny_processor, tmp_path / "run")

    per_image = len(QUESTIONS)
    train_rows, test_rows = (IMAGES_PER_SPLIT[s] * per_image for s in ("train", "test"))
    assert report.files == [
        ("train", f"{replica}:train", train_rows),
        ("eval", f"{replica}:test", test_rows),
    ]
    assert report.problems == [] and report.eval_from == "data.eval_split=test"
    assert (len(report.train), len(report.eval)) == (train_rows, test_rows)
    assert report.eval[0].source == f"{replica}:test[0]"
    # The Image feature's bytes decode to the image of that row (every shard read, in order).
    shown = {load_sample_image(s, DEFAULT_MAX_PIXELS).getpixel((0, 0)) for s in report.train}
    assert shown == {colour("train", image) for image in range(IMAGES_PER_SPLIT["train"])}
    # Closed (yes/no) and open questions, decided from the answer as eval scores them.
    closed = Counter(is_closed(s.turns[0][1], s.question_type) for s in report.eval)
    expected = sum(answer in ("yes", "no") for _, answer in QUESTIONS) * IMAGES_PER_SPLIT["test"]
    assert closed == {True: expected, False: test_rows - expected}
    # Grouped by image: one conversation per training image, all its questions as turns.
    grouping = report.grouping
    assert report.group_by_image and grouping.samples == train_rows
    assert [c.turns for c in grouping.conversations] == [per_image] * IMAGES_PER_SPLIT["train"]
    assert grouping.tokens_after < grouping.tokens_before


def test_a_dataset_id_is_read_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub

    hub_id, splits, shards = PUBLISHED["vqa_rad"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"datasets--{hub_id.replace('/', '--')}"
    write_replica(repo / "snapshots" / commit, splits, shards)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    data = read_data(Source(hub_id, "test", "data.train", "data.eval_split"), _columns())
    assert data.path == f"{hub_id}:test" and len(data.samples) == 2 * len(QUESTIONS)
    assert data.samples[0].source == f"{hub_id}:test[0]"


def test_split_errors_name_the_setting_and_the_splits(tmp_path):
    replica = write_replica(tmp_path / "vqa-rad", ("train", "test"), 1)
    with pytest.raises(LmmtuneError) as unknown:
        read_data(Source(str(replica), "validation", "data.train", "data.eval_split"), _columns())
    assert str(unknown.value) == (
        f"{replica} has no split 'validation' (splits: train, test): choose one with "
        "data.eval_split=NAME"
    )
    (tmp_path / "train.jsonl").write_text('{"image": null, "question": "Q?", "answer": "yes"}\n')
    with pytest.raises(LmmtuneError) as one_table:
        read_data(
            Source(str(tmp_path / "train.jsonl"), "test", "data.train", "data.eval_split"),
            _columns(),
        )
    assert str(one_table.value) == (
        f"data.eval_split=test: {tmp_path / 'train.jsonl'} holds one table, not splits "
        "(data.eval_split=null evaluates on data.eval whole, or on data.eval_fraction of data.train)"
    )


def test_a_missing_data_file_is_not_taken_for_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmmtuneError, match=r"^data file not found: data/train.json$"):
        read_data("data/train.json", _columns())


def test_a_copy_that_differs_from_its_card_is_refused_in_one_line(tmp_path):
    replica = write_replica(tmp_path / "vqa-rad", ("train", "test"), 1)
    card = (replica / "README.md").read_text()
    (replica / "README.md").write_text(card.replace('"num_examples": 12', '"num_examples": 1793'))
    with pytest.raises(LmmtuneError) as error:
        read_data(Source(str(replica), "train"), _columns())
    assert str(error.value) == (
        f"{replica}: its files do not hold the rows its dataset card (README.md) lists per "
        "split: the copy is incomplete or changed; download it again"
    )


def test_evaluating_on_the_training_split_is_refused_at_composition():
    from lmmtune.validate import training_data

    cfg = compose_config(["data=vqa_rad", "data.eval_split=train"])
    assert list(training_data(cfg)) == [
        "data.eval_split=train is data.train_split too: the model would be evaluated on what "
        "it trained on; choose another split (e.g. test)"
    ]


def test_the_mlflow_dataset_names_the_hub_id_and_split(tmp_path):
    from lmmtune.tracking.mlflow_run import dataset_input

    hub = dataset_input("train", "flaviagiammarino/vqa-rad:train", "d1")._to_mlflow_entity()
    assert hub.source_type == "hugging_face"
    source = json.loads(hub.source)
    assert (source["path"], source["split"]) == ("flaviagiammarino/vqa-rad", "train")
    copy = tmp_path / "vqa-rad"
    copy.mkdir()
    local = dataset_input("eval", f"{copy}:test", "d2")._to_mlflow_entity()
    assert json.loads(local.source)["uri"] == str(copy.resolve())


def test_offline_a_preset_stops_with_the_download_hint(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from lmmtune.cli import BAR_SWITCHES, COMMANDS, run_command

    # run_command sets up the CLI's logging on this test's stderr: undo it afterwards
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    for switch in BAR_SWITCHES:
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config(["recipe=medical", "data=vqa_rad", "model.path=tiny"])
    with pytest.raises(SystemExit) as stopped:
        run_command(COMMANDS["check"], cfg)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "lmmtune check: error: could not load dataset 'flaviagiammarino/vqa-rad': it is not a "
        "local path and the Hugging Face Hub could not be reached (offline?). Download it "
        "where there is internet, e.g.",
        "  hf download flaviagiammarino/vqa-rad --repo-type dataset --local-dir /path/to/vqa-rad",
        "then point lmmtune at the copy: data.train=/path/to/vqa-rad",
    ]


def _columns():
    from lmmtune.config import DataColumns

    return DataColumns()
