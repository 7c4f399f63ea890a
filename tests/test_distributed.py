"""Data parallel training on CPU: 2 processes (gloo) train exactly what 1 process trains.

The tiny demo with the same global batch (1 process x 4 samples vs 2 processes x 2):
the loss history and the adapter weights must match, rank 0 alone writes the run
directory, the checkpoints and the MLflow run, and every rank agrees on the run
directory.

Length grouping is off in these runs (train.group_by_length=false): its megabatches
are formed from the per-process batch (as in transformers' Trainer), so 1 x 4 and
2 x 2 see the samples in a different, equally valid order. With random sampling the
order is one seeded permutation of the whole set, cut into the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import run_cli

SMALL = [
    "recipe=demo",
    "data.demo_size=24",
    "train.max_steps=4",
    "train.grad_accum=1",
    "train.logging_steps=1",
    "train.save_steps=2",
    "train.group_by_length=false",
]
# Float sums over 2 x 2 samples instead of 4, in other thread counts: measured ~4e-7.
ATOL = 1e-5


def launch(launcher: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`LAUNCHER -m lmmtune ARGS` in `cwd`, MLflow kept inside `cwd`."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [*launcher, "-m", "lmmtune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Callable[[], Path]:
    """The reference: one process, batch 4, no eval, no tracking.

    It starts in the background (the tests run their launcher meanwhile); calling the
    fixture's value waits for it and returns its run directory.
    """
    workdir = tmp_path_factory.mktemp("single")
    extra = ["train.batch_size=4", "eval.before=false", "eval.after=false", "tracking=none"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(run_cli, [*SMALL, *extra, "output_dir=run"], workdir)

        def finished() -> Path:
            result = running.result()
            assert result.returncode == 0, result.stderr[-4000:]
            return workdir / "run"

        yield finished


def assert_same_training(run: Path, reference: Path) -> None:
    losses = json.loads((run / "metrics.json").read_text())["train"]["loss_history"]
    expected = json.loads((reference / "metrics.json").read_text())["train"]["loss_history"]
    assert len(losses) == len(expected) == 4
    assert losses == pytest.approx(expected, abs=ATOL)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    reference_weights = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.slow  # end-to-end processes: run by CI's slow step
def test_torchrun_two_processes_train_what_one_process_trains(single_run, tmp_path):
    # Default output_dir (outputs/demo/<time>): both ranks must agree on it. Eval on: rank 0
    # generates while rank 1 waits, and it must not change what is trained.
    args = [*SMALL, "train.batch_size=2", "eval.max_new_tokens=2"]
    result = launch(TORCHRUN, args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    run_dirs = list((tmp_path / "outputs" / "demo").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run = run_dirs[0]

    assert_same_training(run, single_run())
    assert "process 0 of 2 (gloo)" in result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"eval_before", "eval_after"} <= metrics.keys()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 1  # rank 0 only
    assert runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/loss")) == 4
    assert "× 2 processes = 4" in runs[0].data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_accelerate_launch_two_processes_train_what_one_process_trains(single_run, tmp_path):
    """conf/accelerate/ddp.yaml as shipped; with no GPU its 2 processes run on CPU (gloo)."""
    config = Path(__file__).resolve().parent.parent / "conf" / "accelerate" / "ddp.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0"]
    launcher += ["--config_file", str(config)]
    args = [*SMALL, "train.batch_size=2", "eval.before=false", "eval.after=false"]
    result = launch(launcher, [*args, "tracking=none", "output_dir=run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "process 0 of 2 (gloo)" in result.stderr
    assert_same_training(tmp_path / "run", single_run())


def test_a_single_process_passes_through_the_distributed_helpers(tmp_path):
    from lmmtune import distributed
    from lmmtune.rundir.run import job_output_dir

    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.on_main(lambda a, b: a + b, 2, b=3) == 5
    assert job_output_dir(str(tmp_path / "run")) == str(tmp_path / "run")
    distributed.barrier()  # no process group: nothing to wait for


def test_ddp_finds_unused_parameters_unless_the_chunked_loss_trains_the_head():
    from lmmtune.distributed import find_unused_parameters

    assert find_unused_parameters(train_lm_head=False, loss_impl="chunked")
    assert find_unused_parameters(train_lm_head=True, loss_impl="default")
    assert not find_unused_parameters(train_lm_head=True, loss_impl="chunked")


def test_fsdp_and_deepspeed_load_without_a_device_map_and_skip_eval_generation(monkeypatch):
    from lmmtune import distributed
    from lmmtune.model import device_map

    assert device_map() == "cpu" and distributed.generates_here()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert device_map() is None and not distributed.generates_here()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert device_map() is None and not distributed.generates_here()


def test_fsdp_quant_config_stores_4bit_weights_as_bfloat16():
    from lmmtune.config import QuantConfig
    from lmmtune.model import build_quantization_config
    from tests.conftest import compose_config

    cfg = compose_config(["quant=4bit_fsdp"])
    assert build_quantization_config(cfg.quant).bnb_4bit_quant_storage == torch.bfloat16
    assert build_quantization_config(QuantConfig()).bnb_4bit_quant_storage == torch.uint8
