"""The policy DPO trains: the SFT adapter loaded trainable into the quantized base, or a fresh LoRA.

The vision tower stays frozen; the projector is frozen unless `dpo.train_projector`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import PeftModel

from lmmtune.errors import LmmtuneError
from lmmtune.model.adapters import PROJECTOR, apply_lora
from lmmtune.rundir import base_model_file
from lmmtune.weights import require_adapter_weights

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
REFERENCES = ("adapter_off", "initial")


def start_policy(model: torch.nn.Module, cfg) -> PeftModel:
    """The model DPO starts from: `dpo.init_adapter` (trainable) or a fresh LoRA (`peft.*`)."""
    if cfg.dpo.reference not in REFERENCES:
        raise LmmtuneError(
            f"dpo.reference must be one of {', '.join(REFERENCES)}, not '{cfg.dpo.reference}'"
        )
    checkpointing = cfg.train.gradient_checkpointing
    if not cfg.dpo.from_base:
        adapter_dir = Path(cfg.dpo.init_adapter).expanduser()
        policy = load_trainable_adapter(model, adapter_dir, checkpointing)
    else:
        peft_cfg = OmegaConf.merge(cfg.peft, {"train_projector": cfg.dpo.train_projector})
        policy = apply_lora(model, peft_cfg, checkpointing)
    if not cfg.dpo.train_projector:
        for name, parameter in policy.named_parameters():
            if PROJECTOR in name:
                parameter.requires_grad_(False)
    return policy


def check_init_adapter(dpo_cfg, base_path: str) -> None:
    """Before the run directory is touched: `dpo.init_adapter` holds an adapter (config and
    readable safetensors weights) trained on `base_path`. Its presence is checked with the
    settings (`config_checks.dpo_start`)."""
    if dpo_cfg.from_base:
        return
    adapter_dir = Path(dpo_cfg.init_adapter).expanduser()
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise LmmtuneError(
            f"dpo.init_adapter={adapter_dir}: no adapter there ({ADAPTER_CONFIG} missing); "
            "pass the adapter directory of a finished SFT run (RUN/adapter)"
        )
    try:
        settings = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        raise LmmtuneError(f"dpo.init_adapter={adapter_dir}: {ADAPTER_CONFIG} is damaged")
    require_adapter_weights(adapter_dir, "dpo.init_adapter")
    check_base(adapter_dir, base_path)


def load_trainable_adapter(
    model: torch.nn.Module, adapter_dir: Path, gradient_checkpointing: bool
) -> PeftModel:
    """An SFT run's adapter (LoRA, and projector/head it trained) attached for further training
    (checked by `check_init_adapter` first)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # or no gradient reaches LoRA through checkpoints
    policy = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    for parameter in policy.parameters():  # fp32 updates, as SFT trains them
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    log.info("starting from the adapter in %s", adapter_dir)
    return policy


def check_base(adapter_dir: Path, base_path: str) -> None:
    """Refuse an adapter trained on another base (its record says which one)."""
    record = base_model_file(adapter_dir)
    if not record.is_file():
        return
    try:
        trained_on = json.loads(record.read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        raise LmmtuneError(f"dpo.init_adapter={adapter_dir}: {record.name} is damaged") from None
    if not isinstance(trained_on, str | None):
        raise LmmtuneError(f"dpo.init_adapter={adapter_dir}: {record.name} is damaged")
    moved = trained_on and Path(trained_on).exists()  # a hub id or a moved base: not compared
    if moved and Path(trained_on).resolve() != Path(base_path).resolve():
        raise LmmtuneError(
            f"dpo.init_adapter={adapter_dir} was trained on {trained_on}, not on "
            f"model.path's {base_path}; set model.path to the adapter's base"
        )


def sft_parent(dpo_cfg) -> dict[str, str]:
    """MLflow tags linking a DPO run to the SFT run its adapter came from (RUN/tracking.json)."""
    if dpo_cfg.from_base:
        return {"dpo_start": "base"}
    adapter_dir = dpo_cfg.init_adapter
    from lmmtune.runs import source_run_id

    tags = {"dpo_start": "adapter", "init_adapter": str(Path(adapter_dir).resolve())}
    parent = source_run_id(Path(adapter_dir).resolve().parent)
    if parent:
        tags["sft_parent_run_id"] = parent
    return tags
