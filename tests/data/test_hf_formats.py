"""Hugging Face datasets: save_to_disk, parquet, arrow, imagefolder; images as objects, bytes, paths."""

from __future__ import annotations

import io
import json
import pickle

import pytest
from PIL import Image

from lmmtune.config import DataColumns
from lmmtune.data.batches import PaddingCollator, SupervisedDataset, load_sample_image
from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.readers import Source, TableImage, read_data
from lmmtune.errors import Kind, LmmtuneError
from tests.data.helpers import chat, save_image

datasets = pytest.importorskip("datasets")
COLUMNS = DataColumns()
COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (parquet is converted into it) inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _images():
    return [Image.new("RGB", (8, 6), colour) for colour in COLOURS]


def _table(images, **extra):
    return datasets.Dataset.from_dict(
        {
            "image": images,
            "question": ["What colour is it?"] * len(images),
            "answer": ["red", "green", "blue"][: len(images)],
            **extra,
        }
    )


def _colours(samples):
    return [load_sample_image(s, DEFAULT_MAX_PIXELS).getpixel((0, 0)) for s in samples]


def test_save_to_disk_with_decoded_images_reads_them_lazily(tmp_path):
    _table(_images()).save_to_disk(tmp_path / "ds")
    data = read_data(tmp_path / "ds", COLUMNS)
    assert data.problems == [] and len(data.samples) == 3
    sample = data.samples[1]
    assert isinstance(sample.image_ref, TableImage)
    assert sample.image == f"{tmp_path / 'ds'}[1]:image"
    assert sample.turns == [("What colour is it?", "green")]
    assert _colours(data.samples) == COLOURS
    # A DataLoader worker started with spawn gets the sample pickled: the table goes by path.
    assert len(pickle.dumps(sample)) < 4000
    assert (
        load_sample_image(pickle.loads(pickle.dumps(sample)), DEFAULT_MAX_PIXELS).getpixel((0, 0))
        == COLOURS[1]
    )


def test_parquet_with_bytes_dicts_and_an_id_column(tmp_path):
    encoded = []
    for image in _images():
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    _table(encoded, id=["a", "b", "c"]).to_parquet(tmp_path / "train.parquet")
    data = read_data(tmp_path / "train.parquet", COLUMNS)
    assert [s.id for s in data.samples] == ["a", "b", "c"]
    assert _colours(data.samples) == COLOURS


def test_arrow_file_and_glob_of_parquet_shards(tmp_path):
    _table(_images()).save_to_disk(tmp_path / "ds")
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    assert _colours(read_data(arrow, COLUMNS).samples) == COLOURS
    for shard in range(2):
        _table(_images()[:2]).to_parquet(tmp_path / f"train-{shard:05d}.parquet")
    data = read_data(str(tmp_path / "train-*.parquet"), COLUMNS)
    assert [s.source for s in data.samples][-1] == f"{tmp_path / 'train-*.parquet'}[3]"
    assert _colours(data.samples) == COLOURS[:2] * 2


def test_path_column_resolves_against_the_dataset_folder(tmp_path, inspect):
    folder = tmp_path / "ds"
    for index, colour in enumerate(COLOURS):
        save_image(folder / "img" / f"{index}.png", colour=colour)
    _table([f"img/{i}.png" for i in range(3)]).save_to_disk(folder)
    report = inspect(train=str(folder), eval_fraction=0.0)
    assert report.problems == []
    assert [s.image for s in report.train] == [str(folder / "img" / f"{i}.png") for i in range(3)]
    assert all(s.image_ref is None for s in report.train)


def test_llava_rows_in_parquet(tmp_path):
    buffer = io.BytesIO()
    _images()[0].save(buffer, "PNG")
    rows = {
        "id": ["x"],
        "image": [{"bytes": buffer.getvalue(), "path": "scan.png"}],
        "conversations": [
            [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
        ],
    }
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "llava.parquet")
    (sample,) = read_data(tmp_path / "llava.parquet", COLUMNS).samples
    assert sample.turns == [("Colour?", "red")]
    assert sample.image_ref.read()[1] == "scan.png"
    assert _colours([sample]) == COLOURS[:1]


