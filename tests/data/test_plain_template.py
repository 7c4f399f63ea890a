"""Stage 1's `plain` template gives LLaVA's own `preprocess_plain` ids and labels on the real
Llama-2 vocabulary: `[BOS, <image> x 576, caption..., "\\n"]`, no `</s>`, labels on the caption
and the newline only. Read from LLaVA's pretrain JSON through the one batch builder."""

from __future__ import annotations

import json

import pytest

from lmmtune.config import DataColumns, Template
from lmmtune.data.batches import BatchBuilder, TokenizedConversation, token_lengths
from lmmtune.data.prompt import IGNORE_INDEX
from lmmtune.data.readers import read_data
from tests.llava_reference import preprocess_plain
from tests.real_tokenizer import real_processor

CAPTIONS = [
    "a chest X-ray with a small effusion on the left",
    "3 cm nodule, right upper lobe.",
    "Histology: Ça va, 中文 🫁 é",
    "two  spaces and\na newline inside",
    "the cat sat",
]
PROMPTS = ["<image>\nRender a clear and concise summary of the photo.", "Describe it.\n<image>"]


@pytest.fixture(scope="module")
def processors():
    return {legacy: real_processor(legacy) for legacy in (False, True)}


@pytest.fixture(scope="module")
def reference_tokenize(processors):
    tokenizer = processors[False].tokenizer  # LLaVA's current code: legacy=false
    return lambda text: tokenizer(text).input_ids


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_ids_and_labels_are_llavas_preprocess_plain(
    legacy, processors, reference_tokenize, tmp_path
):
    processor = processors[legacy]
    records = [
        {
            "id": str(n),
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": PROMPTS[n % 2]},
                {"from": "gpt", "value": caption},
            ],
        }
        for n, caption in enumerate(CAPTIONS)
    ]
    path = tmp_path / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(records))
    samples = read_data(path, DataColumns()).samples
    tokenize = TokenizedConversation(processor, max_length=4096, template=Template.plain)
    for sample, record in zip(samples, records, strict=True):
        question, caption = (m["value"] for m in record["conversations"])
        ids, labels = tokenize(sample)
        assert (ids, labels) == preprocess_plain(question, caption, reference_tokenize, 32000, 576)
        assert ids[0] == 1 and ids[1:577] == [32000] * 576 and ids[-1] == 13  # BOS, image, "\n"
        assert 2 not in ids  # no </s>
        assert labels[:577] == [IGNORE_INDEX] * 577 and labels[577:] == ids[577:]
        assert token_lengths([sample], processor, template=Template.plain)[0] == [len(ids)]


def test_the_batch_builder_uses_the_plain_template_and_skips_the_pad(processors, tmp_path):
    """`data.template=plain` and `data.pad_to_square=false` reach the one batch builder: the
    caption's ids, and a wide image centre-cropped (its left and right edges cut off) instead
    of padded with the mean colour."""
    from PIL import Image

    processor = processors[False]
    image = Image.new("RGB", (672, 336), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 168, 336))  # the left quarter black: cropped away
    image.save(tmp_path / "wide.png")
    record = {"image": str(tmp_path / "wide.png"), "caption": "a wide image"}
    (tmp_path / "captions.jsonl").write_text(json.dumps(record) + "\n")
    (sample,) = read_data(tmp_path / "captions.jsonl", DataColumns()).samples
    plain = BatchBuilder(processor, 4096, None, Template.plain, pad_to_square=False).item(sample)
    padded = BatchBuilder(processor, 4096, None).item(sample)
    assert plain["input_ids"][-1] == 13 and 2 not in plain["input_ids"]
    assert padded["input_ids"][-1] == 2  # the Vicuna answer ends with </s>
    # centre crop: all white; padded: black at the left, grey bands above and below
    assert plain["pixel_values"].min() > 1.5
    assert padded["pixel_values"].min() < -1.5
