"""Text formats and record shapes: every bad record is named by file, record, id and reason."""

from __future__ import annotations

import pytest

from lmmtune.config import DataColumns
from lmmtune.data.readers import read_data
from lmmtune.errors import Kind, LmmtuneError
from tests.data.helpers import chat, kinds, llava, save_image, write_json, write_jsonl

COLUMNS = DataColumns()


def _conversation(*messages):
    return {"id": "bad", "conversations": [{"from": f, "value": v} for f, v in messages]}


BAD_RECORDS = {
    "no conversations": (
        {"id": "bad", "image": "a.png", "label": "x"},  # (a caption column is a caption record)
        Kind.NO_CONVERSATIONS,
        "no 'conversations' or 'messages' list, no 'question'/'answer' fields and no 'caption'",
    ),
    "empty conversations": ({"id": "bad", "conversations": []}, Kind.NO_CONVERSATIONS, "empty"),
    "empty answer": (
        _conversation(("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "  ")),
        Kind.EMPTY_ANSWER,
        "empty answer (message 3)",
    ),
    "roles out of order": (
        _conversation(("gpt", "A"), ("human", "Q")),
        Kind.ROLES_OUT_OF_ORDER,
        "message 0 is from 'gpt', expected 'human'",
    ),
    "question without answer": (
        _conversation(("human", "Q1"), ("gpt", "A1"), ("human", "Q2")),
        Kind.ROLES_OUT_OF_ORDER,
        "the last message (2) is a question without an answer",
    ),
    "two placeholders, one image": (
        {**_conversation(("human", "<image>\n<image>\nQ"), ("gpt", "A")), "image": "a.png"},
        Kind.PLACEHOLDER_MISMATCH,
        "2 '<image>' placeholder(s) for 1 image(s)",
    ),
    "image without placeholder": (
        {**_conversation(("human", "Q"), ("gpt", "A")), "image": "a.png"},
        Kind.PLACEHOLDER_MISMATCH,
        "0 '<image>' placeholder(s) for 1 image(s)",
    ),
    "placeholder without image": (
        _conversation(("human", "<image>\nQ"), ("gpt", "A")),
        Kind.PLACEHOLDER_MISMATCH,
        "1 '<image>' placeholder(s) for 0 image(s)",
    ),
    "two images": (
        {**_conversation(("human", "<image>\n<image>\nQ"), ("gpt", "A")), "image": ["a", "b"]},
        Kind.MULTIPLE_IMAGES,
        "2 images in one record: LLaVA 1.5 takes one image per sample",
    ),
    "not an object": (["a", "list"], Kind.NOT_A_RECORD, "expected an object, got list"),
    "chat: system message": (
        {"id": "bad", "messages": [{"role": "system", "content": "Be brief."}]},
        Kind.ROLES_OUT_OF_ORDER,
        "message 0 is a system message",
    ),
    "chat: unknown content part": (
        {
            "id": "bad",
            "messages": [
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": "A"},
            ],
        },
        Kind.NO_CONVERSATIONS,
        "message 0: a content part of type 'video', expected 'text' or 'image'",
    ),
    "chat: image part without an image": (
        {"id": "bad", "messages": [chat("user", "Q", image=True), chat("assistant", "A")]},
        Kind.PLACEHOLDER_MISMATCH,
        "1 '<image>' placeholder(s) for 0 image(s)",
    ),
    "chat: roles out of order": (
        {"id": "bad", "messages": [chat("assistant", "A"), chat("user", "Q")]},
        Kind.ROLES_OUT_OF_ORDER,
        "message 0 is from 'assistant', expected 'human'",
    ),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_record_is_named_with_file_index_id_and_reason(case, tmp_path):
    record, kind, reason = BAD_RECORDS[case]
    save_image(tmp_path / "ok.png")
    path = write_json(tmp_path / "train.json", [llava("good", "ok.png"), record])

    data = read_data(path, COLUMNS)

    assert [s.id for s in data.samples] == ["good"]
    assert len(data.problems) == 1
    problem = data.problems[0]
    assert (problem.kind, problem.source) == (kind, f"{path}[1]")
    assert problem.record_id == (None if case == "not an object" else "bad")
    assert reason in problem.reason


def test_multi_turn_and_text_only_records_are_read(tmp_path):
    multi = _conversation(
        ("human", "<image>\nQ1"), ("gpt", "A1"), ("user", "Q2"), ("assistant", "A2")
    )
    path = write_json(tmp_path / "t.json", [{**multi, "image": "x.png"}, llava("t", None)])
    first, second = read_data(path, COLUMNS).samples
    assert first.turns == [("Q1", "A1"), ("Q2", "A2")] and first.image == "x.png"
    assert second.image is None and second.turns == [("Is there a lesion?", "yes")]


def test_chat_messages_records_as_trl_and_hf_vlm_sets_write_them(tmp_path):
    record = {
        "id": "c1",
        "images": ["x.png"],
        "messages": [
            chat("user", "What is shown?", image=True),
            chat("assistant", "A lesion."),
            {"role": "user", "content": "Where?"},  # plain-string content
            chat("assistant", "Upper left."),
        ],
    }
    text_only = {"messages": [chat("user", "Hi"), chat("assistant", "Hello")]}
    path = write_jsonl(tmp_path / "chat.jsonl", [record, text_only])
    data = read_data(path, COLUMNS)
    assert data.problems == []
    first, second = data.samples
    assert first.turns == [("What is shown?", "A lesion."), ("Where?", "Upper left.")]
    assert first.image == "x.png" and first.id == "c1"
    assert second.image is None and second.turns == [("Hi", "Hello")]


def test_invalid_json_names_the_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n {"id": "1", "conversations": []},\n {"id": "2" "conversations": []}\n]')
    with pytest.raises(LmmtuneError) as error:
        read_data(path, COLUMNS)
    assert str(error.value) == (
        f"{path}:3: invalid JSON at line 3, column 13: Expecting ',' delimiter"
    )


def test_json_lines_in_a_json_file_get_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "train.json", [llava("1", None), llava("2", None)])
    with pytest.raises(LmmtuneError, match=r"Extra data \(one record per line\? name the file"):
        read_data(path, COLUMNS)


def test_invalid_jsonl_line_is_one_bad_record_with_its_line_number(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [llava("1", None)])
    path.write_text(path.read_text() + '{"id": "2", "conversations": [\n\n' + path.read_text())
    data = read_data(path, COLUMNS)
    assert len(data.samples) == 2
    assert [(p.kind, p.source) for p in data.problems] == [(Kind.INVALID_JSON, f"{path}:2")]
    assert data.problems[0].reason.startswith("invalid JSON: Expecting")


def test_non_utf8_text_names_the_line_and_byte(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"id": "1"}\n{"id": "caf\xe9"}\n')  # Latin-1 e-acute
    with pytest.raises(LmmtuneError) as error:
        read_data(path, COLUMNS)
    assert str(error.value) == (
        f"{path}:2: not UTF-8 text (byte 23: b'\\xe9'); save the file as UTF-8"
    )


def test_flat_jsonl_with_configured_columns(tmp_path):
    columns = DataColumns(image="img", question="q", answer="a", id="key", question_type="qt")
    rows = [
        {"key": 7, "img": "s.png", "q": "Is it normal?", "a": "no", "qt": "closed"},
        {"key": 8, "img": "", "q": "Define edema.", "a": "Swelling."},
        {"key": 9, "img": "s.png", "q": "Any lesion?", "a": ""},
    ]
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    data = read_data(path, columns)
    first, second = data.samples
    assert (first.id, first.image, first.turns, first.question_type) == (
        "7",
        "s.png",
        [("Is it normal?", "no")],
        "closed",
    )
    assert second.image is None and second.question_type is None
    assert [(p.source, p.record_id, p.kind, p.reason) for p in data.problems] == [
        (f"{path}:3", "9", Kind.EMPTY_ANSWER, "empty 'a'")
    ]


def test_csv_with_configured_columns_bom_and_multiline_cells(tmp_path):
    path = tmp_path / "vqa.csv"
    text = 'file,prompt,reply\ns1.png,"Is there\na lesion?",yes\ns2.png,Which side?,\n,Hi?,Hello\n'
    path.write_text("\ufeff" + text, encoding="utf-8")  # Excel writes a BOM
    columns = DataColumns(image="file", question="prompt", answer="reply")
    data = read_data(path, columns)
    assert [(s.source, s.image, s.turns) for s in data.samples] == [
        (f"{path}:2", "s1.png", [("Is there\na lesion?", "yes")]),
        (f"{path}:5", None, [("Hi?", "Hello")]),
    ]
    assert [(p.source, p.kind) for p in data.problems] == [(f"{path}:4", Kind.EMPTY_ANSWER)]


def test_csv_without_the_answer_column_says_which_setting_names_it(tmp_path):
    path = tmp_path / "vqa.csv"
    path.write_text("image,question,label\na.png,Q,A\n")
    with pytest.raises(LmmtuneError) as error:
        read_data(path, COLUMNS)
    assert str(error.value) == (
        f"{path}: no 'answer' column (columns: image, question, label); "
        "name it with data.columns.answer=COLUMN"
    )


def test_csv_without_an_image_column_is_text_only_with_a_warning(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nQ,A\n")
    data = read_data(path, COLUMNS)
    assert data.samples[0].image is None
    assert kinds(data.warnings) == [Kind.NO_IMAGE_COLUMN]


def test_duplicate_ids_are_warned_with_both_places_and_still_train(tmp_path, inspect):
    save_image(tmp_path / "a.png")
    path = write_json(
        tmp_path / "train.json",
        [llava("x", "a.png"), llava("y", None), llava("x", None, "Other?")],
    )
    report = inspect(train=str(path), eval_fraction=0.0)
    assert report.problems == []
    assert [(w.kind, w.source, w.reason) for w in report.warnings] == [
        (Kind.DUPLICATE_ID, f"{path}[2]", f"duplicate id 'x' (first at {path}[0])")
    ]
    assert len(report.train) == 3
