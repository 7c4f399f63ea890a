"""peft.method (lora, dora, rslora), peft.init and LoRA+ on the real 4-bit tiny base: what they
build, what trains, what is refused at composition (docs/peft_methods.md)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lmmtune.config import DataConfig, ModelConfig, PeftConfig, QuantConfig
from lmmtune.data.batches import PaddingCollator, SupervisedDataset
from lmmtune.data.checks import load_splits
from lmmtune.errors import LmmtuneError
from lmmtune.model import (
    PROJECTOR,
    apply_lora,
    build_lora_config,
    load_model,
    load_processor,
    require_peft_init,
    trainable_report,
)
from lmmtune.training.memory import ModelShape
from lmmtune.training.trainer import trainable_groups
from lmmtune.validate import validate
from tests.conftest import compose_config, run_cli

TINY = ModelConfig(path="tiny", dtype="float32")
QLORA = QuantConfig(mode="4bit", compute_dtype="float32")
DEMO_PEFT = dict(r=16, alpha=32, dropout=0.0, projector_lr=2e-3, train_lm_head=True)


def wrapped(**peft) -> torch.nn.Module:
    torch.manual_seed(0)
    return apply_lora(load_model(TINY, QLORA), PeftConfig(**{**DEMO_PEFT, **peft}), False)


def test_methods_and_inits_map_to_peft_lora_config():
    dora = build_lora_config(PeftConfig(method="dora"))
    assert dora.use_dora and not dora.use_rslora and dora.init_lora_weights is True
    rslora = build_lora_config(PeftConfig(method="rslora", init="gaussian"))
    assert rslora.use_rslora and not rslora.use_dora
    assert rslora.init_lora_weights == "gaussian"
    plain = build_lora_config(PeftConfig())
    assert not plain.use_dora and not plain.use_rslora


def test_dora_trains_one_magnitude_per_output_feature_as_the_planner_counts(tiny_model_path):
    model = wrapped(method="dora")
    magnitudes = {
        name: p for name, p in model.named_parameters() if "lora_magnitude_vector" in name
    }
    assert magnitudes and all(
        p.requires_grad and p.dtype == torch.float32 for p in magnitudes.values()
    )
    for name, magnitude in magnitudes.items():
        linear = model.get_submodule(name.rsplit(".lora_magnitude_vector", 1)[0])
        assert magnitude.shape == (linear.out_features,), name
    shape = ModelShape.from_config(model.get_base_model().config)
    targets = list(PeftConfig().target_modules)
    assert sum(p.numel() for p in magnitudes.values()) == shape.dora_magnitude_params(targets)
    plain = trainable_report(wrapped())
    assert trainable_report(model).lora == plain.lora + shape.dora_magnitude_params(targets)


def test_rslora_scales_updates_by_alpha_over_sqrt_r(tiny_model_path):
    scalings = [
        value
        for module in wrapped(method="rslora").modules()
        if isinstance(getattr(module, "scaling", None), dict)
        for value in module.scaling.values()
    ]
    assert scalings and all(value == pytest.approx(32 / 16**0.5) for value in scalings)


def test_loraplus_puts_b_and_magnitudes_at_ratio_times_the_rate_and_keeps_the_projector_rate(
    tiny_model_path,
):
    model = wrapped(method="dora")
    names = {id(p): name for name, p in model.named_parameters()}
    groups = trainable_groups(model, 1e-3, 0.0, 2e-3, loraplus_lr_ratio=16)
    rate = {names[id(p)]: group["lr"] for group in groups for p in group["params"]}
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(rate) == sorted(trained)  # every trained weight in exactly one group
    assert sum(len(group["params"]) for group in groups) == len(trained)
    for name, lr in rate.items():
        if "lora_B" in name or "lora_magnitude_vector" in name:
            assert lr == pytest.approx(16e-3), name
        elif PROJECTOR in name:  # its bias (1-D) too: peft would put it at the B rate
            assert lr == pytest.approx(2e-3), name
        else:  # lora_A and the output head
            assert lr == pytest.approx(1e-3), name


def test_without_loraplus_the_groups_are_the_plain_recipe_s(tiny_model_path):
    """The groups (and so the golden demo) are unchanged when LoRA+ is off: every trained
    weight but the projector's in model order at the main rate, then the projector."""
    model = wrapped()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = trainable_groups(model, 1e-3, 0.01, 2e-3, loraplus_lr_ratio=None)
    assert [len(g["params"]) for g in groups] == [
        sum(PROJECTOR not in n for n, _ in trained),
        sum(PROJECTOR in n for n, _ in trained),
    ]
    assert groups[0]["params"] == [p for n, p in trained if PROJECTOR not in n]
    assert "lr" not in groups[0] and groups[1]["lr"] == 2e-3