def test_chat_messages_with_an_images_column_as_trl_vlm_sets(tmp_path):
    """The layout of e.g. HuggingFaceH4/llava-instruct-mix-vsft: `messages` + `images` (a list)."""
    messages = [
        [chat("user", "What colour is it?", image=True), chat("assistant", answer)]
        for answer in ("red", "green", "blue")
    ]
    table = datasets.Dataset.from_dict(
        {"messages": messages, "images": [[image] for image in _images()]},
        features=datasets.Features(
            {
                "messages": [
                    {
                        "role": datasets.Value("string"),
                        "content": [
                            {"type": datasets.Value("string"), "text": datasets.Value("string")}
                        ],
                    }
                ],
                "images": datasets.Sequence(datasets.Image()),
            }
        ),
    )
    table.save_to_disk(tmp_path / "ds")
    data = read_data(tmp_path / "ds", COLUMNS)
    assert data.problems == [] and data.warnings == []
    assert [s.turns for s in data.samples] == [
        [("What colour is it?", a)] for a in ("red", "green", "blue")
    ]
    assert isinstance(data.samples[0].image_ref, TableImage)
    assert _colours(data.samples) == COLOURS


def test_imagefolder_with_metadata_jsonl(tmp_path):
    folder = tmp_path / "folder"
    for index, colour in enumerate(COLOURS):
        save_image(folder / f"{index}.jpg", colour=colour, quality=100)
    rows = [{"file_name": f"{i}.jpg", "question": "Colour?", "answer": "c"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = read_data(folder, COLUMNS)
    assert data.image_root == folder
    assert [s.source for s in data.samples] == [
        f"{folder / 'metadata.jsonl'}:{i}" for i in (1, 2, 3)
    ]
    assert [s.image for s in data.samples] == ["0.jpg", "1.jpg", "2.jpg"]


def test_parquet_of_an_imagefolder_by_datasets_to_parquet_holds_absolute_paths(tmp_path, inspect):
    folder = tmp_path / "folder"
    for index, colour in enumerate(COLOURS):
        save_image(folder / f"{index}.png", colour=colour)
    rows = [{"file_name": f"{i}.png", "question": "Colour?", "answer": "c"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf_cache")
    )
    loaded.to_parquet(tmp_path / "elsewhere" / "train.parquet")  # paths, not bytes, inside
    report = inspect(train=str(tmp_path / "elsewhere" / "train.parquet"), eval_fraction=0.0)
    assert report.problems == []
    assert sorted(s.image for s in report.train) == [str(folder / f"{i}.png") for i in range(3)]
    assert sorted(_colours(report.train)) == sorted(COLOURS)


def test_bad_image_bytes_in_a_table_are_named_by_row(tmp_path, inspect):
    table = _table([{"bytes": b"not an image at all", "path": "x.png"}], id=["broken"])
    table.save_to_disk(tmp_path / "ds")
    report = inspect(train=str(tmp_path / "ds"))
    assert [(p.kind, p.source, p.record_id) for p in report.problems] == [
        (Kind.NOT_AN_IMAGE, f"{tmp_path / 'ds'}[0]", "broken")
    ]
    assert report.problems[0].reason.startswith("not an image file: x.png")


def test_dataset_dict_folder_reads_the_chosen_split_and_names_the_others(tmp_path):
    datasets.DatasetDict(
        {"train": _table(_images()), "test": _table(_images()[:2], id=["t0", "t1"])}
    ).save_to_disk(tmp_path / "dd")
    test = read_data(Source(str(tmp_path / "dd"), "test", "data.eval", "data.eval_split"), COLUMNS)
    assert [s.id for s in test.samples] == ["t0", "t1"] and test.path == f"{tmp_path / 'dd'}:test"
    assert _colours(test.samples) == COLOURS[:2]
    with pytest.raises(LmmtuneError) as error:
        read_data(tmp_path / "dd", COLUMNS)
    assert str(error.value) == (
        f"{tmp_path / 'dd'} holds several splits (splits: test, train): choose one with "
        "data.train_split=NAME"
    )


def test_dataloader_workers_decode_table_images(tmp_path, tiny_processor):
    from torch.utils.data import DataLoader

    _table(_images()).save_to_disk(tmp_path / "ds")
    samples = read_data(tmp_path / "ds", COLUMNS).samples
    loader = DataLoader(
        SupervisedDataset(samples, tiny_processor, 512, DEFAULT_MAX_PIXELS),
        batch_size=3,
        num_workers=2,
        collate_fn=PaddingCollator(tiny_processor.tokenizer.pad_token_id),
    )
    (batch,) = list(loader)
    assert tuple(batch["pixel_values"].shape) == (3, 3, 56, 56)
    # Red, green, blue images: the channel that is brightest differs per sample.
    assert batch["pixel_values"].mean(dim=(2, 3)).argmax(dim=1).tolist() == [0, 1, 2]
