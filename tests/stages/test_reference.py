"""The reference DPO compares against: the adapter switched off, or the starting adapter;
never a second model. The policy starts from a saved adapter, trainable, in fp32."""

from __future__ import annotations

import pytest
import torch

from lmmtune.data.images import DEFAULT_MAX_PIXELS
from lmmtune.data.pairs import PreferenceCollator
from lmmtune.data.records import Sample
from lmmtune.model import apply_lora, load_model
from lmmtune.stages.dpo import (
    REFERENCE_ADAPTER,
    build_dpo_arguments,
    build_dpo_trainer,
    start_policy,
)
from tests.conftest import compose_config
from tests.data.helpers import save_image


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory) -> str:
    """A demo-recipe adapter whose LoRA B is not zero: it changes the model's output."""
    cfg = compose_config(["recipe=demo"])
    model = apply_lora(load_model(cfg.model, cfg.quant), cfg.peft, False)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    target = tmp_path_factory.mktemp("sft") / "adapter"
    model.save_pretrained(target)
    return str(target)


def trainer_for(reference: str, adapter: str, tmp_path, processor):
    cfg = compose_config(
        ["recipe=demo_dpo", f"dpo.init_adapter={adapter}", f"dpo.reference={reference}"]
    )
    policy = start_policy(load_model(cfg.model, cfg.quant), cfg)
    sample = Sample(
        id="p",
        turns=[("Is there a lesion?", "yes")],
        image=str(save_image(tmp_path / "a.png")),
        extra={"rejected": "no"},
    )
    collator = PreferenceCollator([sample], processor, 256, DEFAULT_MAX_PIXELS)
    args = build_dpo_arguments(cfg.train, cfg.dpo, tmp_path, 0, cfg.model.dtype)
    trainer = build_dpo_trainer(
        policy, [sample], [], collator, args, processor, None, None, [], reference, ("projector",)
    )
    batch = collator([{"pair": 0}])
    return trainer, policy, batch


def log_probs(trainer, model, batch, adapter_off=False) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        if adapter_off:
            with model.disable_adapter():
                out = model(**inputs, labels=labels, fused_lm_head=True)
        else:
            out = model(**inputs, labels=labels, fused_lm_head=True)
    return out.log_probs.sum(dim=1)


@pytest.mark.parametrize("reference", ["adapter_off", "initial"])
def test_reference_is_the_configured_one_and_the_policy_trains_in_fp32(
    reference, sft_adapter, tmp_path, tiny_processor
):
    trainer, policy, batch = trainer_for(reference, sft_adapter, tmp_path, tiny_processor)

    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(policy, batch)
    ref = torch.cat([ref_chosen, ref_rejected])
    # after the reference forward (which switches adapters): frozen stays frozen
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert any("lora_A.default" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert [n for n in trainable if f".{REFERENCE_ADAPTER}." in n or "projector" in n] == []
    policy_logps = log_probs(trainer, policy, batch)
    base_logps = log_probs(trainer, policy, batch, adapter_off=True)

    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)  # the adapter matters
    expected = base_logps if reference == "adapter_off" else policy_logps
    torch.testing.assert_close(ref, expected, atol=1e-4, rtol=1e-4)
    assert (REFERENCE_ADAPTER in policy.peft_config) == (reference == "initial")
