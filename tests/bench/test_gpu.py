"""On a CUDA GPU: 4-bit loading, training steps, the chunked and Liger losses in bf16, merge parity,
the benchmark.

Run with `python -m pytest -m gpu`; every test is skipped where CUDA is missing.
"""

from __future__ import annotations

import pytest
import torch

from lmmtune.config import ModelConfig, PeftConfig, QuantConfig, TrainConfig
from lmmtune.model import apply_lora, load_model
from tests.conftest import run_bench

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TINY_BF16 = ModelConfig(path="tiny", dtype="bfloat16")


def _perturb(model) -> None:
    """LoRA B starts at zero; random B and projector weights make the adapter matter."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and ("lora_B" in name or "multi_modal_projector" in name):
                noise = torch.randn(parameter.shape, generator=generator, device="cuda")
                parameter.add_(0.05 * noise.to(parameter.dtype))


def _tiny_batch(model, batch_size: int = 2) -> dict:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.text_config.vocab_size - 5, (batch_size, 40), generator=generator)
    ids[ids == config.image_token_index] = 6
    ids[:, 1:17] = config.image_token_index
    labels = ids.clone()
    labels[:, :25] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size, 3, 56, 56, generator=generator),
    }


def test_4bit_load_on_cuda(tiny_model_path):
    import bitsandbytes as bnb

    model = load_model(TINY_BF16, QuantConfig())
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.device.type == "cuda"
    assert q_proj.weight.quant_state.quant_type == "nf4"
    projector = model.model.multi_modal_projector.linear_1
    assert not isinstance(projector, bnb.nn.Linear4bit) and projector.weight.dtype == torch.bfloat16
    batch = {k: v.cuda() for k, v in _tiny_batch(model).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_chunked_loss_matches_the_default_in_bf16_on_cuda(tiny_model_path):
    from lmmtune.training.loss import chunked_causal_lm_loss

    model = apply_lora(
        load_model(TINY_BF16, QuantConfig()), PeftConfig(r=8, alpha=16), True
    ).train()
    _perturb(model)
    batch = {k: v.cuda() for k, v in _tiny_batch(model.get_base_model()).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        default = model(**batch).loss
        default_grads = torch.autograd.grad(default, params)
        chunked = chunked_causal_lm_loss(model, batch, chunk_size=16)
        chunked_grads = torch.autograd.grad(chunked, params)
    torch.testing.assert_close(chunked, default, rtol=1e-2, atol=1e-2)
    flat = torch.cat([g.flatten().float() for g in default_grads])
    other = torch.cat([g.flatten().float() for g in chunked_grads])
    assert torch.nn.functional.cosine_similarity(flat, other, dim=0) > 0.99


def test_training_steps_on_cuda_with_the_recipe_settings(tmp_path):
    from benchmarks.bench.data import SyntheticLlavaData
    from benchmarks.bench.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, random_checkpoint
    from lmmtune.data.batches import PaddingCollator
    from lmmtune.training.trainer import build_trainer, build_training_arguments

    path = random_checkpoint("tiny", torch.bfloat16, tmp_path)
    model_cfg = ModelConfig(path=str(path), dtype="bfloat16")
    model = apply_lora(load_model(model_cfg, QuantConfig()), PeftConfig(r=16, alpha=32), True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_cfg = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, logging_steps=1)
    args = build_training_arguments(train_cfg, tmp_path, num_workers=2, dtype="bfloat16")
    data = SyntheticLlavaData(64, IMAGE_TOKEN_ID, 576, 336, IMAGE_TOKEN_ID)
    torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(
        model, data, PaddingCollator(PAD_TOKEN_ID), args, PeftConfig(), data.lengths, []
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(10 < loss < 11 for loss in losses)  # ~ln(32064), random init
    changed = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert any("lora_" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert optimizer.is_paged and optimizer.args.optim_bits == 8  # bitsandbytes' paged 8-bit AdamW
    # Every weight lives on the GPU, and the step's peak held them and more (activations, states).
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert torch.cuda.max_memory_allocated() > weight_bytes


def _train_losses(checkpoint, loss_impl: str, workdir) -> tuple[list[float], object]:
    from benchmarks.bench.data import SyntheticLlavaData
    from benchmarks.bench.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID
    from lmmtune.data.batches import PaddingCollator
    from lmmtune.training.trainer import build_trainer, build_training_arguments

    torch.manual_seed(0)  # the same LoRA init for both losses
    model_cfg = ModelConfig(path=str(checkpoint), dtype="bfloat16")
    model = apply_lora(load_model(model_cfg, QuantConfig()), PeftConfig(r=16, alpha=32), True)
    train_cfg = TrainConfig(max_steps=3, batch_size=2, logging_steps=1, loss_impl=loss_impl)
    args = build_training_arguments(train_cfg, workdir, num_workers=0, dtype="bfloat16")
    data = SyntheticLlavaData(16, IMAGE_TOKEN_ID, 576, 336, IMAGE_TOKEN_ID)
    trainer = build_trainer(
        model, data, PaddingCollator(PAD_TOKEN_ID), args, PeftConfig(), data.lengths, []
    )
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], model


def test_liger_fused_loss_trains_as_the_chunked_loss_on_cuda(tmp_path):
    """train.loss_impl=liger (Trainer's use_liger_kernel): the same losses, Liger's forward."""
    pytest.importorskip("liger_kernel")
    from benchmarks.bench.models import random_checkpoint

    path = random_checkpoint("tiny", torch.bfloat16, tmp_path)
    chunked, _ = _train_losses(path, "chunked", tmp_path / "chunked")
    liger, model = _train_losses(path, "liger", tmp_path / "liger")
    assert len(liger) == len(chunked) == 3
    assert liger == pytest.approx(chunked, rel=2e-2)  # bf16 kernels, different sums
    assert model.get_base_model().forward.__func__.__module__.startswith("liger_kernel")


def test_merge_parity_on_cuda(tiny_model_path, tmp_path):
    from lmmtune.export.merge import (
        PARITY_TOLERANCE,
        compare_logits,
        load_exported,
        merge_and_save,
        token_logits,
    )
    from lmmtune.model import load_processor

    model = apply_lora(load_model(TINY_BF16, QuantConfig()), PeftConfig(r=8, alpha=16), False)
    _perturb(model)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    batch = {k: v for k, v in _tiny_batch(model.get_base_model()).items() if k != "labels"}
    quantized = token_logits(model, batch)
    del model
    torch.cuda.empty_cache()

    fp32 = ModelConfig(path="tiny", dtype="float32")
    reference = merge_and_save(fp32, adapter_dir, tmp_path / "merged", load_processor(fp32), batch)
    merged = token_logits(load_exported(tmp_path / "merged", "float32"), batch)
    parity = compare_logits(reference, merged, PARITY_TOLERANCE["float32"], samples=2)
    assert parity.passed and parity.argmax_agreement == 1.0, parity
    # Against the adapter on the 4-bit base only the quantization error remains.
    assert compare_logits(quantized, merged, 1.0, samples=2).relative_diff < 0.3


def test_benchmark_on_cuda_reports_memory_and_mfu(tmp_path):
    report = run_bench(["--scale", "tiny", "--steps", "3"], tmp_path / "bench.json")
    assert [row["status"] for row in report["results"]] == ["ok", "ok", "ok"]
    for row in report["results"]:
        assert 0 < row["peak_allocated_gib"] <= row["peak_reserved_gib"]
        assert row["device_used_gib"] > 0 and row["mfu"] is not None
        assert row["tokens_per_s"] > 0
    assert {r["pair"] for r in report["ratios"]} == {"lmmtune/usual", "lmmtune/lora"}


@pytest.mark.parametrize("loss_impl", ["chunked", "default"])
def test_medical_dtypes_train_without_autocast_on_cuda(tiny_model_path, loss_impl):
    """bf16 base and compute, fp32 LoRA and projector, the loss outside any autocast (as
    transformers 5's Trainer computes it): finite gradients that agree between the losses."""
    from lmmtune.training.loss import chunked_causal_lm_loss

    model = apply_lora(
        load_model(TINY_BF16, QuantConfig(compute_dtype="bfloat16")),
        PeftConfig(r=8, alpha=16),
        True,
    ).train()
    _perturb(model)
    batch = {k: v.cuda() for k, v in _tiny_batch(model.get_base_model()).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    default = model(**batch).loss
    default_grads = torch.autograd.grad(default, params)
    if loss_impl == "chunked":
        loss = chunked_causal_lm_loss(model, batch, chunk_size=16)
        grads = torch.autograd.grad(loss, params)
        torch.testing.assert_close(loss, default, rtol=2e-2, atol=2e-2)
    else:
        grads = default_grads
    flat = torch.cat([g.flatten().float() for g in default_grads])
    other = torch.cat([g.flatten().float() for g in grads])
    assert torch.isfinite(other).all() and other.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(flat, other, dim=0) > 0.99
