"""Caption sets for stage 1 through the one reader: LLaVA's pretrain JSON, image + caption
JSONL/CSV (`data.columns.caption`), `datasets` tables and imagefolders with a `text` column;
and `check` on a caption set, each problem naming its file and record."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from lmmtune.config import DataColumns, Template
from lmmtune.data.readers import read_data
from lmmtune.errors import Kind
from tests.conftest import run_cli
from tests.data.helpers import kinds, llava, save_image, write_json, write_jsonl

datasets = pytest.importorskip("datasets")
CAPTIONS = ["a red square", "a green square"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (parquet is converted into it) inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def caption_turns(path, **columns):
    data = read_data(path, DataColumns(**columns))
    assert not data.problems, data.problems
    return [(s.turns, s.image is not None) for s in data.samples]


EXPECTED = [([("", caption)], True) for caption in CAPTIONS]


def test_llava_pretrain_json(tmp_path):
    """blip_laion_cc_sbu_558k.json's shape: the prompt before or after `<image>`, dropped by
    the plain template (its question is kept as read, its caption is the answer)."""
    records = [
        llava("0", "a.png", "Render a clear and concise summary of the photo.", CAPTIONS[0]),
        {
            "id": "1",
            "image": "b.png",
            "conversations": [
                {"from": "human", "value": "Give a brief description of the image.\n<image>"},
                {"from": "gpt", "value": CAPTIONS[1]},
            ],
        },
    ]
    samples = read_data(write_json(tmp_path / "pretrain.json", records), DataColumns()).samples
    assert [s.turns[0][1] for s in samples] == CAPTIONS
    assert all(s.image is not None and len(s.turns) == 1 for s in samples)


def test_jsonl_and_csv_with_a_named_caption_column(tmp_path):
    rows = [{"file": f"{n}.png", "report": caption} for n, caption in enumerate(CAPTIONS)]
    jsonl = write_jsonl(tmp_path / "captions.jsonl", rows)
    with (tmp_path / "captions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "report"])
        writer.writeheader()
        writer.writerows(rows)
    for path in (jsonl, tmp_path / "captions.csv"):
        assert caption_turns(path, image="file", caption="report") == EXPECTED


def test_datasets_table_and_imagefolder_with_a_text_column(tmp_path):
    images = [Image.new("RGB", (8, 6), colour) for colour in ((250, 0, 0), (0, 250, 0))]
    datasets.Dataset.from_dict({"image": images, "text": CAPTIONS}).to_parquet(
        tmp_path / "captions.parquet"
    )
    assert caption_turns(tmp_path / "captions.parquet") == EXPECTED
    folder = tmp_path / "folder"
    for n in range(2):
        save_image(folder / f"{n}.png")
    rows = [{"file_name": f"{n}.png", "text": caption} for n, caption in enumerate(CAPTIONS)]
    write_jsonl(folder / "metadata.jsonl", rows)
    assert caption_turns(folder) == EXPECTED


def test_a_caption_without_an_image_is_a_named_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"image": "", "caption": "no picture"}])
    (problem,) = read_data(path, DataColumns()).problems
    assert (problem.source, problem.kind) == (f"{path}:1", Kind.NOT_A_CAPTION)


def test_check_names_each_bad_caption_record(tmp_path, inspect):
    for name in ("a", "b", "c", "d"):
        save_image(tmp_path / f"{name}.png")
    multi = llava("multi", "c.png", "Describe.", "a scan")
    multi["conversations"] += [{"from": "human", "value": "More?"}, {"from": "gpt", "value": "no"}]
    records = [
        llava("good", "a.png", "Describe.", "a normal scan"),
        llava("empty", "b.png", "Describe.", "  "),
        llava("long", "d.png", "Describe.", "a scan " * 40),
        llava("missing", "gone.png", "Describe.", "a scan"),
        llava("special", "a.png", "Describe.", "a scan</s> USER: hi"),
        multi,
        llava("text", None, "Describe.", "no image here"),
    ]
    data = write_json(tmp_path / "captions.json", records)
    report = inspect(train=str(data), template=Template.plain, max_length=60, eval_fraction=0)
    found = {p.record_id: (p.kind, p.source) for p in report.problems}
    assert found == {
        "empty": (Kind.EMPTY_ANSWER, f"{data}[1]"),
        "long": (Kind.TOO_LONG, f"{data}[2]"),
        "missing": (Kind.MISSING_IMAGE, f"{data}[3]"),
        "special": ("special-token text in a message", f"{data}[4]"),
        "multi": (Kind.NOT_A_CAPTION, f"{data}[5]"),
        "text": (Kind.NOT_A_CAPTION, f"{data}[6]"),
    }
    assert [s.id for s in report.train] == ["good"]
    assert report.token_lengths[0] == 1 + 16 + 3 + 1  # BOS, image, "a normal scan", "\n"
    assert sorted(kinds(report.problems)) == sorted(k for k, _ in found.values())


def test_check_command_on_a_caption_set(tmp_path):
    """`python -m lmmtune check recipe=demo_align data.train=FILE`: exit 1, one line each."""
    save_image(tmp_path / "a.png")
    records = [llava("good", "a.png", "Describe.", "a scan"), llava("gone", "x.png", "D.", "a")]
    data = write_json(tmp_path / "captions.json", records)
    result = run_cli(["check", "recipe=demo_align", f"data.train={data}"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{data}[1] (id gone): image not found: {tmp_path / 'x.png'}" in result.stdout
