"""Hostile records: each one named bad record with a one-line reason, never a traceback or a leak."""

from __future__ import annotations

import json
import os
import time

import pytest
from PIL import Image

from lmmtune.config import DataColumns
from lmmtune.data.checks import resolve_images
from lmmtune.data.images import read_image_bytes
from lmmtune.data.readers import read_data
from lmmtune.errors import Kind, RecordInvalid
from tests.conftest import run_cli
from tests.data.helpers import kinds, llava, save_image, write_jsonl


def test_a_placeholder_that_appears_only_after_cleaning_is_refused(tmp_path):
    save_image(tmp_path / "a.png")
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [llava("ok", "a.png"), llava("hidden", "a.png", question="<im<image>age> What?")],
    )
    data = read_data(path, DataColumns())
    assert [s.id for s in data.samples] == ["ok"]
    (bad,) = data.problems
    assert bad.kind == Kind.PLACEHOLDER_MISMATCH and "once its placeholder is removed" in bad.reason
    assert "<image>" not in data.samples[0].turns[0][0]  # what is tokenized holds no placeholder


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_a_deeply_nested_record_is_one_bad_record(tmp_path, suffix):
    deep = {"id": "deep", "conversations": [{"from": "human", "value": "[" * 0}]}
    deep_text = json.dumps(deep)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    good = [json.dumps(llava(f"g{i}", None, "Q?", "A")) for i in range(2)]
    path = tmp_path / f"train.{suffix}"
    if suffix == "json":
        path.write_text(f"[{good[0]}, {deep_text}, {good[1]}]")
    else:
        path.write_text("\n".join([good[0], deep_text, good[1]]) + "\n")
    data = read_data(path, DataColumns())
    assert [s.id for s in data.samples] == ["g0", "g1"]
    (bad,) = data.problems
    assert bad.kind == Kind.TOO_DEEP
    assert bad.source == (f"{path}[1]" if suffix == "json" else f"{path}:2")


def test_an_image_name_longer_than_the_filesystem_allows_is_one_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [llava("long", "x" * 5000 + ".png")])
    data = read_data(path, DataColumns())
    (bad,) = resolve_images(data.samples, tmp_path)
    assert bad.kind == Kind.MISSING_IMAGE and "File name too long" in bad.reason
    assert len(bad.reason) < 300


def test_symlinks_are_resolved_before_the_root_check(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    save_image(outside / "o.png")
    save_image(root / "real" / "r.png")
    os.symlink("/etc/passwd", root / "passwd.png")
    os.symlink(outside, root / "linked")
    os.symlink(root / "real", root / "inner")  # a link that stays inside the root: fine
    records = [
        llava("passwd", "passwd.png"),
        llava("linked", "linked/o.png"),
        llava("inner", "inner/r.png"),
    ]
    data = read_data(write_jsonl(tmp_path / "t.jsonl", records), DataColumns())
    problems = resolve_images(data.samples, root)
    assert sorted((p.record_id, p.kind) for p in problems) == [
        ("linked", Kind.PATH_ESCAPES_ROOT),
        ("passwd", Kind.PATH_ESCAPES_ROOT),
    ]
    assert data.samples[2].image == str(root / "real" / "r.png")
    # the documented way to allow a linked folder: a root that holds where it points
    data.samples[1].image = "root/linked/o.png"
    assert resolve_images([data.samples[1]], tmp_path) == []
    assert data.samples[1].image == str(outside / "o.png")


def test_a_non_image_file_is_never_quoted(tmp_path):
    secret = tmp_path / "notes.png"
    secret.write_text("API_KEY=verysecretvalue\n")
    with pytest.raises(RecordInvalid) as error:
        read_image_bytes(secret)
    assert error.value.kind == Kind.NOT_AN_IMAGE and "verysecret" not in error.value.reason
    assert "API_KEY" not in error.value.reason


def test_an_image_file_is_not_read_whole_before_its_header_is_checked(tmp_path):
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:  # 64 GiB, sparse: reading it whole would never finish
        handle.truncate(64 << 30)
    started = time.monotonic()
    with pytest.raises(RecordInvalid, match="not an image file"):
        read_image_bytes(huge)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("anim.gif", {"save_all": True}),
        ("pages.tiff", {"save_all": True}),
        ("anim.webp", {"save_all": True}),
    ],
)
def test_multi_frame_images_are_refused_like_multi_frame_dicom(tmp_path, name, options):
    from lmmtune.data.images import inspect_image

    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / name, append_images=frames[1:], **options)
    with pytest.raises(RecordInvalid, match="3 frames") as error:
        inspect_image(tmp_path / name)
    assert error.value.kind == Kind.UNSUPPORTED_IMAGE
    save_image(tmp_path / "single.gif")
    inspect_image(tmp_path / "single.gif")  # one frame: fine


def test_lists_and_numbers_where_text_is_expected_are_invalid(tmp_path):
    records = [
        {"question": ["a", "b"], "answer": "yes"},
        {"question": "Q?", "answer": 42},
        {
            "id": "c",
            "conversations": [{"from": "human", "value": {"t": 1}}, {"from": "gpt", "value": "A"}],
        },
        {"question": "Q?", "answer": "fine"},
    ]
    data = read_data(write_jsonl(tmp_path / "t.jsonl", records), DataColumns())
    assert kinds(data.problems) == [Kind.NOT_TEXT] * 3
    assert "'question' is a list, expected text" in data.problems[0].reason
    assert "'answer' is a int, expected text" in data.problems[1].reason
    assert [s.turns for s in data.samples] == [[("Q?", "fine")]]


def test_a_parquet_column_of_lists_is_invalid_not_its_string_form(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"question": [["x", "y"], ["Q?"]], "answer": ["a", "b"]})
    table.to_parquet(str(tmp_path / "t.parquet"))
    data = read_data(tmp_path / "t.parquet", DataColumns())
    assert kinds(data.problems) == [Kind.NOT_TEXT, Kind.NOT_TEXT]


def test_text_far_past_max_length_is_refused_without_tokenizing(tiny_processor):
    from lmmtune.data.checks import check_lengths
    from lmmtune.data.records import Sample

    samples = [
        Sample(id="huge", turns=[("q" * 21_000_000, "a")], source="t.jsonl:1"),
        Sample(id="ok", turns=[("What is it?", "a")], source="t.jsonl:2"),
    ]
    started = time.monotonic()
    problems, lengths, _ = check_lengths(samples, tiny_processor, max_length=256)
    assert time.monotonic() - started < 10
    (bad,) = problems
    assert bad.record_id == "huge" and "refused without tokenizing" in bad.reason
    assert lengths[0] == 257 and lengths[1] < 256


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_check_cli_names_each_hostile_record_without_a_traceback(tmp_path):
    save_image(tmp_path / "a.png")
    os.symlink("/etc/passwd", tmp_path / "p.png")
    records = [
        llava("good", "a.png"),
        llava("long", "y" * 4000 + ".png"),
        llava("link", "p.png"),
        {"question": [1, 2], "answer": "x"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with path.open("a") as handle:
        handle.write('{"x": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    for on_error in ("fail", "skip"):
        result = run_cli(
            [
                "check",
                "model=tiny",
                f"data.train={path}",
                "data.eval_fraction=0",
                f"data.on_error={on_error}",
            ],
            cwd=tmp_path,
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "4 invalid record(s) of 5" in result.stderr
        assert "root:" not in result.stdout  # /etc/passwd never quoted
