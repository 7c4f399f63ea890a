"""`python -m lmmtune recipe=demo data.group_by_image=true`: a scan's questions train as one
conversation, DataLoader workers reshuffle its turns per epoch, the loss falls, and the
grouping is in metrics.json and MLflow."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli

GROUPED_RUN = [
    "recipe=demo",
    "output_dir=run",
    "data.group_by_image=true",
    "data.demo_size=40",
    "data.num_workers=2",  # the epoch reaches persistent workers through the sampled indices
    "train.batch_size=8",
    "train.epochs=6",
    "train.logging_steps=1",
    "eval.before=false",
    "eval.after=false",
]


@pytest.mark.slow  # a training run of ~2 minutes on 2 busy cores: run by CI's slow step
def test_a_grouped_run_trains_on_conversations(tmp_path):
    result = run_cli(GROUPED_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    data, train = metrics["data"], metrics["train"]
    assert data["train_conversations"] == 30  # 30 training scans, 1 or 2 questions each
    assert data["train_samples"] > data["train_conversations"]
    assert train["steps"] == 6 * 4  # 30 conversations in batches of 8: 4 steps an epoch
    history = train["loss_history"]
    assert history[-1] < history[0] / 4, history
    assert "data.group_by_image: per epoch (data.group_by_image=true)" in result.stderr

    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    params = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.params
    assert params["data.group_by_image"] == "True"
    assert params["data.grouping.conversations"] == "30"
    ratio = data["train_samples"] / 30
    assert float(params["data.grouping.samples_per_conversation"]) == round(ratio, 3)
