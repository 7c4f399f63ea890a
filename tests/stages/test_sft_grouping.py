"""`python -m lmmtune recipe=demo data.group_by_image=true`: a scan's questions train as one
conversation, DataLoader workers reshuffle its turns per epoch, the loss falls, the
grouping is in metrics.json and MLflow, and a run resumed in a later epoch ends with the
weights of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli
from tests.test_reliability import FAST, adapter_weights, kill_9_at_checkpoint

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


# 30 training scans -> 30 conversations, batch 4: 8 steps an epoch; 25 steps end in the fourth.
GROUPED_LATER_EPOCH = [
    *FAST,
    "data.group_by_image=true",
    "data.num_workers=2",
    "train.max_steps=25",
    "train.save_steps=5",
]


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_a_grouped_run_resumed_in_a_later_epoch_matches_an_uninterrupted_one(tmp_path):
    reference = run_cli([*GROUPED_LATER_EPOCH, "output_dir=straight"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed = [*GROUPED_LATER_EPOCH, "output_dir=crashed"]
    first, _ = kill_9_at_checkpoint(crashed, tmp_path, tmp_path / "crashed", 15)  # in epoch 2
    assert int(first.name.split("-")[1]) > 8, "killed in the first epoch"

    resumed = run_cli([*GROUPED_LATER_EPOCH, "output_dir=crashed", "train.resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and first.name in resumed.stderr

    expected, got = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "crashed")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert straight["data"]["train_conversations"] == 30
