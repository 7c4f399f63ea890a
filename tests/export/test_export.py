"""`python -m lmmtune export` of the demo run: a llava-hf model that plain transformers loads,
merged logits equal to the adapter's, registered in MLflow; and the adapter-only export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.errors import LmmtuneError
from tests.conftest import compose_config, run_cli

REGISTERED = "demo-llava"


def export_once(demo_run) -> dict:
    """`export output_dir=run export.register_name=demo-llava` of the demo run, once per session
    (test_predict uses it too), tracked in an experiment of its own."""
    workdir = demo_run["workdir"]
    export_dir = demo_run["run_dir"] / "export-merged"
    if not (export_dir / "export_report.json").exists():
        result = run_cli(
            [
                "export",
                "output_dir=run",
                f"export.register_name={REGISTERED}",
                "tracking.experiment=demo-export",
            ],
            cwd=workdir,
        )
        assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((export_dir / "export_report.json").read_text())
    return {"dir": export_dir, "report": report, "uri": demo_run["tracking_uri"]}


@pytest.fixture(scope="module")
def merged_export(demo_run):
    return export_once(demo_run)


def test_export_report_holds_no_absolute_path_of_the_adapter(merged_export):
    report_text = (merged_export["dir"] / "export_report.json").read_text()
    assert merged_export["report"]["adapter"] == "../adapter"  # relative to the export
    assert str(merged_export["dir"].parent) not in report_text


def test_merged_export_has_the_llava_hf_layout(merged_export):
    files = {p.name for p in merged_export["dir"].iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    assert "adapter_config.json" not in files
    config = json.loads((merged_export["dir"] / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert "quantization_config" not in config and config["dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(merged_export["dir"] / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert not any("lora_" in key or "modules_to_save" in key for key in keys)
    assert any("multi_modal_projector" in key for key in keys)


def test_merged_logits_match_the_adapter_on_the_unquantized_base(merged_export):
    parity = merged_export["report"]["parity"]
    assert parity["passed"] and parity["samples"] == 4 and parity["tokens"] > 100
    assert parity["max_abs_diff"] < 1e-4 * parity["logit_scale"]  # float32: rounding only
    assert parity["argmax_agreement"] == 1.0


FRESH_PROCESS = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
export_dir, questions = sys.argv[1], json.loads(sys.argv[2])
processor = AutoProcessor.from_pretrained(export_dir)
model = AutoModelForImageTextToText.from_pretrained(export_dir)
answers = []
for image, question in questions:
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image)},
                                             {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
assert not any(name.startswith("lmmtune") for name in sys.modules)
print(json.dumps(answers))
"""


