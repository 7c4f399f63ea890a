"""The memory planner: sizes of the real LLaVA 1.5 models, batches that fit, failures that say what to lower."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from benchmarks.bench.models import llava_config
from lmmtune.config import LLM_LINEARS, ModelConfig, PeftConfig, QuantConfig, TrainConfig
from lmmtune.errors import LmmtuneError
from lmmtune.training.memory import (
    GIB,
    MemorySetup,
    ModelShape,
    estimate_memory,
    fit_to_memory,
    optimizer_state_bytes,
    plan_batch,
)

SEQ = 800  # 576 image tokens + system line, question and a long answer
LLAVA_7B = ModelShape.from_config(llava_config("7b"))
LLAVA_13B = ModelShape.from_config(llava_config("13b"))
RECIPE = (
    MemorySetup.defaults()
)  # lmmtune's default: 4-bit, r=128, paged 8-bit AdamW, checkpointing, chunked
USUAL = dataclasses.replace(
    RECIPE, optim="adamw_torch", gradient_checkpointing=False, loss_impl="default"
)


def test_sizes_match_the_reference():
    assert LLAVA_7B.lora_params(128, list(LLM_LINEARS)) == pytest.approx(320e6, rel=0.01)
    assert LLAVA_7B.matmul_params() == pytest.approx(6.6e9, rel=0.01)
    assert LLAVA_13B.matmul_params() == pytest.approx(12.9e9, rel=0.01)
    assert LLAVA_7B.image_tokens == 576
    assert LLAVA_7B.projector_params() == pytest.approx(21e6, rel=0.01)
    assert LLAVA_7B.vision_params() == pytest.approx(303e6, rel=0.02)


def test_weights_and_lora_state_of_7b_qlora():
    estimate = estimate_memory(LLAVA_7B, RECIPE, 1, SEQ)
    # 6.5e9 NF4 weights at ~4.13 bits, bf16 embeddings, head and CLIP: about 4.3 GiB.
    assert 4.0 * GIB < estimate.weights < 4.7 * GIB
    # 320M LoRA parameters: fp32 weights + fp32 grads + 8-bit AdamW states = 10 bytes each.
    assert 2.9 * GIB < estimate.trainable < 3.3 * GIB
    fp32_adam = estimate_memory(LLAVA_7B, dataclasses.replace(RECIPE, optim="adamw_torch"), 1, SEQ)
    assert 4.7 * GIB < fp32_adam.trainable < 5.3 * GIB  # ~5 GB, as QLoRA practice reports for 7B


def test_optimizer_state_bytes_by_name():
    assert optimizer_state_bytes("paged_adamw_8bit") == 2
    assert optimizer_state_bytes("adamw_bnb_8bit") == 2
    assert optimizer_state_bytes("adamw_torch") == 8
    assert optimizer_state_bytes("paged_adamw_32bit") == 8
    assert optimizer_state_bytes("sgd") == 0


def test_7b_at_12_gib_keeps_the_effective_batch():
    plan = plan_batch(LLAVA_7B, RECIPE, 12, effective_batch=16, seq_len=SEQ)
    assert plan.micro_batch >= 1 and plan.micro_batch * plan.grad_accum == 16
    assert plan.estimate.total <= 12 * GIB
    assert estimate_memory(LLAVA_7B, RECIPE, plan.micro_batch * 2, SEQ).total > 12 * GIB
    assert "micro-batch 2 x grad_accum 8" in plan.describe()


def test_a_larger_budget_gives_a_larger_micro_batch():
    small = plan_batch(LLAVA_7B, RECIPE, 12, 16, SEQ)
    large = plan_batch(LLAVA_7B, RECIPE, 24, 16, SEQ)
    assert large.micro_batch > small.micro_batch
    assert large.micro_batch * large.grad_accum == 16


def test_micro_batch_divides_an_effective_batch_that_is_not_a_power_of_two():
    plan = plan_batch(LLAVA_7B, RECIPE, 80, effective_batch=12, seq_len=SEQ)
    assert plan.micro_batch == 4 and plan.grad_accum == 3


def test_13b_fits_22_gib_but_not_8():
    assert plan_batch(LLAVA_13B, RECIPE, 22, 16, SEQ).micro_batch >= 1
    with pytest.raises(LmmtuneError) as error:
        plan_batch(LLAVA_13B, RECIPE, 8, 16, SEQ)
    message = str(error.value)
    assert "train.gpu_memory_gb=8" in message and "micro-batch 1" in message
    assert "peft.r" in message and "data.max_length" in message


def test_failure_names_the_settings_that_would_help():
    with pytest.raises(LmmtuneError) as error:
        plan_batch(LLAVA_7B, dataclasses.replace(USUAL, quant="none"), 12, 16, SEQ)
    message = str(error.value)
    for lever in (
        "quant.mode=4bit",
        "paged_adamw_8bit",
        "gradient_checkpointing=true",
        "loss_impl=chunked",
    ):
        assert lever in message


def test_each_recipe_choice_saves_memory():
    """At the same micro-batch, undoing any one of lmmtune's choices costs memory."""
    base = estimate_memory(LLAVA_7B, RECIPE, 4, SEQ).total
    for change in (
        {"optim": "adamw_torch"},
        {"gradient_checkpointing": False},
        {"loss_impl": "default"},
        {"quant": "none"},
        {"attn_implementation": "eager"},
    ):
        assert estimate_memory(LLAVA_7B, dataclasses.replace(RECIPE, **change), 4, SEQ).total > base
    assert estimate_memory(LLAVA_7B, USUAL, 4, SEQ).total > 2 * base


