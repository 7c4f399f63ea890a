"""DPO under DDP on CPU: 2 processes (gloo) train exactly what 1 process trains.

As tests/test_distributed.py does for SFT: the same global batch (1 process x 4 pairs vs
2 x 2), length grouping off, on top of a short SFT run's adapter. The loss history and
the adapter must match; rank 0 alone writes the run directory (both ranks agree on
its default name) and the MLflow run.

This failed before the held-out "before" evaluation moved into the Trainer
(`eval_on_start`): an `evaluate()` before `train()` marked the model as prepared, so
under DDP it trained unwrapped, each process on its own gradients (the losses parted
from step 2 on).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli
from tests.test_distributed import SMALL, TORCHRUN, assert_same_training, launch

SFT = [
    "recipe=demo",
    "data.demo_size=24",
    "train.max_steps=2",
    "eval.before=false",
    "eval.after=false",
    "tracking=none",
    "output_dir=sft",
]


def dpo_args(adapter: Path) -> list[str]:
    """SFT's small DDP run (tests/test_distributed.py), as DPO from `adapter`."""
    small = [arg for arg in SMALL if not arg.startswith("recipe=")]
    return ["recipe=demo_dpo", f"dpo.init_adapter={adapter}", *small] + [
        "eval.before=false",
        "eval.after=false",
    ]


@pytest.mark.slow
def test_torchrun_two_processes_train_the_dpo_stage_one_process_trains(tmp_path):
    sft = run_cli(SFT, cwd=tmp_path)
    assert sft.returncode == 0, sft.stderr[-4000:]
    args = dpo_args(tmp_path / "sft" / "adapter")
    single = tmp_path / "single"
    single.mkdir()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(
            run_cli, [*args, "train.batch_size=4", "tracking=none", "output_dir=run"], single
        )
        # default output_dir (outputs/demo_dpo/<time>): both ranks must agree on it
        result = launch(TORCHRUN, [*args, "train.batch_size=2"], cwd=tmp_path)
        reference = running.result()
    assert reference.returncode == 0, reference.stderr[-4000:]
    assert result.returncode == 0, result.stderr[-6000:]
    assert "process 0 of 2 (gloo)" in result.stderr

    run_dirs = list((tmp_path / "outputs" / "demo_dpo").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run = run_dirs[0]
    assert_same_training(run, single / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    # held-out preference before and after (TRL's evaluation loop, split over both processes)
    assert metrics["preference_before"]["rewards/accuracies"] == 0  # reference = start
    assert metrics["preference_after"]["logp_margin"] > metrics["preference_before"]["logp_margin"]
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert not (run / "adapter" / "ref").exists()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("demo_dpo").experiment_id])
    assert len(runs) == 1  # rank 0 only
    assert runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 4
    assert len(client.get_metric_history(runs[0].info.run_id, "train/rewards/accuracies")) == 4
