"""Questions about one image answered from its prefix, run once: the answers of one prompt per question."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmmtune.commands import predict
from lmmtune.config import DataConfig, ModelConfig, PeftConfig, QuantConfig
from lmmtune.data.batches import BatchBuilder, image_token_count
from lmmtune.data.checks import inspect_data
from lmmtune.demo import PRESENCE_QUESTION, SIDE_QUESTION
from lmmtune.eval.generate import generate_answers
from lmmtune.eval.image_prefix import ImagePrefixes, plan_answers, shared_prefix_length
from lmmtune.model import apply_lora, load_model
from tests.conftest import compose_config
from tests.data.helpers import llava, save_image, write_json

QUESTIONS = [
    "Is there a lesion?",
    "Which side is the lesion on?",
    "Is the scan normal?",
    "What is shown in the image?",
    "Describe the image.",
]


@pytest.fixture(scope="module")
def checked_samples(tiny_processor, tmp_path_factory):
    """Samples as the data check returns them (image digests set): image a asked five
    questions, two of them through a byte-identical copy a_copy.png; image b one; image c
    two; a text-only record; a multi-turn record on a."""
    folder = tmp_path_factory.mktemp("questions")
    save_image(folder / "a.png", size=(40, 30), colour=(10, 20, 30))
    shutil.copy(folder / "a.png", folder / "a_copy.png")
    save_image(folder / "b.png", size=(30, 50), colour=(200, 30, 30))
    save_image(folder / "c.png", size=(50, 50), colour=(30, 200, 90))
    multi = llava("m", "a.png", "Describe the image.", "a scan")
    multi["conversations"] += [{"from": "human", "value": "Is it normal?"}]
    multi["conversations"] += [{"from": "gpt", "value": "yes"}]
    records = [
        llava("a0", "a.png", QUESTIONS[0]),
        llava("c0", "c.png", QUESTIONS[3]),
        llava("a1", "a_copy.png", QUESTIONS[1]),
        llava("t", None, "What is a lesion?"),
        llava("a2", "a.png", QUESTIONS[2]),
        llava("b0", "b.png", QUESTIONS[0]),
        multi,
        llava("a3", "a_copy.png", QUESTIONS[3]),
        llava("c1", "c.png", QUESTIONS[4]),
        llava("a4", "a.png", QUESTIONS[4]),
    ]
    data = write_json(folder / "data.json", records)
    config = DataConfig(train=str(data), eval_fraction=0.0, num_workers=0)
    return inspect_data(config, tiny_processor, folder / "work").train


def test_questions_are_grouped_by_image_content(checked_samples):
    ids = [sample.id for sample in checked_samples]
    plan = plan_answers(checked_samples, share_image_prefix=True)
    per_image = [[ids[i] for i in members] for members in plan.per_image]
    assert per_image == [["a0", "a1", "a2", "a3", "a4"], ["c0", "c1"]]  # a_copy.png is a
    assert [ids[i] for i in plan.per_question] == ["t", "b0", "m"]  # text, one question, turns
    unshared = plan_answers(checked_samples, share_image_prefix=False)
    assert unshared.per_question == list(range(len(ids))) and unshared.per_image == []


def test_the_shared_prefix_holds_the_image_and_stops_before_the_questions(
    checked_samples, tiny_processor
):
    build = BatchBuilder(tiny_processor, max_length=10**9, max_image_pixels=None)
    plan = plan_answers(checked_samples, share_image_prefix=True)
    prefixes = ImagePrefixes(build, checked_samples, plan.per_image)
    prompts = list(prefixes.prompts.values())
    image_id = build.tokenize.image_id
    last_image_token = max(i for i, token in enumerate(prompts[0]) if token == image_id)
    assert last_image_token < prefixes.length < min(len(p) for p in prompts)
    assert image_token_count(tiny_processor) == prompts[0].count(image_id)
    # an image token past the common prefix (another turn first) cannot be shared
    assert shared_prefix_length([[1, 2, 9, 3], [1, 4, 9, 3]], image_id=9) is None
    assert shared_prefix_length([[1, 9, 3, 5], [1, 9, 3, 6, 7]], image_id=9) == 3
    assert shared_prefix_length([[1, 9, 3], [1, 9, 3, 6]], image_id=9) == 2  # one own token


@pytest.fixture(scope="module")
def varied_model(tiny_model_path):
    """The tiny base in 4-bit (as eval loads it) with random LoRA weights, so that greedy
    answers differ from question to question."""
    torch.manual_seed(0)
    quant = QuantConfig(mode="4bit", compute_dtype="float32")
    model = load_model(ModelConfig(path="tiny", dtype="float32"), quant)
    model = apply_lora(model, PeftConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at 0: make it matter
            parameter.data.normal_(0, 0.05)
    return model


def test_shared_answers_are_the_per_question_answers(varied_model, tiny_processor, checked_samples):
    """At batch size 3, a's five questions and c's two make batches a0-a2, a3-a4 + c0, c1:
    one begins inside a's questions and ends inside c's; b's one question, the text-only
    and the multi-turn record go per question."""

    def answers(share: bool) -> list[str]:
        return generate_answers(
            varied_model,
            tiny_processor,
            checked_samples,
            max_new_tokens=4,
            batch_size=3,
            max_image_pixels=None,
            share_image_prefix=share,
        )

    per_question, shared = answers(False), answers(True)
    assert len(set(per_question)) >= 6  # the answers tell the questions apart
    assert shared == per_question  # every answer, in input order


def test_predict_answers_many_questions_per_image_as_one_by_one(demo_run, tmp_path):
    """`predict` on a questions file asking each scan three questions: the same answers, in
    the file's order, with and without the shared prefix; the ones the eval asked too are
    the training run's own answers."""
    lines = (demo_run["run_dir"] / "eval_predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    images = list(dict.fromkeys(row["image"] for row in rows))[:4]
    asked = [(image, q) for image in images for q in (SIDE_QUESTION, "Is the scan normal?")]
    asked += [(images[0], PRESENCE_QUESTION), (None, "What is a lesion?")]
    asked += [(images[1], PRESENCE_QUESTION)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"id": f"q{n}", "question": q, **({"image": i} if i else {})}) + "\n"
            for n, (i, q) in enumerate(asked)
        )
    )

    def predicted(share: bool) -> list[dict]:
        output = tmp_path / f"answers-{share}.jsonl"
        overrides = [
            f"output_dir={demo_run['run_dir']}",
            f"predict.input={questions}",
            f"predict.output={output}",
            "predict.max_new_tokens=3",
            "predict.batch_size=3",
            f"predict.share_image_prefix={str(share).lower()}",
        ]
        predict(compose_config(overrides), overrides=[])
        return [json.loads(line) for line in output.read_text().splitlines()]

    shared, per_question = predicted(True), predicted(False)
    assert [row["id"] for row in shared] == [f"q{n}" for n in range(len(asked))]
    assert shared == per_question
    trained = {(row["image"], row["question"]): row["after"] for row in rows}
    known = [row for row in shared if (row["image"], row["question"]) in trained]
    assert known and all(row["answer"] == trained[row["image"], row["question"]] for row in known)