def test_export_loads_and_generates_in_a_fresh_process_with_plain_transformers(
    demo_run, merged_export
):
    rows = [
        json.loads(line)
        for line in (demo_run["run_dir"] / "eval_predictions.jsonl").read_text().splitlines()
    ][:8]
    questions = [(row["image"], row["question"]) for row in rows]
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(merged_export["dir"]), json.dumps(questions)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=demo_run["workdir"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    # the chat template and padding processor reproduce training's prompt and images
    same = sum(answer == row["after"] for answer, row in zip(answers, rows, strict=True))
    assert same >= 7, (answers, [row["after"] for row in rows])


def test_export_is_logged_and_registered_in_mlflow(merged_export, demo_run, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=merged_export["uri"])
    version = client.get_model_version(REGISTERED, "1")
    assert version.status == "READY"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["command"] == "export"
    assert run.data.metrics["parity/argmax_agreement"] == 1.0
    assert merged_export["report"]["mlflow"]["registered_uri"] == f"models:/{REGISTERED}/1"

    monkeypatch.chdir(demo_run["workdir"])  # the store keeps artifacts under ./mlruns
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(merged_export["uri"])
    try:
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    finally:
        mlflow.set_tracking_uri(previous)
    data_dir = demo_run["run_dir"] / "demo_data"
    question = "Is there a lesion in this scan?"
    records = [
        r
        for name in ("train.json", "eval.json")
        for r in json.loads((data_dir / name).read_text())
        if question in r["conversations"][0]["value"]
    ][:4]
    answers = model.predict(
        pd.DataFrame(
            [{"image": str(data_dir / r["image"]), "question": question} for r in records]
        ),
        params={"max_new_tokens": 4},
    )
    # The demo learns its data (eval accuracy ~1.0): the served model answers as trained.
    assert [a.strip().lower() for a in answers] == [r["conversations"][1]["value"] for r in records]


def test_existing_export_is_not_overwritten(demo_run, merged_export):
    from lmmtune.export.run import run_export

    before = (merged_export["dir"] / "model.safetensors").stat().st_mtime_ns
    cfg = compose_config([f"output_dir={demo_run['run_dir']}", "tracking=none"])
    with pytest.raises(LmmtuneError, match="already exists.*export.overwrite=true"):
        run_export(cfg, overrides=[])
    assert (merged_export["dir"] / "model.safetensors").stat().st_mtime_ns == before


def test_failed_parity_writes_nothing(demo_run, tmp_path):
    from lmmtune.export.run import run_export

    target = tmp_path / "bad-export"
    cfg = compose_config(
        [
            f"output_dir={demo_run['run_dir']}",
            "tracking=none",
            f"export.dir={target}",
            "export.parity_samples=1",
            "export.parity_tolerance=-1",  # no difference passes
        ]
    )
    with pytest.raises(LmmtuneError, match="parity check failed.*Nothing was written"):
        run_export(cfg, overrides=[])
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary directory


def test_adapter_export_reloads_with_peft_and_matches_the_merged_model(
    demo_run, merged_export, tmp_path
):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lmmtune.export.merge import parity_batch, token_logits
    from lmmtune.export.run import run_export
    from lmmtune.finished_run import eval_samples

    target = tmp_path / "adapter-export"
    cfg = compose_config(
        [
            f"output_dir={demo_run['run_dir']}",
            "tracking=none",
            "export.format=adapter",
            f"export.dir={target}",
        ]
    )
    report = run_export(cfg, overrides=[])
    assert report["format"] == "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= {
        p.name for p in target.iterdir()
    }

    trained_on = json.loads((target / "lmmtune_base.json").read_text())["base_model"]
    base = LlavaForConditionalGeneration.from_pretrained(trained_on, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(target))
    merged = LlavaForConditionalGeneration.from_pretrained(merged_export["dir"])
    processor = AutoProcessor.from_pretrained(target)
    samples = eval_samples(compose_config(["recipe=demo"]), demo_run["run_dir"], processor, None)
    batch = parity_batch(processor, samples[:2], DEFAULT_MAX_PIXELS)
    difference = (token_logits(adapted, batch) - token_logits(merged, batch)).abs().max().item()
    assert difference < 1e-4


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_a_killed_export_is_cleaned_up_and_its_run_ended_by_the_next(demo_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    target = tmp_path / "exp"
    env = {**os.environ, "MLFLOW_TRACKING_URI": demo_run["tracking_uri"]}
    command = [sys.executable, "-m", "lmmtune", "export", f"output_dir={demo_run['run_dir']}"]

    def start_and_wait_for_staging():
        process = subprocess.Popen(
            [*command, f"export.dir={target}"],
            cwd=demo_run["workdir"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        marker = tmp_path / f".exp.tmp-{process.pid}" / ".lmmtune-staging"
        deadline = time.time() + 300
        while not (marker.exists() and marker.read_text().count("\n")):
            assert time.time() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.02)
        return process, marker.read_text().split("\n")[1]

    first, first_run = start_and_wait_for_staging()
    first.kill()  # kill -9: its staging folder stays, its MLflow run stays RUNNING
    first.communicate()
    client = MlflowClient(demo_run["tracking_uri"])
    assert client.get_run(first_run).info.status == "RUNNING"
    assert (tmp_path / f".exp.tmp-{first.pid}").is_dir()

    second, second_run = start_and_wait_for_staging()
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    assert "SIGTERM while running export" in stderr
    assert list(tmp_path.iterdir()) == []  # both staging folders gone, no export
    assert client.get_run(first_run).info.status == "KILLED"
    assert client.get_run(second_run).info.status == "KILLED"
