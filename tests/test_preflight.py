"""A training run either refuses before its first step or finishes: what would fail after
training is checked first (lmmtune.stages.checks), and a step after training that still fails
keeps the trained weights and the run and names the command that redoes it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmmtune.errors import LmmtuneError
from tests.conftest import compose_config, run_cli

TINY_RUN = [
    "recipe=demo",
    "tracking=none",
    "data.demo_size=24",
    "train.max_steps=2",
    "data.max_eval_samples=2",
    "eval.before=false",
    "eval.max_new_tokens=2",
    "data.num_workers=0",
]


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder in which no folder can be made: a read-only one, or (as root, who ignores
    modes) one on a file system that refuses new folders; skip where there is none."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for candidate in (locked, Path("/sys"), Path("/proc")):
        try:
            (candidate / "lmmtune-probe").mkdir()
        except OSError:
            return candidate
        (candidate / "lmmtune-probe").rmdir()
    pytest.skip("no folder here refuses new folders")


def refused_before_training(result, cwd: Path, *needles: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error and "refused before training" in error[-1], result.stderr[-3000:]
    for needle in needles:
        assert needle in error[-1]
    assert not (cwd / "run").exists()  # nothing left behind; no step was trained
    assert "'loss'" not in result.stdout + result.stderr


def refused_in_process(overrides: list[str], cwd: Path, *needles: str) -> None:
    """`lmmtune.finetune` (what the CLI runs) refuses before the first step, leaving no run."""
    from lmmtune.api import finetune

    with pytest.raises(LmmtuneError) as raised:
        finetune(compose_config([*TINY_RUN, f"output_dir={cwd / 'run'}", *overrides]))
    message = str(raised.value)
    assert message.startswith("refused before training") and "\n" not in message
    for needle in needles:
        assert needle in message
    assert not (cwd / "run").exists()


def test_an_export_target_that_cannot_be_written_is_refused_before_the_first_step(tmp_path):
    target = unwritable_folder(tmp_path) / "export"
    result = run_cli(["train", *TINY_RUN, "output_dir=run", f"export.dir={target}"], tmp_path)
    refused_before_training(result, tmp_path, f"export.dir={target}", "cannot be written")


def test_an_impossible_chat_template_is_refused_before_the_first_step(tiny_model_path, tmp_path):
    """An `<image>` token that swallows the space after it (rstrip): the exported chat
    template cannot give training's ids; before, this ended a finished training."""
    import shutil

    model = tmp_path / "tiny-rstrip"
    shutil.copytree(tiny_model_path, model)
    tokenizer = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    for token in tokenizer["added_tokens"]:
        token["rstrip"] = token["rstrip"] or token["content"] == "<image>"
    (model / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = json.loads((model / "tokenizer_config.json").read_text())
    for token in config.get("added_tokens_decoder", {}).values():
        token["rstrip"] = token["rstrip"] or token["content"] == "<image>"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    refused_in_process([f"model.path={model}"], tmp_path, "chat template does not reproduce")


def test_an_eval_image_that_cannot_open_is_refused_before_the_first_step(tmp_path):
    """With data.verify_images=false the check does not decode images; the evaluation
    after training would: a broken eval image is found before the first step."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    records = []
    for index in range(4):
        Image.new("RGB", (40, 30), (index * 50, 0, 0)).save(tmp_path / "img" / f"{index}.png")
        records.append(
            {"id": str(index), "image": f"img/{index}.png", "conversations": [
                {"from": "human", "value": "<image>\nIs there a lesion?"},
                {"from": "gpt", "value": "yes"}]}
        )  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(records[:3]))
    (tmp_path / "eval.json").write_text(json.dumps(records[3:]))
    (tmp_path / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # cut short
    data = [f"data.train={tmp_path / 'train.json'}", f"data.eval={tmp_path / 'eval.json'}"]
    refused_in_process([*data, "data.verify_images=false"], tmp_path, "eval sample", "(id 3)")


def test_checkpoint_space_is_the_adapter_and_optimizer_state_times_the_checkpoints_kept(
    tmp_path,
):
    from lmmtune.config import TrainConfig
    from lmmtune.stages.checks import GIB, check_disk_space, checkpoint_space

    train = TrainConfig(save_steps=100, save_total_limit=2, optim="adamw_torch")
    # 1 GiB adapter of 250M fp32 weights, AdamW: 2 GiB of state per checkpoint; 10 saves
    # over 1000 steps, at most 3 at once (2 kept + 1 staged), then the final adapter
    needed, alive = checkpoint_space(GIB, 2**28, train, total_steps=1000)
    assert (alive, needed) == (3, 3 * 3 * GIB + GIB)
    eight_bit = TrainConfig(save_steps=100, save_total_limit=None, optim="paged_adamw_8bit")
    assert checkpoint_space(GIB, 2**28, eight_bit, total_steps=250) == (3 * 1.5 * GIB + GIB, 3)
    check_disk_space(needed, alive, tmp_path, free=needed)  # fits exactly
    with pytest.raises(LmmtuneError) as raised:
        check_disk_space(needed, alive, tmp_path, free=4 * GIB)
    assert "about 10.0 GiB of disk are needed" in str(raised.value)
    assert "4.0 GiB are free" in str(raised.value) and "train.save_total_limit" in str(raised.value)


# Each step after training, made to fail the way a full disk or a crash would; the next
# resume is the command the message names, until the last resume finishes the run.
FAILURES = [
    ("saving the adapter", "peft.PeftModel.save_pretrained"),
    ("evaluating after training", "lmmtune.stages.sft.evaluate"),
    ("evaluating after training", "lmmtune.stages.sft.save_eval_report"),
    ("writing the model card and metrics.json", "lmmtune.stages.sft.write_model_card"),
]


def fail(monkeypatch, target: str) -> None:
    """Make `target` raise OSError(28) (no space left on device) when it writes the run's
    result; saves into the pre-flight scratch folder and checkpoints still work."""
    import importlib

    module_name, _, name = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a class: peft.PeftModel
        package, _, class_name = module_name.rpartition(".")
        owner = getattr(importlib.import_module(package), class_name)
    original = getattr(owner, name)

    def failing(*args, **kwargs):
        paths = [str(a) for a in args if isinstance(a, str | Path)]
        if any(part in path for path in paths for part in (".preflight", "checkpoint")):
            return original(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.slow  # five in-process runs of the tiny model: about a minute
def test_each_step_after_training_that_fails_keeps_the_weights_and_names_the_redo(
    tmp_path, monkeypatch
):
    from lmmtune.api import finetune
    from lmmtune.rundir.run import completed_checkpoints

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    overrides = [*TINY_RUN, f"output_dir={run}"]
    for index, (step, target) in enumerate(FAILURES):
        with monkeypatch.context() as patch:
            fail(patch, target)
            resume = ["train.resume=auto"] if index else []
            with pytest.raises(LmmtuneError) as raised:
                finetune(compose_config([*overrides, *resume]))
        message = str(raised.value)
        assert message.startswith(f"training finished, but {step} failed: ")
        assert "No space left on device" in message and "\n" not in message
        assert f"output_dir={run} train.resume=auto" in message
        kept = Path(message.split("kept in ")[1].split(";")[0])
        assert any(kept.glob("adapter_model.safetensors")) and run.is_dir()
        assert not (run / "metrics.json").exists()
    last = completed_checkpoints(run / "checkpoints")[-1]
    metrics = finetune(compose_config([*overrides, "train.resume=auto"]))  # the named redo
    assert metrics["train"]["steps"] == 2 and "eval_after" in metrics  # nothing trained again
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    checkpoint = load_file(last / "adapter_model.safetensors")
    assert saved.keys() == checkpoint.keys()
    assert all((saved[k] == checkpoint[k]).all() for k in saved)
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 2
    assert os.path.isfile(run / "adapter" / "README.md")


def test_a_failed_mlflow_step_names_the_import_command(tmp_path, monkeypatch):
    """The last step, after metrics.json: the run is finished, `import RUN` redoes it."""
    from lmmtune.api import finetune
    from lmmtune.tracking.tracker import Tracker

    monkeypatch.chdir(tmp_path)
    fail(monkeypatch, "lmmtune.tracking.tracker.Tracker.log_adapter_model")
    assert Tracker.log_adapter_model is not None
    with pytest.raises(LmmtuneError) as raised:
        finetune(compose_config([*TINY_RUN, f"output_dir={tmp_path / 'run'}"]))
    message = str(raised.value)
    assert message.startswith("training finished, but logging the run to MLflow failed")
    assert f"python -m lmmtune import {tmp_path / 'run'}" in message
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
