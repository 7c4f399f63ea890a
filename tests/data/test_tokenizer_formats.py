"""The same conversation gives the same ids and labels whatever format the Llama tokenizer.json
was written in (transformers 4.3x's normalizer, Metaspace first/always/never, the older
add_prefix_space key; legacy true or false; loaded as TokenizersBackend with a model
config.json beside it, as LlamaTokenizer without), equal to LLaVA 1.5's own preprocessing
on the real Llama-2 vocabulary; the export reproduces them; an unknown pipeline is refused."""

from __future__ import annotations

import itertools
import json

import pytest
from transformers import AutoProcessor

from lmmtune.data.batches import TokenizedConversation, token_lengths
from lmmtune.data.prompt import render_prompt
from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError
from lmmtune.export.processor import export_processor
from tests.llava_reference import preprocess_v1
from tests.real_tokenizer import MODEL_CONFIG, PIPELINES, real_processor, tokenizer_format_dir

SAMPLES = {
    "single-turn": ([("What is shown?", "A chest X-ray.")], True),
    "multi-turn": ([("Is there a lesion?", "yes"), ("Which side?", "left"), ("Size?", "2 cm")], True),
    "text only": ([("What is a lesion?", "An area of abnormal tissue.")], False),
    "multi-turn text only": ([("Hi?", "Hello."), ("USER: again?", "Yes")], False),
    "unicode": ([("Décrivez l'image.", "Un poumon 中文 🫁 é."), ("Et ça?", "Ça va.")], True),
    "spaces and newlines": ([("List  them.", "1. effusion\n\n2.  two  spaces \n"), ("More?", " no")], True),
}  # fmt: skip
QUICK = {
    ("4.3x normalizer", True, True),
    ("4.3x normalizer", False, False),
    ("metaspace first", False, True),
    ("metaspace always", True, False),
    ("metaspace never", True, True),
    ("metaspace add_prefix_space", False, True),
}
"""Every pipeline, both legacy values and both load paths, in the default run; the rest of
the 20 combinations run with the slow tests (about 4 s each)."""
EXPORTED_QUICK = {("4.3x normalizer", True, True), ("metaspace always", True, False)}
"""The export check (about 8 s a format) in the default run."""
ALL_FORMATS = list(itertools.product(PIPELINES, [True, False], [True, False]))


def formats(quick: set) -> list:
    return [pytest.param(v, marks=() if v in quick else pytest.mark.slow) for v in ALL_FORMATS]


def format_id(value) -> str:
    pipeline, legacy, with_config = value
    return f"{pipeline}-legacy={legacy}-{'config' if with_config else 'no config'}"


@pytest.fixture(scope="module")
def reference_tokenize():
    tokenizer = real_processor(False).tokenizer  # LLaVA's current code: legacy=false
    return lambda text: tokenizer(text).input_ids


_LOADED: dict = {}


def load_format(value, tmp_path_factory):
    """The processor of one format, loaded once for the module's tests."""
    if value not in _LOADED:
        folder = tmp_path_factory.mktemp("format") / "processor"
        _LOADED[value] = AutoProcessor.from_pretrained(tokenizer_format_dir(folder, *value))
    return value, _LOADED[value]


@pytest.fixture(scope="module", params=formats(QUICK), ids=format_id)
def written(request, tmp_path_factory):
    return load_format(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=formats(EXPORTED_QUICK), ids=format_id)
def exported_from(request, tmp_path_factory):
    return load_format(request.param, tmp_path_factory)


