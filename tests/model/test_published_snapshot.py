"""A checkpoint as llava-hf published them (written by transformers 4.36 itself, see
tests/old_snapshot): its processor gives LLaVA 1.5's ids in both processor_config.json
variants, and at 7B width the whole CLI runs on it: check -> recipe=medical (bf16) -> eval
-> export merged and adapter -> plain transformers -> predict -> the chat app's answerer ->
DPO from the run's adapter; a 13B-width config goes through check and the memory planner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from lmmtune.data.batches import TokenizedConversation, image_token_count
from lmmtune.data.records import Sample
from tests.conftest import compose_config, run_cli
from tests.llava_reference import preprocess_v1
from tests.old_snapshot import old_snapshot_dir, snapshot_copy
from tests.real_tokenizer import real_processor

pytestmark = pytest.mark.slow  # a transformers 4.36 virtualenv (pip) and a 1.4 GB snapshot

QUESTIONS = [
    ("Is there a lesion in this scan?", "yes"),
    ("Which side is the lesion on?", "left"),
    ("Is the scan normal?", "no"),
]


def test_snapshot_is_in_the_old_formats():
    folder = old_snapshot_dir("7b")
    config = json.loads((folder / "config.json").read_text())
    assert config["transformers_version"].startswith("4.36")
    assert "num_hidden_layers" not in config["vision_config"] or config["vision_config"]
    assert "rope_theta" not in config["text_config"]  # partial: defaults left out
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert any(k.startswith("language_model.model.layers.0.") for k in index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokenizer["pre_tokenizer"] is None
    assert [n["type"] for n in tokenizer["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert (folder / "special_tokens_map.json").is_file()
    assert (folder / "generation_config.json").is_file()
    image = json.loads((folder / "preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "CLIPImageProcessor" and image["do_center_crop"]


@pytest.mark.parametrize("additional", [False, True], ids=["older", "newer"])
def test_the_snapshot_processor_gives_llavas_ids(additional, tmp_path):
    from transformers import AutoProcessor

    from lmmtune.config import ModelConfig
    from lmmtune.model import load_processor

    folder = snapshot_copy(tmp_path / "llava", additional, weights=False)
    raw = AutoProcessor.from_pretrained(folder)
    assert type(raw.tokenizer).__name__ == "TokenizersBackend"
    assert image_token_count(raw) == (576 if additional else 575)  # transformers' own count
    processor = load_processor(ModelConfig(path=str(folder)))
    assert image_token_count(processor) == 576
    reference = real_processor(False).tokenizer
    tokenize = TokenizedConversation(processor, 4096)
    turns = [QUESTIONS[0], ("Größe? 中文", "2 cm,\n  left"), QUESTIONS[1]]
    for has_image in (True, False):
        sample = Sample(id="m", turns=turns, image="x.png" if has_image else None)
        expected = preprocess_v1(turns, has_image, lambda t: reference(t).input_ids, 32000, 576)
        assert tokenize(sample) == expected


def test_the_exported_processor_feeds_the_pyfunc_model_training_ids(tmp_path):
    """The processor the run's adapter/ and the exports ship, saved from the snapshot's and
    loaded as the pyfunc models load it (with and without config.json beside it)."""
    from lmmtune.config import ModelConfig
    from lmmtune.export.processor import export_processor
    from lmmtune.model import load_processor

    snapshot = snapshot_copy(tmp_path / "llava", False, weights=False)
    Image.effect_noise((500, 300), 40).convert("RGB").save(tmp_path / "scan.png")
    questions = [{"question": q, "image": str(tmp_path / "scan.png")} for q, _ in QUESTIONS]
    exported = tmp_path / "adapter"
    export_processor(load_processor(ModelConfig(path=str(snapshot)))).save_pretrained(exported)
    check_training_ids(snapshot, questions, pyfunc_prompt_ids(exported, questions))
    (exported / "config.json").write_text((snapshot / "config.json").read_text())
    check_training_ids(snapshot, questions, pyfunc_prompt_ids(exported, questions))


def write_data(folder) -> dict:
    """Train/eval records (one multi-turn, one text-only), questions and DPO pairs."""
    (folder / "images").mkdir(parents=True)
    records = []
    for index in range(6):
        name = f"images/{index}.png"
        Image.effect_noise((380 + 37 * index, 300), 40).convert("RGB").save(folder / name)
        question, answer = QUESTIONS[index % 3]
        turns = [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ]
        if index == 1:
            turns += [{"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes, sure."}]
        records.append({"id": str(index), "image": name, "conversations": turns})
    records.append(
        {"id": "t", "conversations": [{"from": "human", "value": "What is a lesion?"},
                                      {"from": "gpt", "value": "An abnormal area."}]}
    )  # fmt: skip
    (folder / "train.json").write_text(json.dumps(records[:4] + records[6:]))
    (folder / "eval.json").write_text(json.dumps(records[4:6]))
    questions = [{"id": r["id"], "image": r["image"], "question": QUESTIONS[int(r["id"]) % 3][0]}
                 for r in records[4:6]]  # fmt: skip
    (folder / "questions.jsonl").write_text("\n".join(json.dumps(q) for q in questions))
    pairs = [dict(r, conversations=r["conversations"][:1], chosen=r["conversations"][1]["value"],
                  rejected="it cannot be seen") for r in records[:6]]  # fmt: skip
    (folder / "pairs.json").write_text(json.dumps(pairs))
    return {"train": folder / "train.json", "eval": folder / "eval.json", "questions": questions}


PLAIN_TRANSFORMERS = """
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
folder, questions = sys.argv[1], json.loads(sys.argv[2])
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
rows = []
for q in questions:
    content = [{"type": "image", "image": Image.open(q["image"]).convert("RGB")},
               {"type": "text", "text": q["question"]}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ids = inputs["input_ids"][0].tolist()
    answer = processor.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    rows.append({"ids": ids, "answer": answer})
print(json.dumps(rows))
"""


def cli_ok(args, cwd, timeout=1800):
    done = run_cli(args, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.heavy  # 10-30 min on 2 CPU cores: not in CI
def test_the_whole_cli_runs_on_a_7b_wide_published_snapshot(tmp_path):
    snapshot = snapshot_copy(tmp_path / "llava-1.5-7b-hf", additional_image_tokens=False)
    data = write_data(tmp_path)
    model = [f"model.path={snapshot}", "tracking=none", "data.num_workers=0"]
    files = [f"data.train={data['train']}", f"data.eval={data['eval']}"]
    checked = cli_ok(["check", "recipe=medical", *model, *files], tmp_path)
    assert "(576 per image included)" in checked.stdout

    train = ["train.max_steps=2", "train.batch_size=1", "train.grad_accum=1", "eval.before=false"]
    cli_ok(["recipe=medical", *model, *files, "output_dir=run", *train, "eval.max_new_tokens=4"],
           tmp_path)  # fmt: skip
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["dtype"] == "bfloat16"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["eval_after"]["samples"] == 2
    adapter_tokenizer = json.loads((run / "adapter" / "tokenizer.json").read_text("utf-8"))
    assert adapter_tokenizer["normalizer"] is None  # rewritten: no "▁" after </s>

    cli_ok(["eval", "output_dir=run", "tracking=none", "eval.max_new_tokens=4"], tmp_path)
    again = json.loads((run / "eval" / "metrics.json").read_text())["eval_after"]
    assert again["samples"] == 2 and again["exact_match"] == metrics["eval_after"]["exact_match"]
    cli_ok(["export", "output_dir=run", "tracking=none", "export.parity_samples=2",
            "export.dtype=float32"], tmp_path)  # fmt: skip
    report = json.loads((run / "export-merged" / "export_report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["argmax_agreement"] == 1.0
    cli_ok(["export", "output_dir=run", "tracking=none", "export.format=adapter"], tmp_path)
    assert (run / "export-adapter" / "adapter_model.safetensors").is_file()

    questions = [dict(q, image=str(tmp_path / q["image"])) for q in data["questions"]]
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(run / "export-merged"), json.dumps(questions)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    plain_rows = json.loads(plain.stdout.splitlines()[-1])
    check_training_ids(snapshot, questions, [row["ids"] for row in plain_rows])
    for folder in ("export-merged", "export-adapter", "adapter"):  # the pyfunc models' prompts
        check_training_ids(snapshot, questions, pyfunc_prompt_ids(run / folder, questions))

    predicted = tmp_path / "answers.jsonl"
    cli_ok(["predict", f"predict.model={run / 'export-merged'}", f"predict.input={tmp_path / 'questions.jsonl'}",
            f"predict.output={predicted}", "predict.max_new_tokens=4"], tmp_path)  # fmt: skip
    answers = [json.loads(line)["answer"] for line in predicted.read_text().splitlines()]
    assert answers == [row["answer"] for row in plain_rows]  # the export answers as predict does
    assert chat_answer(run, questions[0]) == answers[0]

    dpo = ["recipe=medical_dpo", *model, f"data.train={tmp_path / 'pairs.json'}", "data.eval=null",
           "data.eval_fraction=0.34", "dpo.init_adapter=run/adapter", "output_dir=dpo",
           "train.max_steps=1", "train.batch_size=1", "train.grad_accum=1", "eval.before=false",
           "eval.after=false"]  # fmt: skip
    cli_ok(dpo, tmp_path)
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()


def check_training_ids(snapshot, questions, plain_ids) -> None:
    """Plain transformers on the export feeds the model the ids training used."""
    from lmmtune.config import ModelConfig
    from lmmtune.model import load_processor

    tokenize = TokenizedConversation(load_processor(ModelConfig(path=str(snapshot))), 4096)
    for question, ids in zip(questions, plain_ids, strict=True):
        sample = Sample(id="q", turns=[(question["question"], "")], image=question["image"])
        assert ids == tokenize.prompt_ids(sample)


def pyfunc_prompt_ids(folder, questions) -> list[list[int]]:
    """The ids the MLflow pyfunc model (merged export or adapter) feeds its model."""
    from transformers import AutoProcessor

    from lmmtune.export.pyfunc_model import LlavaAnswerer

    answerer = LlavaAnswerer()
    answerer.processor = AutoProcessor.from_pretrained(folder)
    return [answerer.model_inputs(q)["input_ids"][0].tolist() for q in questions]


def chat_answer(run, question: dict) -> str:
    """The chat app's answer (its answerer, as the app's /answer calls it) from the export."""
    from lmmtune.chat.answer import Answerer, Settings, conversation, load_chat_model

    cfg = compose_config([f"chat.model={run / 'export-merged'}", "tracking=none"])
    chat_model = load_chat_model(cfg, overrides=[])
    answerer = Answerer(chat_model)
    sample = conversation(question["image"], [], question["question"], chat_model.max_length)
    *_, answer = answerer.stream(answerer.inputs(sample), Settings(4))
    return answer


def test_a_13b_wide_snapshot_goes_through_check_and_the_memory_planner(tmp_path):
    snapshot = old_snapshot_dir("13b", weights=False)
    data = write_data(tmp_path)
    args = ["check", "recipe=medical", "model=llava15_13b", f"model.path={snapshot}",
            f"data.train={data['train']}", "data.num_workers=0"]  # fmt: skip
    config = json.loads((snapshot / "config.json").read_text())["text_config"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]) == (
        5120, 40, 40,
    )  # fmt: skip
    fits = cli_ok([*args, "train.gpu_memory_gb=24"], tmp_path)
    assert "memory: fits train.gpu_memory_gb=24 at micro-batch" in fits.stdout
    too_small = run_cli([*args, "train.gpu_memory_gb=4"], tmp_path)
    assert too_small.returncode == 1 and "train.gpu_memory_gb=4" in too_small.stderr
