"""Training ids and labels equal LLaVA 1.5's own, on the real Llama-2 vocabulary, under both
`legacy` settings of llava-hf's tokenizer_config.json."""

from __future__ import annotations

import pytest

from lmmtune.data.batches import TokenizedConversation, image_token_count, token_lengths
from lmmtune.data.records import Sample
from tests.llava_reference import preprocess_v1
from tests.real_tokenizer import real_processor

SAMPLES = {
    "image": ([("What is shown?", "A chest X-ray.")], True),
    "text only": ([("What is a lesion?", "An area of abnormal tissue.")], False),
    "unicode": ([("Décrivez l'image, s'il vous plaît.", "Un poumon 中文 🫁 é.")], True),
    "digits": ([("How many nodules, and how big?", "3 nodules, 12.5 mm and 7 mm.")], True),
    "newlines in the answer": ([("List the findings.", "1. effusion\n2. cardiomegaly\n")], True),
    "USER: in the question": ([("The note says USER: check. Is it normal?", "no")], True),
    "one word": ([("Is there a lesion?", "yes")], True),
    "multi-turn": (
        [("Is there a lesion?", "yes"), ("Which side?", "left"), ("Size?", "2 cm")],
        True,
    ),
    "multi-turn text only": ([("Hi?", "Hello."), ("USER: again?", "Yes")], False),
}


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def processor(request):
    return real_processor(request.param)


@pytest.fixture(scope="module")
def reference_tokenize():
    tokenizer = real_processor(False).tokenizer
    return lambda text: tokenizer(text).input_ids


def test_the_vocabulary_is_llama_2s(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 32002
    assert tokenizer("Hello world").input_ids == [1, 15043, 3186]
    assert tokenizer("USER: yes", add_special_tokens=False).input_ids == [3148, 1001, 29901, 4874]
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [
        0, 1, 2, 32000, 32001,
    ]  # fmt: skip
    assert (
        tokenizer.decode(tokenizer("Un poumon 中文 🫁 é.").input_ids[1:]) == "Un poumon 中文 🫁 é."
    )
    assert image_token_count(processor) == 576


@pytest.mark.parametrize("name", list(SAMPLES))
def test_ids_and_labels_equal_llavas(processor, reference_tokenize, name):
    turns, has_image = SAMPLES[name]
    sample = Sample(id=name, turns=turns, image="x.png" if has_image else None, source="t")
    ids, labels = TokenizedConversation(processor, max_length=4096)(sample)
    expected = preprocess_v1(turns, has_image, reference_tokenize, 32000, 576)
    assert (ids, labels) == expected
    assert token_lengths([sample], processor)[0] == [len(ids)]


def test_known_ids_around_the_image_and_between_turns(processor):
    turns = SAMPLES["multi-turn"][0]
    tokenize = TokenizedConversation(processor, max_length=4096)
    ids, labels = tokenize(Sample(id="m", turns=turns, image="x.png", source="t"))
    assert ids[:2] == [1, 319]  # BOS, '▁A' of "A chat ..."
    at = ids.index(32000)
    assert ids[at - 2 : at] == [29901, 29871] and ids[at + 576 : at + 578] == [29871, 13]
    second = ids.index(2) + 1
    assert ids[second] == 11889  # 'USER' after </s>, as LLaVA's current code gives it
    assert [t for t in labels if t != -100][:2] == [4874, 2]  # '▁yes', '</s>'
    prompt = tokenize.prompt_ids(Sample(id="m", turns=turns[:1], image="x.png", source="t"))
    assert prompt == ids[: ids.index(4874)]  # the prompt ends at 'ASSISTANT', ':'
