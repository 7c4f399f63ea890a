"""The benchmark: its configurations, synthetic data, random checkpoints, arithmetic and a CPU run."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch

from benchmarks.bench.__main__ import _without, build_report, main, parse_args
from benchmarks.bench.cpu_memory import PeakTensorMemory
from benchmarks.bench.data import IGNORE_INDEX, SyntheticLlavaData
from benchmarks.bench.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, llava_config, random_checkpoint
from benchmarks.bench.recipes import RECIPES
from benchmarks.bench.report import markdown, mfu, peak_tflops, ratios
from lmmtune.config import ModelConfig, PeftConfig, QuantConfig, TrainConfig
from lmmtune.data.batches import PaddingCollator
from lmmtune.model import apply_lora, load_model
from lmmtune.training.trainer import LlavaTrainer, build_training_arguments
from tests.conftest import run_bench


def test_usual_pipeline_is_the_trl_example_setup():
    usual, ours = RECIPES["usual"], RECIPES["lmmtune"]
    assert (usual.quant, usual.optim, usual.checkpointing) == ("4bit", "adamw_torch", "reentrant")
    assert not usual.group_by_length and usual.loss_impl == "default" and not usual.workers
    assert (ours.optim, ours.checkpointing, ours.loss_impl) == (
        "paged_adamw_8bit",
        "non-reentrant",
        "chunked",
    )
    assert ours.group_by_length and RECIPES["lora"].quant == "none"


def test_synthetic_samples_have_llava_lengths_and_answer_labels():
    data = SyntheticLlavaData(200, IMAGE_TOKEN_ID, 576, 28, text_vocab=IMAGE_TOKEN_ID)
    assert min(data.lengths) >= 1 + 576 + 30 and max(data.lengths) <= 1 + 576 + 200
    item = data[3]
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) == len(labels) == data.lengths[3]
    assert ids[1:577] == [IMAGE_TOKEN_ID] * 576 and IMAGE_TOKEN_ID not in ids[577:]
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert labelled and labelled[0] > 577 and labelled[-1] == len(ids) - 1
    assert item["pixel_values"].shape == (3, 28, 28)
    assert torch.equal(data[3]["pixel_values"], item["pixel_values"])  # deterministic per index


@pytest.mark.parametrize(("scale", "hidden", "layers"), [("7b", 4096, 32), ("13b", 5120, 40)])
def test_llava_shapes(scale, hidden, layers):
    config = llava_config(scale)
    assert config.text_config.hidden_size == hidden
    assert config.text_config.num_hidden_layers == layers
    assert config.text_config.vocab_size == 32064 and config.image_token_index == 32000
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 == 576


def test_random_checkpoint_loads_4bit_like_a_real_one(tmp_path):
    path = random_checkpoint("tiny", torch.float32, tmp_path)
    assert random_checkpoint("tiny", torch.float32, tmp_path) == path  # cached
    model = load_model(
        ModelConfig(path=str(path), dtype="float32"), QuantConfig(compute_dtype="float32")
    )
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.model.language_model.norm.weight == 1)


def test_mfu_is_six_n_flops_per_token_over_the_peak():
    # 7B (N = 6.6e9) at 4000 tokens/s on an H100 (790 TFLOP/s): 6 * 6.6e9 * 4000 / 790e12 = 20%.
    assert mfu(4000, 6.6e9, 790) == pytest.approx(0.2005, rel=1e-3)
    assert mfu(4000, 6.6e9, None) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 790 and peak_tflops("NVIDIA RTX 4090") == 165
    assert peak_tflops("CPU") is None


def _row(key: str, tokens_per_s: float, reserved: float, status: str = "ok") -> dict:
    return {
        "config": key,
        "label": RECIPES[key].label,
        "status": status,
        "tokens_per_s": tokens_per_s,
        "samples_per_s": tokens_per_s / 700,
        "peak_reserved_gib": reserved,
        "micro_batch": 4,
        "grad_accum": 4,
        "padding_fraction": 0.1,
    }


def test_ratios_and_table():
    rows = [_row("lmmtune", 2600, 10), _row("usual", 2000, 20), _row("lora", 3250, 20)]
    got = {r["pair"]: r for r in ratios(rows, "lmmtune", ("usual", "lora"))}
    assert got["lmmtune/usual"]["tokens_per_s"] == pytest.approx(1.3)
    assert got["lmmtune/usual"]["peak_memory"] == pytest.approx(0.5)
    assert got["lmmtune/lora"]["tokens_per_s"] == pytest.approx(0.8)
    rows[1]["status"] = "OOM"
    assert [r["pair"] for r in ratios(rows, "lmmtune", ("usual", "lora"))] == ["lmmtune/lora"]
    args = parse_args(["--scale", "7b", "--peak-tflops", "790"])
    report = build_report(args, rows, "python -m benchmarks.bench --scale 7b")
    assert report["results"][0]["mfu"] == pytest.approx(2600 * 6 * report["matmul_params"] / 790e12)
    table = markdown(report)
    assert "| (a) lmmtune recipe | ok | 4 x 4 | 2600 |" in table
    assert "lmmtune/lora: tokens/s x0.80" in table and "OOM" in table


def test_arguments_default_per_scale_and_check_config_names():
    args = parse_args(["--scale", "tiny", "--steps", "3"])
    assert (args.micro_batch, args.steps, args.keys) == (2, 3, ["lmmtune", "usual", "lora"])
    assert "a-no-grouping" in parse_args(["--configs", "all"]).keys
    with pytest.raises(SystemExit):
        parse_args(["--configs", "lmmtune,nope"])
    argv = ["--scale", "7b", "--configs", "all", "--out=x.json", "--steps", "3"]
    assert _without(argv, "--configs", "--out") == ["--scale", "7b", "--steps", "3"]


def test_peak_tensor_memory_counts_what_lives_at_once():
    weight = torch.zeros(1000, 1000)  # 4 MB held throughout
    with PeakTensorMemory([weight]) as memory:
        a = torch.ones(1000, 1000) * 2  # a second 4 MB: freed before the next one
        del a
        b = weight + 1
    assert memory.peak == pytest.approx(3 * 4e6, rel=0.01)  # weight + temporary ones + product
    assert memory.live == pytest.approx(2 * 4e6, rel=0.01)  # weight + b
    del b


@pytest.mark.slow
def test_cpu_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    report = run_bench(["--scale", "tiny"], out)
    assert [row["status"] for row in report["results"]] == ["ok", "ok", "ok"]
    for row in report["results"]:
        assert row["tokens_per_s"] > 0 and row["peak_allocated_gib"] > 0
        assert row["final_loss"] == pytest.approx(10.4, abs=0.5)  # ln(32064): random weights
    pairs = {r["pair"]: r for r in report["ratios"]}
    assert set(pairs) == {"lmmtune/usual", "lmmtune/lora"}
    # The chunked loss leaves out the fp32 logits over 576 image positions per sample.
    assert pairs["lmmtune/usual"]["peak_memory"] < 0.5
    assert "lmmtune/usual: tokens/s x" in out.with_suffix(".md").read_text()


def test_a_budget_plans_each_configuration_and_runs_a_misfit_at_micro_batch_1(tmp_path):
    from benchmarks.bench.run import BenchSettings, _configs, _plan

    path = random_checkpoint("tiny", torch.float32, tmp_path)
    data = SyntheticLlavaData(8, IMAGE_TOKEN_ID, 576, 28, IMAGE_TOKEN_ID)
    for budget, expected in ((8.0, (8, 1, "fits")), (0.5, (1, 8, "modelled not to fit"))):
        settings = BenchSettings("tiny", 2, 4, 1, 1, 8, "float32", budget, tmp_path)
        model_cfg, quant_cfg, peft_cfg, train_cfg = _configs(
            RECIPES["usual"], settings, path, "sdpa"
        )
        planned, note = _plan(RECIPES["usual"], train_cfg, model_cfg, quant_cfg, peft_cfg, data)
        assert (planned.batch_size, planned.grad_accum, note) == expected


def test_a_configuration_past_its_time_limit_is_reported_and_the_rest_still_run(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--scale", "tiny", "--configs", "lmmtune,usual", "--isolate", "--config-timeout", "1"]
    report = main([*argv, "--cache-dir", str(tmp_path), "--out", str(out)])
    assert [row["status"] for row in report["results"]] == ["timeout (1 s)", "timeout (1 s)"]
    assert report["ratios"] == []
    assert json.loads(out.read_text())["results"] == report["results"]
    assert "| (b) usual QLoRA (TRL VLM SFT example) | timeout (1 s) |" in markdown(report)


@pytest.mark.parametrize("reentrant", [False, True])
def test_the_checkpointing_variant_asked_for_is_the_one_the_model_runs(tmp_path, reentrant):
    """(b) asks for reentrant checkpointing; transformers 5.2x ignores the old argument name
    when it is set after construction, so the variant is checked where it takes effect."""
    config = llava_config("tiny")
    path = random_checkpoint("tiny", torch.float32, tmp_path)
    base = load_model(
        ModelConfig(path=str(path), dtype="float32"), QuantConfig(compute_dtype="float32")
    )
    model = apply_lora(base, PeftConfig(r=4, alpha=8), gradient_checkpointing=True)
    data = SyntheticLlavaData(
        2, IMAGE_TOKEN_ID, config.image_seq_length, config.vision_config.image_size, IMAGE_TOKEN_ID
    )
    train_cfg = TrainConfig(max_steps=1, batch_size=2, optim="adamw_torch", save_steps=10**6)
    args = build_training_arguments(train_cfg, tmp_path, 0, "float32", use_reentrant=reentrant)
    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=data, data_collator=PaddingCollator(PAD_TOKEN_ID)
    )
    trainer.train()
    checkpointed = [
        module._gradient_checkpointing_func
        for module in model.modules()
        if getattr(module, "gradient_checkpointing", False)
        and hasattr(module, "_gradient_checkpointing_func")
    ]
    assert checkpointed
    assert {func.keywords["use_reentrant"] for func in checkpointed} == {reentrant}
