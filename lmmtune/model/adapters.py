"""LoRA on the language model only, the projector trained in full or frozen, the vision tower frozen."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper

from lmmtune.config import PeftConfig

log = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"
LM_HEAD = "lm_head"


def lora_target_regex(target_modules: list[str]) -> str:
    """Match the named linears inside the language model, never in the vision tower."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf".*language_model.*\.({names})"


def build_lora_config(peft_cfg: PeftConfig) -> LoraConfig:
    modules_to_save = []
    if peft_cfg.train_projector:
        modules_to_save.append(PROJECTOR)
    if peft_cfg.train_lm_head:
        modules_to_save.append(LM_HEAD)
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=lora_target_regex(peft_cfg.target_modules),
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(
    model: torch.nn.Module, peft_cfg: PeftConfig, gradient_checkpointing: bool
) -> PeftModel:
    """Freeze the base, wrap the language model's linears with LoRA, unfreeze what the config trains."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or no gradient reaches LoRA.
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, build_lora_config(peft_cfg))
    trainable_in_fp32(peft_model)
    match_dtypes_at_trained_modules(peft_model)
    return peft_model


def trainable_in_fp32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Cast the trainable weights to fp32 (optimizer updates in bf16 lose small steps);
    return them by name."""
    trainable = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
            trainable[name] = parameter.data
    return trainable


def match_dtypes_at_trained_modules(model: torch.nn.Module) -> None:
    """Let the fp32 projector and head sit in a bf16/fp16 model without autocast.

    Their inputs are cast to their weights' dtype; the projector's output is cast back
    to its input's dtype, the language model's. Autocast cannot be relied on: the
    Trainer autocasts only the forward, and generation after training runs without it.
    """
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name.endswith((PROJECTOR, LM_HEAD)):
            module.register_forward_pre_hook(_cast_input_to_weights)
            if name.endswith(PROJECTOR):
                module.register_forward_hook(_cast_output_to_input)


def _cast_input_to_weights(module: torch.nn.Module, args: tuple) -> tuple:
    module.lmmtune_input_dtype = next((a.dtype for a in args if torch.is_tensor(a)), None)
    dtype = _trained_dtype(module)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _cast_output_to_input(module: torch.nn.Module, args: tuple, output):
    dtype = getattr(module, "lmmtune_input_dtype", None)
    return output.to(dtype) if dtype is not None and torch.is_tensor(output) else output


def _trained_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the trained copy (peft registers it after the frozen original)."""
    parameters = list(module.parameters())
    trained = [p for p in parameters if p.requires_grad]
    return (trained or parameters[-1:])[0].dtype


@dataclass
class TrainableReport:
    lora: int
    projector: int
    lm_head: int
    other: int
    total: int

    @property
    def trainable(self) -> int:
        return self.lora + self.projector + self.lm_head + self.other

    def as_dict(self) -> dict[str, int | float]:
        return {
            "trainable_lora": self.lora,
            "trainable_projector": self.projector,
            "trainable_lm_head": self.lm_head,
            "trainable_other": self.other,
            "trainable_total": self.trainable,
            "params_total": self.total,
            "trainable_percent": round(100 * self.trainable / max(self.total, 1), 4),
        }

    def __str__(self) -> str:
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} "
            f"({100 * self.trainable / max(self.total, 1):.3f}%) = LoRA {self.lora:,} "
            f"+ projector {self.projector:,} + lm_head {self.lm_head:,}"
            + (f" + other {self.other:,}" if self.other else "")
        )


def trainable_report(model: torch.nn.Module) -> TrainableReport:
    counts = {"lora": 0, "projector": 0, "lm_head": 0, "other": 0}
    total = 0
    for name, parameter in model.named_parameters():
        count = _numel(parameter)
        total += count
        if not parameter.requires_grad:
            continue
        if "lora_" in name:
            counts["lora"] += count
        elif PROJECTOR in name:
            counts["projector"] += count
        elif LM_HEAD in name:
            counts["lm_head"] += count
        else:
            counts["other"] += count
    return TrainableReport(total=total, **counts)


def _numel(parameter: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; count logical parameters.
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and hasattr(quant_state, "shape"):
        return int(torch.Size(quant_state.shape).numel())
    return parameter.numel()
