"""`python -m lmmtune recipe=demo` as a user runs it: it learns, and MLflow has the run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from tests.conftest import run_cli


def test_demo_learns_the_visual_task(demo_run):
    metrics = json.loads((demo_run["run_dir"] / "metrics.json").read_text())
    assert metrics["eval_before"]["accuracy"] <= 0.6
    assert metrics["eval_after"]["accuracy"] >= 0.9
    losses = metrics["train"]["loss_history"]
    assert losses[-1] < 0.5 * losses[0]


def test_demo_run_directory_holds_config_adapter_and_metrics(demo_run):
    run_dir = demo_run["run_dir"]
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.name == "demo" and "${" not in OmegaConf.to_yaml(config)  # resolved
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert "multi_modal_projector" in adapter_config["modules_to_save"]
    from safetensors import safe_open

    with safe_open(run_dir / "adapter" / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert any("multi_modal_projector" in key for key in keys)
    assert any("lora_A" in key and "language_model" in key for key in keys)
    assert not any("vision_tower" in key for key in keys)


def test_demo_run_is_tracked_in_mlflow(demo_run):
    client = MlflowClient(tracking_uri=demo_run["tracking_uri"])
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["recipe"] == "demo" and run.data.tags["base_model"] == "tiny"
    assert run.data.params["train.learning_rate"] == "0.002"
    assert run.data.params["peft.r"] == "16"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 5
    assert history[-1].value < history[0].value
    assert float(run.data.tags["eval_after/accuracy"]) >= 0.9  # a per-run number: a tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config.yaml", "metrics.json"} <= artifacts
    adapter_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="adapter/adapter_config.json",
        tracking_uri=demo_run["tracking_uri"],
    )
    assert json.loads(Path(local).read_text())["r"] == 16


def test_existing_run_directory_is_not_overwritten(demo_run):
    before = (demo_run["run_dir"] / "metrics.json").read_text()
    result = run_cli(["recipe=demo", "output_dir=run"], cwd=demo_run["workdir"])
    assert result.returncode == 1
    assert "already holds a run" in result.stderr and "overwrite=true" in result.stderr
    assert (demo_run["run_dir"] / "metrics.json").read_text() == before


def test_medical_recipe_offline_fails_with_a_clear_message(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"image": null, "question": "Q?", "answer": "yes"}\n')
    result = run_cli(
        ["recipe=medical", "data.train=train.jsonl", "output_dir=run"],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 1
    assert "could not load model 'llava-hf/llava-1.5-7b-hf'" in result.stderr
    assert "model.path=" in result.stderr
    assert "Traceback" not in result.stderr
