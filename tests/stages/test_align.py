"""Stage 1 (`stage=align`, AlignRecipe): the settings it takes and refuses, the model the
Trainer trains (the projector alone, a checkpoint of the projector alone), and the offline
demo run: the held-out caption loss falls, RUN/projector/ loads with its four llava-hf keys,
and a resumed run ends with the same projector."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.run import RunDir
from lmmtune.training.projector import PROJECTOR_WEIGHTS, ProjectorTraining
from lmmtune.validate import validate
from tests.conftest import compose_config, run_cli


def test_the_align_recipes_take_llavas_stage_1_settings():
    cfg = compose_config(["recipe=medical_align", "data.train=captions.json"])
    validate(cfg)
    assert (cfg.stage, cfg.data.template, cfg.data.pad_to_square) == ("align", "plain", False)
    train = cfg.train
    assert (train.learning_rate, train.scheduler, train.warmup_ratio) == (1e-3, "cosine", 0.03)
    assert (train.weight_decay, train.epochs, cfg.data.max_length) == (0.0, 1, 2048)
    assert cfg.quant.mode == "4bit" and cfg.peft.projector_lr is None
    validate(compose_config(["recipe=demo_align"]))
    from lmmtune.eval.description import run_description  # the MLflow run's description

    described = run_description(cfg, cfg.train, {}, None)
    assert "projector alignment (stage 1)" in described and "none: the projector" in described


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        (["recipe=demo", "data.template=plain"], "data.template=plain is stage 1's"),
        (["recipe=demo_align", "peft.train_lm_head=true"], "set peft.train_lm_head=false"),
        (["recipe=demo_align", "peft.projector_lr=2e-5"], "set peft.projector_lr=null"),
        (["recipe=demo_align", "dpo.enabled=true"], "exclude each other"),
        (["recipe=demo_align", "data.group_by_image=true"], "set data.group_by_image=false"),
        (["recipe=demo_align", "stage=pretrain"], None),  # not a stage: refused at composition
    ],
)
def test_settings_stage_1_cannot_use_are_refused_at_composition(overrides, refusal):
    with pytest.raises(Exception) as refused:  # noqa: PT011 - Hydra's or lmmtune's one line
        validate(compose_config(overrides))
    if refusal is not None:
        assert isinstance(refused.value, LmmtuneError) and refusal in str(refused.value)


def test_the_trainer_sees_the_projector_alone(tiny_model_path):
    """The frozen 4-bit base, the projector in fp32 trainable; a backward step reaches the
    projector only; the state dict (what a checkpoint holds, what a resume loads) is the
    projector's four weights."""
    from lmmtune.config import ModelConfig, QuantConfig
    from lmmtune.model import load_model

    base = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32"), QuantConfig())
    model = ProjectorTraining(base)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"llava.model.{key}" for key in PROJECTOR_WEIGHTS}
    assert sorted(model.state_dict()) == sorted(PROJECTOR_WEIGHTS)
    assert all(w.dtype == torch.float32 for w in model.state_dict().values())
    image = base.config.image_token_index
    ids = torch.tensor([[1, *[image] * 16, 20, 21, 22]])
    pixels = torch.randn(1, 3, 56, 56)
    loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trained and all(
        p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None
    )
    saved = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(saved, False)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_demo_align_lowers_the_caption_loss_writes_the_projector_and_resumes(tmp_path):
    """`python -m lmmtune recipe=demo_align` on a smaller demo set; then the same run killed
    after its first checkpoint (its later files removed) and resumed gives the same projector."""
    args = [
        "recipe=demo_align", "output_dir=run", "data.demo_size=96", "train.max_steps=12",
        "train.save_steps=6", "train.save_total_limit=null",
    ]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run = RunDir(tmp_path / "run")
    losses = json.loads(run.metrics.read_text())["caption_loss"]
    assert losses["after"] < losses["before"] - 0.2, losses
    weights = load_file(str(run.projector_file))
    assert sorted(weights) == sorted(PROJECTOR_WEIGHTS)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert "model.projector=" in (run.projector_dir / "README.md").read_text()
    assert not (run.root / "adapter").exists()

    # a kill after checkpoint-6: what the run wrote later is gone; resume=auto continues there
    shutil.rmtree(run.checkpoints / "checkpoint-12")
    shutil.rmtree(run.projector_dir)
    run.metrics.unlink()
    resumed = run_cli([*args, "train.resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = load_file(str(run.projector_file))
    assert all(torch.equal(weights[key], again[key]) for key in weights)
    assert json.loads(run.metrics.read_text())["caption_loss"]["before"] == losses["before"]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "demo_align"]
    (tracked,) = client.search_runs([experiment.experiment_id])  # the resume continued it
    assert tracked.data.tags["stage"] == "align"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "eval/loss")] == [0, 12]