def test_setup_is_read_from_the_config_groups():
    setup = MemorySetup.from_configs(
        ModelConfig(dtype="float32", attn_implementation="eager"),
        QuantConfig(mode="8bit"),
        PeftConfig(r=16, target_modules=["q_proj", "v_proj"], train_projector=False),
        TrainConfig(optim="adamw_torch", gradient_checkpointing=False, loss_impl="default"),
    )
    assert (setup.quant, setup.weight_bytes, setup.act_bytes, setup.lora_r) == ("8bit", 4, 4, 16)
    assert setup.lora_targets == ("q_proj", "v_proj") and not setup.train_projector
    assert setup.attn_implementation == "eager" and not setup.gradient_checkpointing


def test_fit_to_memory_is_off_without_a_budget():
    train_cfg = TrainConfig()
    assert fit_to_memory(train_cfg, ModelConfig(), QuantConfig(), PeftConfig(), SEQ) is train_cfg


@pytest.mark.parametrize("as_omegaconf", [False, True])
def test_fit_to_memory_returns_a_planned_copy(tiny_model_path, as_omegaconf, caplog):
    train_cfg = TrainConfig(batch_size=1, grad_accum=16, gpu_memory_gb=12)
    if as_omegaconf:  # what the pipeline passes: a typed Hydra node
        train_cfg = OmegaConf.structured(train_cfg)
    with caplog.at_level("INFO", logger="lmmtune.training.memory"):
        planned = fit_to_memory(
            train_cfg, ModelConfig(path="tiny"), QuantConfig(), PeftConfig(), 100
        )
    assert planned.batch_size == 16 and planned.grad_accum == 1  # the tiny model fits anything
    assert train_cfg.batch_size == 1 and train_cfg.grad_accum == 16  # the input is untouched
    assert "memory plan for 12 GiB" in caplog.text


@pytest.mark.slow
def test_cli_plans_the_batch_or_fails_before_loading_the_model(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_cli

    common = ["recipe=demo", "eval.before=false", "eval.after=false"]
    fits = run_cli(
        [
            *common,
            "output_dir=fits",
            "train.batch_size=2",
            "train.grad_accum=8",
            "train.max_steps=1",
            "train.gpu_memory_gb=8",
        ],
        cwd=tmp_path,
    )
    assert fits.returncode == 0, fits.stderr[-3000:]
    assert "micro-batch 16 x grad_accum 1 (effective 16)" in fits.stdout + fits.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    params = run.data.params
    assert (params["train.batch_size"], params["train.grad_accum"]) == ("2", "8")  # as asked
    assert (params["memory_plan.batch_size"], params["memory_plan.grad_accum"]) == ("16", "1")
    too_small = run_cli([*common, "output_dir=small", "train.gpu_memory_gb=0.5"], cwd=tmp_path)
    assert too_small.returncode != 0
    assert "does not fit train.gpu_memory_gb=0.5" in too_small.stderr
    assert "Traceback" not in too_small.stderr


def test_stage_1_trains_the_projector_alone():
    """stage=align: no LoRA, the projector's ~21M fp32 weights with their gradients and
    optimizer state; the 7B fits a smaller card at a larger micro-batch than QLoRA does."""
    align = MemorySetup.from_configs(
        ModelConfig(), QuantConfig(), PeftConfig(), TrainConfig(optim="adamw_torch"), "align"
    )
    assert (align.lora, align.train_projector, align.train_lm_head) == (False, True, False)
    projector = LLAVA_7B.projector_params()
    estimate = estimate_memory(LLAVA_7B, align, 1, SEQ)
    # projector weights (fp32) count with the weights; gradient 4 + AdamW states 8 bytes each
    assert estimate.trainable == projector * (4 + 8)
    assert 0.2 * GIB < estimate.trainable < 0.3 * GIB
    qlora = estimate_memory(LLAVA_7B, RECIPE, 1, SEQ)
    assert qlora.trainable > 10 * estimate.trainable
    assert estimate.activations < qlora.activations  # no LoRA dropout copies
    planned = plan_batch(LLAVA_7B, align, 12, 32, SEQ)
    assert planned.micro_batch > plan_batch(LLAVA_7B, RECIPE, 12, 32, SEQ).micro_batch


def test_stage_1_failure_does_not_name_lora():
    align = MemorySetup.from_configs(
        ModelConfig(), QuantConfig(), PeftConfig(), TrainConfig(), "align"
    )
    with pytest.raises(LmmtuneError) as failure:
        plan_batch(LLAVA_7B, align, 2, 32, SEQ)
    assert "peft.r" not in str(failure.value) and "data.max_length" in str(failure.value)
