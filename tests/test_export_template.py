"""The exported processor reproduces training's prompt (Vicuna v1) and image padding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmmtune.data.dataset import ImageLoader, TokenizedConversation
from lmmtune.data.records import Sample
from lmmtune.data.template import render_conversation
from lmmtune.export.chat_template import export_processor


@pytest.fixture(scope="module")
def exported(tiny_processor, tmp_path_factory):
    """The export processor, saved and reloaded as a user would (AutoProcessor)."""
    from transformers import AutoProcessor

    target = tmp_path_factory.mktemp("processor")
    export_processor(tiny_processor).save_pretrained(target)
    return AutoProcessor.from_pretrained(target)


def test_chat_template_renders_the_training_prompt(exported):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Is there a lesion?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        {"role": "user", "content": "Which side?"},
        {"role": "assistant", "content": "left"},
    ]
    text = exported.apply_chat_template(messages, tokenize=False)
    expected = render_conversation(
        [("Is there a lesion?", "yes"), ("Which side?", "left")], True, "<image>"
    ).text
    assert text == "<s>" + expected
    prompt = exported.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("USER: <image>\nIs there a lesion? ASSISTANT:")


def test_chat_template_token_ids_equal_lmmtune_prompt_ids(exported, tiny_processor, tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (64, 40), (200, 30, 30)).save(image)
    sample = Sample(id="1", turns=[("Is there a lesion?", "")], image=str(image))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(image)},
                {"type": "text", "text": "Is there a lesion?"},
            ],
        }
    ]
    inputs = exported.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = TokenizedConversation(tiny_processor, 10**9).prompt_ids(sample)
    assert inputs["input_ids"][0].tolist() == expected
    # padded to a square, not centre-cropped, in LLaVA's pad colour int(mean * 255): the
    # exported processor gives lmmtune's pixels, padding included
    ours = ImageLoader(tiny_processor)(sample)
    theirs = inputs["pixel_values"][0]
    assert torch.equal(theirs, ours)


def test_assistant_answers_are_marked_for_loss_masks(exported):
    messages = [
        {"role": "user", "content": "Is it?"},
        {"role": "assistant", "content": "yes"},
    ]
    out = exported.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    ids, mask = (ids[0], mask[0]) if isinstance(ids[0], list) else (ids, mask)
    marked = [token for token, keep in zip(ids, mask, strict=True) if keep]
    assert exported.tokenizer.decode(marked) == "yes</s>"
