"""The configurations the benchmark puts side by side.

(a) lmmtune's default recipe, (b) the usual QLoRA pipeline as TRL's VLM SFT example
sets it up (reentrant gradient checkpointing, fp32 AdamW, padding to the longest
sample of randomly drawn batches, the loss over every position, no loader workers),
(c) the same LoRA on an unquantized bf16 base (the speed reference). The `a-*`
variants undo one of lmmtune's choices each, to measure what that choice earns;
`a-liger-loss` swaps the chunked loss for Liger's fused linear cross-entropy (GPU only,
`pip install liger-kernel`; elsewhere its row says why it did not run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Recipe:
    key: str
    label: str
    quant: str = "4bit"
    """4bit (QLoRA, NF4 + double quantization) or none."""
    optim: str = "paged_adamw_8bit"
    checkpointing: str = "non-reentrant"
    """non-reentrant, reentrant or none."""
    group_by_length: bool = True
    loss_impl: str = "chunked"
    workers: bool = True
    """Decode batches in loader workers into pinned memory (on a GPU)."""
    attn: str = "auto"
    """As `model.attn_implementation`: auto is flash_attention_2 on a GPU with flash-attn, else sdpa."""
    objective: str = "sft"
    """sft; dpo: a DPO step (TRL's DPOTrainer) on pairs of the same samples; align: stage 1,
    the projector alone trained (no LoRA), on the same samples."""


LMMTUNE = Recipe("lmmtune", "(a) lmmtune recipe")
USUAL = Recipe(
    "usual",
    "(b) usual QLoRA (TRL VLM SFT example)",
    optim="adamw_torch",
    checkpointing="reentrant",
    group_by_length=False,
    loss_impl="default",
    workers=False,
    attn="sdpa",
)
RECIPES = {
    recipe.key: recipe
    for recipe in (
        LMMTUNE,
        USUAL,
        replace(LMMTUNE, key="lora", label="(c) LoRA, unquantized base", quant="none"),
        replace(LMMTUNE, key="dpo", label="(d) DPO step, recipe (a), pairs", objective="dpo"),
        replace(
            LMMTUNE, key="align", label="(e) stage 1: projector only, no LoRA", objective="align"
        ),
        replace(LMMTUNE, key="a-default-loss", label="(a) + default loss", loss_impl="default"),
        replace(LMMTUNE, key="a-liger-loss", label="(a) + Liger fused loss", loss_impl="liger"),
        replace(
            LMMTUNE, key="a-reentrant", label="(a) + reentrant ckpt", checkpointing="reentrant"
        ),
        replace(LMMTUNE, key="a-no-ckpt", label="(a) + no ckpt", checkpointing="none"),
        replace(LMMTUNE, key="a-fp32-adamw", label="(a) + fp32 AdamW", optim="adamw_torch"),
        replace(
            LMMTUNE, key="a-no-grouping", label="(a) + no length grouping", group_by_length=False
        ),
        replace(LMMTUNE, key="a-sdpa", label="(a) + sdpa attention", attn="sdpa"),
        replace(LMMTUNE, key="a-no-workers", label="(a) + no loader workers", workers=False),
    )
}
DEFAULT_KEYS = ("lmmtune", "usual", "lora")
ABLATION_KEYS = tuple(key for key in RECIPES if key.startswith("a-"))