def test_every_format_gives_llavas_ids_and_labels(written, reference_tokenize):
    (pipeline, legacy, with_config), processor = written
    loaded = type(processor.tokenizer).__name__
    assert loaded == ("TokenizersBackend" if with_config else "LlamaTokenizer")
    tokenize = TokenizedConversation(processor, max_length=4096)
    for name, (turns, has_image) in SAMPLES.items():
        sample = Sample(id=name, turns=turns, image="x.png" if has_image else None, source="t")
        ids, labels = tokenize(sample)
        assert (ids, labels) == preprocess_v1(turns, has_image, reference_tokenize, 32000, 576), (
            name
        )
        assert token_lengths([sample], processor)[0] == [len(ids)]
    multi = tokenize(Sample(id="m", turns=SAMPLES["multi-turn"][0], image="x.png", source="t"))[0]
    assert multi[multi.index(2) + 1] == 11889  # 'USER' after </s>, in every format
    at = multi.index(32000)
    assert multi[at - 2 : at] == [29901, 29871] and multi[at + 576 : at + 578] == [29871, 13]


def test_the_formats_really_differ_when_the_whole_string_is_tokenized(written):
    """The matrix is not of one format: tokenizing the rendered text in one call gives
    'US','ER' or 'USER' after </s> depending on the file (what lmmtune must not depend on)."""
    (pipeline, legacy, with_config), processor = written
    text = render_prompt("Which side?", False, "<image>", [("Hi?", "yes")])
    ids = processor.tokenizer(text).input_ids
    after_eos = ids[ids.index(2) + 1]
    prefixes_after_specials = pipeline == "4.3x normalizer" or (
        "first" not in pipeline and "never" not in pipeline
    )
    if not with_config:  # LlamaTokenizer rebuilds the pipeline from `legacy`
        prefixes_after_specials = legacy
    assert after_eos == (3148 if prefixes_after_specials else 11889)


def test_the_export_reproduces_training_ids_loaded_either_way(exported_from, tmp_path):
    """The exported processor (the run's adapter/ and export folders), saved and loaded with
    plain transformers with a model config.json beside it (an export-merged) and without
    (an adapter folder), gives training's prompt ids."""
    _, processor = exported_from
    tokenize = TokenizedConversation(processor, max_length=4096)
    export_processor(processor).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["normalizer"] is None and saved["pre_tokenizer"]["prepend_scheme"] == "first"
    for beside in (None, MODEL_CONFIG):
        if beside:
            (tmp_path / "config.json").write_text(json.dumps(beside))
        exported = AutoProcessor.from_pretrained(tmp_path)
        for name, (turns, has_image) in SAMPLES.items():
            *history, (question, _) = turns
            sample = Sample(id=name, turns=turns, image="x.png" if has_image else None)
            messages = chat_messages(history, question, has_image)
            text = exported.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = exported.tokenizer(text, add_special_tokens=False).input_ids
            expected = tokenize.chunks.encode(
                render_prompt(question, has_image, "<image>", history)
            )[0]
            assert ids == expected, (name, beside)
        # predict.model=EXPORT and chat on a merged export tokenize with lmmtune's own code
        assert TokenizedConversation(exported, 4096).prompt_ids(sample) == tokenize.prompt_ids(
            sample
        )


def chat_messages(history, question: str, has_image: bool) -> list[dict]:
    """The conversation as chat messages, the image (if any) in the first user turn."""
    messages = []
    for index, (asked, answer) in enumerate([*history, (question, None)]):
        content = [{"type": "text", "text": asked}]
        if index == 0 and has_image:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.mark.parametrize(
    "normalizer, pre_tokenizer, named",
    [
        (None, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "pre_tokenizer ByteLevel"),
        ({"type": "NFKC"}, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}, "normalizer NFKC"),
        (None, None, "normalizer none, pre_tokenizer none"),
    ],
    ids=["byte-level", "nfkc", "no word marker"],
)  # fmt: skip
def test_an_unknown_pipeline_is_refused_at_start_naming_it(
    normalizer, pre_tokenizer, named, tmp_path
):
    from lmmtune.config import ModelConfig
    from lmmtune.model import load_processor

    folder = tokenizer_format_dir(tmp_path / "odd", "metaspace first", False, with_config=True)
    state = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    state["normalizer"], state["pre_tokenizer"] = normalizer, pre_tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(LmmtuneError) as raised:
        load_processor(ModelConfig(path=str(folder)))
    message = str(raised.value)
    assert "\n" not in message and str(folder) in message and named in message
    assert "does not understand" in message
