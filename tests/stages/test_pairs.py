"""Preference pairs in every accepted layout, and the named problems `check` reports for them."""

from __future__ import annotations

import datasets
from PIL import Image

from lmmtune.config import DataColumns, DataConfig
from lmmtune.data.checks import inspect_data
from lmmtune.data.pairs import PairKind, as_rejected, is_pair
from lmmtune.data.readers import read_data
from lmmtune.errors import Kind
from tests.conftest import run_cli
from tests.data.helpers import chat, save_image, write_json, write_jsonl


def llava_pair(record_id, image, chosen="yes", rejected="no", question="Is there a lesion?"):
    return {
        "id": record_id,
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}],
        "chosen": chosen,
        "rejected": rejected,
    }


def test_llava_and_trl_layouts_read_as_the_same_pair(tmp_path):
    save_image(tmp_path / "a.png")
    trl_text = {
        "images": ["a.png"],
        "prompt": "Is there a lesion?",
        "chosen": "yes",
        "rejected": "no",
    }
    trl_chat = {
        "images": ["a.png"],
        "prompt": [chat("user", "Is there a lesion?", image=True)],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [chat("assistant", "no")],
    }
    path = write_jsonl(tmp_path / "pairs.jsonl", [llava_pair("x", "a.png"), trl_text, trl_chat])

    data = read_data(path, DataColumns())

    assert data.problems == []
    assert [s.turns for s in data.samples] == [[("Is there a lesion?", "yes")]] * 3
    assert [s.image for s in data.samples] == ["a.png"] * 3
    assert all(is_pair(s) for s in data.samples)
    assert [as_rejected(s).turns for s in data.samples] == [[("Is there a lesion?", "no")]] * 3
    assert data.samples[0].turns == [("Is there a lesion?", "yes")]  # as_rejected copies


def test_a_datasets_table_in_trl_layout_reads_with_its_images(tmp_path):
    image = Image.new("RGB", (16, 16), (10, 200, 10))
    table = datasets.Dataset.from_dict(
        {
            "images": [[image], [image]],
            "prompt": ["Is it green?", "Is it red?"],
            "chosen": ["yes", "no"],
            "rejected": ["no", "yes"],
        }
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    table.to_parquet(str(tmp_path / "pairs.parquet"))

    data = read_data(tmp_path / "pairs.parquet", DataColumns())

    assert data.problems == []
    assert [(s.turns[0][1], s.extra["rejected"]) for s in data.samples] == [
        ("yes", "no"),
        ("no", "yes"),
    ]
    assert all(s.image_ref is not None for s in data.samples)


def test_bad_pairs_get_named_problems(tmp_path, tiny_processor):
    save_image(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = [
        llava_pair("good", "a.png"),
        llava_pair("empty", "a.png", rejected="  "),
        llava_pair("same", "a.png", chosen="yes", rejected="yes"),
        llava_pair("eos", "a.png", chosen="yes</s>"),
        llava_pair("image", "a.png", rejected="<image> no"),
        llava_pair("gone", "missing.png"),
        llava_pair("corrupt", "broken.png"),
        llava_pair("long", "a.png", rejected="no " * 400),
    ]
    path = write_json(tmp_path / "pairs.json", records)
    cfg = DataConfig(train=str(path), eval_fraction=0.0, num_workers=0, max_length=256)

    report = inspect_data(cfg, tiny_processor, tmp_path)

    found = {p.record_id: p.kind for p in report.problems}
    assert found == {
        "empty": PairKind.EMPTY_REJECTED,
        "same": PairKind.IDENTICAL,
        "eos": PairKind.SPECIAL_TOKEN,
        "image": PairKind.SPECIAL_TOKEN,
        "gone": Kind.MISSING_IMAGE,
        "corrupt": found["corrupt"],
        "long": PairKind.TOO_LONG,
    }
    assert found["corrupt"] in (Kind.CORRUPT_IMAGE, Kind.TRUNCATED_IMAGE, Kind.NOT_AN_IMAGE)
    assert [s.id for s in report.train] == ["good"]
    by_id = {p.record_id: p for p in report.problems}
    assert by_id["eos"].source == f"{path}[3]" and "</s>" in by_id["eos"].reason
    assert "max_length=256" in by_id["long"].reason


def test_check_command_fails_on_bad_pairs_naming_file_record_and_reason(tmp_path):
    save_image(tmp_path / "a.png")
    records = [llava_pair("good", "a.png"), llava_pair("same", "a.png", "no", "no")]
    write_json(tmp_path / "pairs.json", records)

    result = run_cli(
        ["check", "recipe=demo_dpo", "data.train=pairs.json", "data.eval_fraction=0"],
        cwd=tmp_path,
    )

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pairs.json[1] (id same)" in result.stdout
    assert PairKind.IDENTICAL in result.stdout


def test_check_of_the_demo_pairs_passes(tmp_path):
    result = run_cli(["check", "recipe=demo_dpo"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "train.json" in result.stdout


def test_half_pairs_null_prompts_and_numbers_are_named_problems(tmp_path, tiny_processor):
    save_image(tmp_path / "a.png")
    no_rejected = llava_pair("no_rejected", "a.png")
    del no_rejected["rejected"]
    no_chosen = {"images": ["a.png"], "prompt": "Is there a lesion?", "rejected": "no"}
    null_prompt = {"id": "null_prompt", "images": ["a.png"], "prompt": None}
    records = [
        llava_pair("good", "a.png"),
        no_rejected,
        {**no_chosen, "id": "no_chosen"},
        {**null_prompt, "chosen": "yes", "rejected": "no"},
        llava_pair("numbers", "a.png", chosen=1, rejected=2),
    ]
    path = write_json(tmp_path / "pairs.json", records)
    cfg = DataConfig(train=str(path), eval_fraction=0.0, num_workers=0, max_length=256)

    report = inspect_data(cfg, tiny_processor, tmp_path, pairs_only=True)

    found = {p.record_id: p for p in report.problems}
    assert sorted(found) == ["no_chosen", "no_rejected", "null_prompt", "numbers"]
    assert found["no_rejected"].kind == PairKind.MISSING_ANSWER
    assert "'rejected'" in found["no_rejected"].reason
    assert found["no_chosen"].kind == PairKind.MISSING_ANSWER
    assert "'prompt'" in found["null_prompt"].reason
    assert found["numbers"].kind == PairKind.NOT_AN_ANSWER
    assert [s.id for s in report.train] == ["good"]


def test_check_refuses_an_answer_record_in_a_pairs_file_as_training_does(tmp_path):
    save_image(tmp_path / "a.png")
    sft_record = {
        "id": "sft",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nIs there a lesion?"},
            {"from": "gpt", "value": "yes"},
        ],
    }
    write_json(tmp_path / "pairs.json", [llava_pair("good", "a.png"), sft_record])

    result = run_cli(
        ["check", "recipe=demo_dpo", "data.train=pairs.json", "data.eval_fraction=0"],
        cwd=tmp_path,
    )

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pairs.json[1] (id sft)" in result.stdout
    assert PairKind.NOT_A_PAIR in result.stdout
