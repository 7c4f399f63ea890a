"""The exported processor reproduces training's prompt (Vicuna v1) and image padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lmmtune.data.batches import ImageLoader, TokenizedConversation
from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.prompt import render_conversation
from lmmtune.data.records import Sample
from lmmtune.export.processor import export_processor


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
    # the spaces after <s> and <image> stand for the "▁" LLaVA's chunk-wise tokenization puts there
    assert text == "<s> " + expected.replace("<image>\n", "<image> \n")
    prompt = exported.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("USER: <image> \nIs there a lesion? ASSISTANT:")


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
    ours = ImageLoader(tiny_processor, DEFAULT_MAX_PIXELS)(sample)
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


def docs_usage_example() -> str:
    """The processor part of docs/eval_export.md's usage example (the lines without the model)."""
    text = (Path(__file__).parent.parent.parent / "docs" / "eval_export.md").read_text()
    block = text.split("```python\n")[1].split("```")[0]
    assert "apply_chat_template" in block
    kept = [line for line in block.splitlines() if "model" not in line and "output" not in line]
    return "\n".join(kept)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
def test_docs_example_gives_training_ids_with_the_real_tokenizer(legacy, tmp_path, monkeypatch):
    from transformers import AutoProcessor

    from tests.real_tokenizer import real_processor

    processor = real_processor(legacy)
    export_processor(processor).save_pretrained(tmp_path / "export-merged")
    Image.new("RGB", (500, 300), (120, 80, 40)).save(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    code = docs_usage_example().replace("RUN/export-merged", str(tmp_path / "export-merged"))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the documented example, run as a user would
    sample = Sample(id="1", turns=[("Is there a lesion?", "")], image="scan.png")
    expected = TokenizedConversation(processor, 10**9).prompt_ids(sample)
    ids = scope["inputs"]["input_ids"][0].tolist()
    assert ids == expected
    assert ids[:2] == [1, 319] and ids.count(1) == 1  # one BOS, then '▁A'
    # the same for a multi-turn prompt and a text-only one, from the saved processor
    exported = AutoProcessor.from_pretrained(tmp_path / "export-merged")
    history = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    text = exported.apply_chat_template(
        [*history, {"role": "user", "content": "Size?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    sample = Sample(id="2", turns=[("Hi?", "Hello."), ("Size?", "")])
    expected = TokenizedConversation(processor, 10**9).prompt_ids(sample)
    assert exported.tokenizer(text, add_special_tokens=False)["input_ids"] == expected


def test_pyfunc_model_reads_images_as_training_did(exported, tiny_processor, tmp_path):
    """EXIF rotation and transparency on white: the served model sees training's pixels."""
    from lmmtune.export.pyfunc_model import LlavaAnswerer

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    picture = Image.new("RGB", (60, 30), (250, 10, 10))
    picture.paste((10, 10, 250), (0, 0, 20, 30))
    picture.save(rotated, exif=exif)
    transparent = tmp_path / "transparent.png"
    Image.new("RGBA", (30, 50), (0, 0, 0, 0)).save(transparent)
    answerer = LlavaAnswerer()
    answerer.processor = exported
    for path in (rotated, transparent):
        inputs = answerer.model_inputs({"question": "Is there a lesion?", "image": str(path)})
        sample = Sample(id="1", turns=[("Is there a lesion?", "")], image=str(path))
        expected = TokenizedConversation(tiny_processor, 10**9).prompt_ids(sample)
        assert inputs["input_ids"][0].tolist() == expected
        assert torch.allclose(
            inputs["pixel_values"][0],
            ImageLoader(tiny_processor, DEFAULT_MAX_PIXELS)(sample),
            atol=1e-5,
        )
