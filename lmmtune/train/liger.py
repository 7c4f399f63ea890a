"""`train.loss_impl=liger`: Liger's fused linear cross-entropy, through the Trainer's own switch.

The Trainer's `use_liger_kernel` patches the LLaVA forward so that the output head and
the cross entropy run as one chunked Triton kernel: no `[batch, tokens, vocab]`
logits, like lmmtune's chunked loss. For LLaVA, Liger also swaps the language model's
RoPE, RMSNorm and SwiGLU for its kernels (its defaults; the LLaVA patch passes no
switch for them through). Triton kernels run on CUDA GPUs only, so this is a GPU option.
"""

from __future__ import annotations

import importlib.util

import torch

from lmmtune.errors import LmmtuneError

LIGER = "liger"
INSTALL_HINT = "pip install liger-kernel"


def require_liger(loss_impl: str) -> None:
    """Fail early, naming what is missing, when `train.loss_impl=liger` cannot run here."""
    if loss_impl != LIGER:
        return
    if not torch.cuda.is_available():
        raise LmmtuneError(
            "train.loss_impl=liger runs Liger's Triton kernels, which need a CUDA GPU "
            f"(and `{INSTALL_HINT}`); without one use train.loss_impl=chunked, which also "
            "never builds the full logits"
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise LmmtuneError(f"train.loss_impl=liger needs liger-kernel: {INSTALL_HINT}")


def liger_arguments(loss_impl: str) -> dict:
    """The TrainingArguments that turn Liger's fused linear cross-entropy on (empty if not asked)."""
    if loss_impl != LIGER:
        return {}
    require_liger(loss_impl)
    return {
        "use_liger_kernel": True,
        "liger_kernel_config": {"fused_linear_cross_entropy": True, "cross_entropy": False},
    }
