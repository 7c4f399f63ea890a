"""The Vicuna v1 prompt and its label mask, token by token."""

from __future__ import annotations

import pytest

from lmmtune.data.batches import SupervisedDataset, image_token_count
from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.prompt import IGNORE_INDEX, SYSTEM_PROMPT, render_conversation, render_prompt
from lmmtune.data.records import Sample

TURNS = [
    ("Is there a lesion?", "yes"),
    ("Which side is the lesion on?", "left"),
    ("Is it round?", "It is round."),
]


def test_render_matches_llava_v1_format():
    rendered = render_conversation(TURNS[:2], has_image=True, image_tokens="<image>")
    assert rendered.text == (
        f"{SYSTEM_PROMPT} USER: <image>\nIs there a lesion? ASSISTANT: yes</s>"
        "USER: Which side is the lesion on? ASSISTANT: left</s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == [" yes</s>", " left</s>"]


def test_generation_prompt_ends_at_assistant():
    prompt = render_prompt("Is it round?", True, "<image>", history=TURNS[:1])
    assert prompt.endswith("USER: Is it round? ASSISTANT:")
    assert "<image>\nIs there a lesion? ASSISTANT: yes</s>" in prompt


def test_image_tokens_follow_the_processor(tiny_processor):
    # 56 px / 14 px patches = 16 patches, +1 CLS, -1 dropped by the "default" strategy.
    assert image_token_count(tiny_processor) == 16


@pytest.fixture()
def image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "scan.png"
    Image.new("RGB", (40, 20), (10, 10, 10)).save(path)
    return path


def test_only_answers_and_their_eos_carry_labels_multi_turn(tiny_processor, image_file):
    sample = Sample(id="1", turns=TURNS, image=str(image_file), source="t")
    item = SupervisedDataset([sample], tiny_processor, 512, DEFAULT_MAX_PIXELS)[0]
    tokenizer = tiny_processor.tokenizer
    labelled = [
        tokenizer.decode([t])
        for t, label in zip(item["input_ids"], item["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    expected = []
    for _, answer in TURNS:
        expected += [
            tokenizer.decode([t])
            for t in tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"]
        ]
    assert labelled == expected
    # Labels equal the input ids where set; BOS, system line, questions and image are masked.
    ids, labels = item["input_ids"], item["labels"]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    assert labels[0] == IGNORE_INDEX and ids[0] == tokenizer.bos_token_id
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 16
    assert all(
        label == IGNORE_INDEX for token, label in zip(ids, labels, strict=True) if token == image_id
    )
    assert labels.count(tokenizer.eos_token_id) == len(TURNS)
    assert item["pixel_values"].shape == (3, 56, 56)


def test_text_only_sample_has_no_image_tokens(tiny_processor):
    item = SupervisedDataset(
        [Sample(id="t", turns=TURNS[:1], source="t")], tiny_processor, 512, DEFAULT_MAX_PIXELS
    )[0]
    assert "pixel_values" not in item
    assert tiny_processor.tokenizer.convert_tokens_to_ids("<image>") not in item["input_ids"]
    assert sum(label != IGNORE_INDEX for label in item["labels"]) == 2  # "yes" + "</s>"


def test_too_long_sample_is_refused_not_truncated(tiny_processor, image_file):
    from lmmtune.errors import LmmtuneError

    with pytest.raises(LmmtuneError, match="exceed data.max_length=20"):
        SupervisedDataset(
            [Sample(id="1", turns=TURNS, image=str(image_file), source="f.json[0]")],
            tiny_processor,
            max_length=20,
            max_image_pixels=DEFAULT_MAX_PIXELS,
        )[0]
