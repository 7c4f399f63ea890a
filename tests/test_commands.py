"""The command registry: `--help` per command, the record import as a subcommand, no stray folders."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from lmmtune.cli import COMMANDS, command_help, describe, usage
from tests.conftest import run_cli


def test_usage_lists_every_registered_command():
    text = usage()
    for name, command in COMMANDS.items():
        assert f"  {name}" in text and command.summary in text


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.composes_config])
def test_each_command_help_lists_its_own_keys_with_their_docs(name):
    text = command_help(COMMANDS[name])
    for key in COMMANDS[name].keys:
        for leaf, *_ in describe(key):
            assert f"  {leaf} = " in text
    if name != "train":
        assert "  train.learning_rate = " not in text  # its own keys, not every key


def test_export_help_from_the_command_line_shows_choices_and_docstrings(tmp_path):
    result = run_cli(["export", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "export.format = merged  {merged, adapter, gguf}" in result.stdout
    assert "export.gguf_type = f16  {f16, q8_0, q4_k_m}" in result.stdout
    assert "Register the logged model in the MLflow Model Registry" in result.stdout
    assert "export.dtype = null  {bfloat16, float16, float32}" in result.stdout
    assert "peft.r" not in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_commands_that_fill_no_run_folder_create_none(tmp_path):
    """Without output_dir, check and export once left an empty outputs/<name>/<time>/ each."""
    check = run_cli(["check", "recipe=demo", "data.demo_size=8", "data.num_workers=0"], tmp_path)
    assert check.returncode == 0, check.stderr[-2000:]
    export = run_cli(["export", "recipe=demo", "tracking=none"], cwd=tmp_path)
    assert export.returncode == 1 and "no adapter in outputs/demo/" in export.stderr
    assert not (tmp_path / "outputs").exists(), list(tmp_path.rglob("*"))


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_record_import_is_a_subcommand(tmp_path):
    from lmmtune.config import TrackingConfig
    from lmmtune.tracking.tracker import start_tracker

    down = TrackingConfig(tracking_uri="http://127.0.0.1:9")  # nothing listens on port 9
    tracker = start_tracker(down, "exp", "run", tmp_path)
    for step, loss in ((1, 3.0), (2, 2.0)):
        tracker.log_metrics({"train/loss": loss}, step=step)
    tracker.end("FINISHED")
    (tmp_path / "config.yaml").write_text("name: exp\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    imported = subprocess.run(
        [sys.executable, "-m", "lmmtune", "import", str(tmp_path), "--tracking-uri", uri],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("exp").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]