@pytest.fixture(scope="module")
def demo_batch(tmp_path_factory, tiny_model_path):
    """Four training samples of the demo (scans and their questions), as one padded batch."""
    processor = load_processor(TINY)
    data_cfg = OmegaConf.structured(DataConfig(train="demo", demo_size=12, num_workers=0))
    splits = load_splits(data_cfg, tmp_path_factory.mktemp("demo"), processor)
    dataset = SupervisedDataset(splits.train[:4], processor, 256, None)
    return PaddingCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


@pytest.mark.parametrize(
    "peft",
    [{"method": "dora"}, {"method": "rslora"}, {"loraplus_lr_ratio": 8.0}],
    ids=["dora", "rslora", "loraplus"],
)
def test_a_few_steps_of_lora_alone_on_the_4bit_base_lower_the_loss(demo_batch, peft):
    model = wrapped(train_projector=False, train_lm_head=False, **peft)  # the method alone
    ratio = peft.get("loraplus_lr_ratio")
    optimizer = torch.optim.AdamW(trainable_groups(model, 5e-3, 0.0, None, ratio))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(4):
        loss = model(**demo_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    moved = {n for n, p in model.named_parameters() if n in start and not p.equal(start[n])}
    assert moved == set(start)  # every A, B (and DoRA magnitude) was trained


REFUSALS = {
    ("peft.init=pissa",): "peft.init=pissa: not offered (peft's pissa_init refuses quantized",
    ("peft.init=pissa", "quant.mode=none"): "peft.init=pissa: not offered (it rewrites the base",
    ("peft.init=loftq", "quant.mode=8bit"): "peft.init=loftq with quant.mode=8bit:",
    ("peft.init=loftq", "quant.mode=none"): "peft.init=loftq with quant.mode=none:",
    ("peft.init=loftq", "peft.method=dora"): "peft.init=loftq with peft.method=dora:",
    ("peft.loraplus_lr_ratio=0.5",): "peft.loraplus_lr_ratio=0.5: must be >= 1",
}


@pytest.mark.parametrize("overrides", list(REFUSALS), ids=lambda o: " ".join(o))
def test_combinations_peft_refuses_are_refused_at_composition(overrides, tmp_path):
    cfg = compose_config(["recipe=demo", f"output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(LmmtuneError) as error:
        validate(cfg)
    problems = str(error.value).splitlines()[1:]
    assert [line.strip() for line in problems if line.strip().startswith(REFUSALS[overrides])]


def test_every_method_composes(tmp_path):
    for overrides in (["peft.method=dora", "peft.loraplus_lr_ratio=16"], ["peft.method=rslora"]):
        validate(compose_config(["recipe=demo", f"output_dir={tmp_path}", *overrides]))


def test_pissa_on_the_command_line_is_one_line_before_any_model_loads(tmp_path):
    result = run_cli(["recipe=demo", "peft.init=pissa", "output_dir=run"], cwd=tmp_path)
    assert result.returncode != 0
    assert "peft.init=pissa: not offered" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")
def test_loftq_without_a_gpu_is_refused_naming_why():
    with pytest.raises(LmmtuneError, match="peft.init=loftq needs a CUDA GPU"):
        require_peft_init(PeftConfig(init="loftq"))
    require_peft_init(PeftConfig(init="gaussian"))  # runs anywhere


def test_the_planner_adds_dora_s_magnitudes_and_its_weight_sized_forward_temporaries():
    import dataclasses

    from benchmarks.bench.models import llava_config
    from lmmtune.training.memory import MemorySetup, estimate_memory

    shape = ModelShape.from_config(llava_config("7b"))
    lora = MemorySetup.defaults()
    dora = dataclasses.replace(lora, peft_method="dora")
    plain, more = estimate_memory(shape, lora, 4, 800), estimate_memory(shape, dora, 4, 800)
    magnitudes = shape.dora_magnitude_params(list(lora.lora_targets))
    assert magnitudes == 32 * (5 * 4096 + 2 * 11008)  # out features: q k v o down, gate up
    per_param = 4 + 4 + 2  # fp32 weight and gradient, paged 8-bit AdamW states
    assert more.trainable - plain.trainable == magnitudes * per_param
    # down_proj [in 11008, out 4096]: the fp32 identity, fp32 B @ A, three bf16 [out, in]
    down = 4 * 11008**2 + 4 * 11008 * 4096 + 3 * 2 * 11008 * 4096
    assert more.weights - plain.weights == down - 2 * 11008 * 4096  # minus the copy it replaces
    assert more.activations > plain.activations  # base and LoRA outputs kept per target
