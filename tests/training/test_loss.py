"""The chunked loss equals transformers' loss and gradients, and never builds the full logits."""

from __future__ import annotations

import pytest
import torch

from lmmtune.config import ModelConfig, PeftConfig, QuantConfig, TrainConfig
from lmmtune.errors import LmmtuneError
from lmmtune.model import apply_lora, load_model
from lmmtune.training.loss import (
    IGNORE_INDEX,
    KeepRows,
    chunked_causal_lm_loss,
    find_head_owner,
    head_fed_rows,
    labelled_positions,
    output_head_bypassed,
)
from lmmtune.training.trainer import LlavaTrainer, build_training_arguments

TINY = ModelConfig(path="tiny", dtype="float32")
TINY_PAD_ID = 3
QLORA = QuantConfig(mode="4bit", compute_dtype="float32")


@pytest.fixture(scope="module")
def models(tiny_model_path) -> dict:
    """One tiny QLoRA model per `train_lm_head`, built once for the module."""
    return {head: _model(head) for head in (False, True)}


def _model(train_lm_head: bool):
    torch.manual_seed(0)
    peft_cfg = PeftConfig(r=4, alpha=8, dropout=0.0, train_lm_head=train_lm_head)
    model = apply_lora(load_model(TINY, QLORA), peft_cfg, gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for name, parameter in model.named_parameters():  # LoRA B starts at 0: make it matter
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    return model.train()


def _batch(model, batch_size: int = 3, length: int = 40) -> dict:
    return _batch_for(model.get_base_model().config, batch_size, length)


def _batch_for(config, batch_size: int, length: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    vocab = config.text_config.vocab_size
    ids = torch.randint(5, vocab - 5, (batch_size, length), generator=generator)
    ids[ids == config.image_token_index] = 6
    ids[:, 1:17] = config.image_token_index  # the tiny model's 16 image tokens
    labels = ids.clone()
    labels[:, :25] = IGNORE_INDEX  # prompt and image: no loss
    labels[1, 35:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # right padding
    labels[2, 30:] = IGNORE_INDEX
    pixels = torch.randn(batch_size, 3, 56, 56, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _loss_and_grads(model, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn()
    return loss.detach(), torch.autograd.grad(loss, params)


def test_labelled_positions_apply_the_causal_shift():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 5, IGNORE_INDEX, 9]])
    keep, targets = labelled_positions(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False]]
    assert targets.tolist() == [7, 8, 5, 9]


@pytest.mark.parametrize(("train_lm_head", "chunk_size"), [(False, 1024), (True, 7)])
def test_chunked_loss_and_gradients_equal_the_default(models, train_lm_head, chunk_size):
    model = models[train_lm_head]
    batch = _batch(model)
    default, default_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    chunked, chunked_grads = _loss_and_grads(
        model, lambda: chunked_causal_lm_loss(model, batch, chunk_size=chunk_size)
    )
    torch.testing.assert_close(chunked, default, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 1e-4 for g in default_grads)
    for got, want in zip(chunked_grads, default_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_loss_with_the_head_kept_in_the_forward_equals_the_default(models):
    """The FSDP/DeepSpeed path: logits of the labelled positions only, built in the forward."""
    model = models[True]
    batch = _batch(model)
    default, default_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    kept, kept_grads = _loss_and_grads(
        model, lambda: chunked_causal_lm_loss(model, batch, bypass_head=False)
    )
    torch.testing.assert_close(kept, default, rtol=1e-5, atol=1e-6)
    for got, want in zip(kept_grads, default_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_chunked_loss_normalises_by_the_accumulated_token_count(models):
    model = models[False]
    batch = _batch(model)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        default = model(**batch, num_items_in_batch=torch.tensor(3 * n)).loss
        chunked = chunked_causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(3 * n))
        mean = chunked_causal_lm_loss(model, batch)
    torch.testing.assert_close(chunked, default)
    torch.testing.assert_close(chunked * 3, mean)


def test_batch_without_labels_gives_zero_loss_with_a_graph(models):
    model = models[False]
    batch = _batch(model)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    loss = chunked_causal_lm_loss(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    model.zero_grad(set_to_none=True)


def test_output_head_is_restored_even_after_an_error(models):
    model = models[True]
    head = find_head_owner(model).lm_head
    with pytest.raises(RuntimeError), output_head_bypassed(model):
        assert isinstance(find_head_owner(model).lm_head, KeepRows)
        raise RuntimeError("forward failed")
    assert find_head_owner(model).lm_head is head
    hooks = len(head._forward_pre_hooks)  # the trained head's own dtype cast
    with pytest.raises(RuntimeError), head_fed_rows(model, torch.ones(1, 1, dtype=torch.bool)):
        assert len(head._forward_pre_hooks) == hooks + 1
        raise RuntimeError("forward failed")
    assert len(head._forward_pre_hooks) == hooks


def _trainer(model, loss_impl: str, tmp_path) -> LlavaTrainer:
    train_cfg = TrainConfig(batch_size=3, grad_accum=2, loss_impl=loss_impl, optim="adamw_torch")
    args = build_training_arguments(train_cfg, tmp_path, num_workers=0, dtype="float32")
    return LlavaTrainer(model=model, args=args, train_dataset=[{}])


def test_trainer_training_step_gives_the_same_gradients_with_either_loss(models, tmp_path):
    model = models[False]
    batch = _batch(model)
    grads = {}
    trainer = _trainer(model, "default", tmp_path)
    for impl in ("default", "chunked"):
        trainer.args.loss_impl = impl
        n = torch.tensor(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) * 2)
        trainer.training_step(model, dict(batch), num_items_in_batch=n)
        grads[impl] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
    for got, want in zip(grads["chunked"], grads["default"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_chunked_loss_needs_a_fraction_of_the_memory_at_llava_length(tmp_path):
    """576 image tokens + text, LLaVA's 32064-token vocabulary: the logits dominate the default."""
    from benchmarks.bench.cpu_memory import PeakTensorMemory, state_tensors
    from benchmarks.bench.data import SyntheticLlavaData
    from benchmarks.bench.models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, random_checkpoint
    from lmmtune.data.batches import PaddingCollator

    path = random_checkpoint("tiny", torch.float32, tmp_path)
    peft_cfg = PeftConfig(r=8, alpha=16, dropout=0.0)
    model = apply_lora(
        load_model(ModelConfig(path=str(path), dtype="float32"), QLORA), peft_cfg, True
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = SyntheticLlavaData(1, IMAGE_TOKEN_ID, 576, 336, IMAGE_TOKEN_ID)
    batch = PaddingCollator(PAD_TOKEN_ID)([data[0]])
    peaks = {}
    for impl, loss_fn in (
        ("default", lambda: model(**batch).loss),
        ("chunked", lambda: chunked_causal_lm_loss(model, batch)),
    ):
        with PeakTensorMemory(state_tensors(model, None)) as memory:
            loss_fn().backward()
        model.zero_grad(set_to_none=True)
        peaks[impl] = memory.peak
    logits_bytes = batch["input_ids"].numel() * 32064 * 4
    assert peaks["default"] - peaks["chunked"] > logits_bytes  # at least one full fp32 logits
    assert peaks["chunked"] < 0.35 * peaks["default"]


def _synthetic(size: int) -> list[dict]:
    """`size` samples for the tiny model as the collator takes them (random text, 16 image tokens)."""
    from transformers import AutoConfig

    from lmmtune.demo import tiny_model_dir

    batch = _batch_for(AutoConfig.from_pretrained(tiny_model_dir()), size, 40)
    return [
        {
            "input_ids": batch["input_ids"][i].tolist(),
            "labels": batch["labels"][i].tolist(),
            "pixel_values": batch["pixel_values"][i],
        }
        for i in range(size)
    ]


def test_eval_loss_through_the_chunked_loss_equals_the_default(models, tmp_path):
    model = models[False].eval()
    batch = _batch(model)
    trainer = _trainer(model, "chunked", tmp_path)
    chunked, _, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
    trainer.args.loss_impl = "default"
    default, _, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
    model.train()
    torch.testing.assert_close(chunked, default, rtol=1e-4, atol=1e-5)


def test_eval_steps_log_an_eval_loss_that_falls_to_mlflow(tiny_model_path, tmp_path):
    """train.eval_steps: the loss on held-out samples every N steps, as `eval/loss` in MLflow.
    Here the held-out samples are the training samples, so the loss must fall."""
    from mlflow.tracking import MlflowClient

    from lmmtune.config import TrackingConfig
    from lmmtune.data.batches import PaddingCollator
    from lmmtune.tracking.mlflow_run import TrackerCallback
    from lmmtune.tracking.tracker import start_tracker
    from lmmtune.training.trainer import build_trainer

    model = _model(False)
    data = _synthetic(4)
    train_cfg = TrainConfig(
        max_steps=6, batch_size=2, learning_rate=5e-3, warmup_ratio=0.0, eval_steps=3,
        logging_steps=1, save_steps=100, optim="adamw_torch",
    )  # fmt: skip
    args = build_training_arguments(train_cfg, tmp_path, num_workers=0, dtype="float32")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = start_tracker(TrackingConfig(tracking_uri=uri), "eval-steps", "run", tmp_path)
    callbacks = [TrackerCallback(tracker)]
    trainer = build_trainer(
        model, data, PaddingCollator(TINY_PAD_ID), args, PeftConfig(), None, callbacks, data
    )
    trainer.train()
    tracker.end("FINISHED")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("eval-steps").experiment_id])
    history = client.get_metric_history(run.info.run_id, "eval/loss")
    assert [m.step for m in history] == [3, 6]
    assert history[1].value < history[0].value
    assert "train/loss" in run.data.metrics and "train/eval_loss" not in run.data.metrics


def test_eval_steps_without_an_eval_split_is_a_clear_error(models, tmp_path):
    from lmmtune.training.trainer import build_trainer

    train_cfg = TrainConfig(eval_steps=5)
    args = build_training_arguments(train_cfg, tmp_path, num_workers=0, dtype="float32")
    with pytest.raises(LmmtuneError, match="train.eval_steps needs an eval split"):
        build_trainer(models[False], _synthetic(4), None, args, PeftConfig(), None, [], [])


def test_keep_best_ends_with_the_weights_of_the_lowest_eval_loss(tiny_model_path, tmp_path):
    """Two training samples, four held out, a high learning rate: the model overfits, so
    the lowest eval loss comes early and the last weights are not the best ones."""
    from transformers import TrainerCallback

    from lmmtune.data.batches import PaddingCollator
    from lmmtune.training.callbacks import KeepBestAdapter, trainable_state
    from lmmtune.training.trainer import build_trainer

    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            snapshots[state.global_step] = (metrics["eval_loss"], trainable_state(model))

    model = _model(False)
    data = _synthetic(6)
    train_cfg = TrainConfig(
        max_steps=8, batch_size=2, learning_rate=0.2, warmup_ratio=0.0, scheduler="constant",
        eval_steps=2, keep_best=True, save_steps=100, optim="adamw_torch",
    )  # fmt: skip
    args = build_training_arguments(train_cfg, tmp_path, num_workers=0, dtype="float32")
    keep = KeepBestAdapter(tmp_path)
    callbacks = [keep, Snapshot()]
    collator = PaddingCollator(TINY_PAD_ID)
    trainer = build_trainer(
        model, data[:2], collator, args, PeftConfig(), None, callbacks, data[2:]
    )
    trainer.train()
    last = trainable_state(model)

    best_step = min(snapshots, key=lambda step: snapshots[step][0])
    assert best_step < max(snapshots)  # the case that matters: the best is not the last
    assert keep.restore(model) == {"step": best_step, "eval_loss": snapshots[best_step][0]}
    restored = trainable_state(model)
    assert all(torch.equal(restored[n], t) for n, t in snapshots[best_step][1].items())
    assert any(not torch.equal(restored[n], t) for n, t in last.items())
    assert KeepBestAdapter(tmp_path).best == keep.best  # what a resumed run compares against


def test_keep_best_needs_eval_steps():
    from lmmtune.validate import validate
    from tests.conftest import compose_config

    cfg = compose_config(["recipe=demo", "train.keep_best=true"])
    with pytest.raises(LmmtuneError, match="train.keep_best=true needs train.eval_steps"):
        validate(cfg)


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")


@no_gpu
def test_liger_loss_without_a_gpu_is_a_clear_error_naming_the_install(tmp_path):
    with pytest.raises(LmmtuneError, match="need a CUDA GPU .*pip install liger-kernel"):
        build_training_arguments(TrainConfig(loss_impl="liger"), tmp_path, 0, "float32")
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose_config

    with pytest.raises(ConfigCompositionException) as refused:
        compose_config(["train.loss_impl=fused"])
    assert "expected one of [chunked, default, liger]" in str(refused.value.__cause__)


def test_liger_loss_on_a_gpu_without_the_package_names_the_install(monkeypatch):
    import importlib.util

    from lmmtune.training.trainer import liger_arguments

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU case, on any machine
    with pytest.raises(LmmtuneError, match="needs liger-kernel: pip install liger-kernel"):
        liger_arguments("liger")
    assert liger_arguments("chunked") == {}


@no_gpu
def test_train_with_the_liger_loss_on_cpu_stops_before_writing_anything(tmp_path):
    from lmmtune.stages import train
    from tests.conftest import compose_config

    run_dir = tmp_path / "run"
    cfg = compose_config(["recipe=demo", "train.loss_impl=liger", f"output_dir={run_dir}"])
    with pytest.raises(LmmtuneError, match="pip install liger-kernel"):
        train(cfg)
    assert not run_dir.exists()  # no run directory, no model loaded


def _model_16bit(dtype: str):
    """The tiny QLoRA model in bf16/fp16 (base and compute), LoRA and projector trained."""
    torch.manual_seed(0)
    quant = QuantConfig(mode="4bit", compute_dtype=dtype)
    peft_cfg = PeftConfig(r=4, alpha=8, dropout=0.0)
    model = apply_lora(load_model(ModelConfig(path="tiny", dtype=dtype), quant), peft_cfg, True)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    return model.train()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_model_trains_with_either_loss_without_autocast(tiny_model_path, dtype):
    """The medical recipe's dtypes: nothing may rely on autocast (the Trainer autocasts only
    the forward and hands its outputs back in fp32; generation runs without it)."""
    model = _model_16bit(dtype)
    projector = model.get_base_model().model.multi_modal_projector
    assert projector.modules_to_save["default"].linear_1.weight.dtype == torch.float32
    batch = _batch(model)
    default, default_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    chunked, chunked_grads = _loss_and_grads(
        model, lambda: chunked_causal_lm_loss(model, batch, chunk_size=16)
    )
    torch.testing.assert_close(chunked, default, rtol=2e-2, atol=2e-2)
    flat = torch.cat([g.flatten().float() for g in default_grads])
    other = torch.cat([g.flatten().float() for g in chunked_grads])
    assert torch.isfinite(flat).all() and flat.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(flat, other, dim=0) > 0.99
    with torch.no_grad():  # generation after training, as eval runs it: no autocast either
        prompt = {k: v[:1, :20] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = model.generate(**prompt, pixel_values=batch["pixel_values"][:1], max_new_tokens=2)
    assert out.shape == (1, 22)


def test_trainer_steps_in_bf16_with_either_loss(tmp_path):
    """Trainer.training_step as training runs it (bf16=True: accelerate's autocast and fp32
    outputs), both losses: the same gradients."""
    model = _model_16bit("bfloat16")
    batch = _batch(model)
    train_cfg = TrainConfig(batch_size=3, grad_accum=1, optim="adamw_torch")
    args = build_training_arguments(train_cfg, tmp_path, num_workers=0, dtype="bfloat16")
    trainer = LlavaTrainer(model=model, args=args, train_dataset=[{}])
    grads = {}
    n = torch.tensor(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    for impl in ("default", "chunked"):
        trainer.args.loss_impl = impl
        trainer.training_step(model, dict(batch), num_items_in_batch=n)
        grads[impl] = torch.cat(
            [p.grad.flatten().float() for p in model.parameters() if p.requires_grad]
        )
        model.zero_grad(set_to_none=True)
    assert torch.isfinite(grads["default"]).all()
    cosine = torch.nn.functional.cosine_similarity(grads["default"], grads["chunked"], dim=0)
    assert cosine > 0.99
