"""A causal-LM loss that never builds the [batch, tokens, vocab] logits tensor.

LLaVA 1.5 puts 576 image tokens and the prompt in front of every answer, and only
the answer carries labels, so the default loss spends most of its logits (and their
fp32 copy and gradient) on positions it then ignores. Here the forward pass keeps
the hidden states of the labelled positions only (transformers' `logits_to_keep`
with a boolean mask) with the output head bypassed, and the head plus cross
entropy run over those rows in checkpointed chunks: at most `chunk_size x vocab`
logits are alive at any time. Loss and gradients equal the default loss.

Under FSDP or DeepSpeed the head's weights may only be gathered inside the forward,
so there the head stays in place (`bypass_head=False`): the logits of the labelled
positions are built at once, still none over the image and prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose next token is labelled (the causal shift), and those next tokens.

    Returns a boolean [batch, tokens] mask (the last position is never kept) and the
    targets of the kept positions in row-major order, as `hidden[mask]` orders them.
    """
    next_labels = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = next_labels != IGNORE_INDEX
    return keep, next_labels[next_labels != IGNORE_INDEX]


def find_head_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds `lm_head` under DDP/accelerate and peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "lm_head"):
        model = model.module  # DistributedDataParallel and friends
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # peft
    if not hasattr(model, "lm_head"):
        raise TypeError(f"{type(model).__name__} has no lm_head; use train.loss_impl=default")
    return model


@contextmanager
def output_head_bypassed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Swap the output head for an identity during a forward pass; yield the real head.

    The forward then returns hidden states where it would return logits, still through
    the wrapped model's own forward (so DDP hooks and peft adapters run as usual).
    """
    owner = find_head_owner(model)
    head = owner.lm_head
    owner.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        owner.lm_head = head


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Sum of the cross entropy of `head(hidden)` against `targets`, `chunk_size` rows at a time.

    Each chunk is checkpointed: its logits are freed after the forward and rebuilt in
    the backward, so the full [rows, vocab] tensor never exists.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(
            _chunk_loss, hidden[rows], targets[rows], head, use_reentrant=False
        )
    return total


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module):
    logits = head(hidden).float()  # upcast like transformers' loss, one chunk at a time
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = 1024,
    bypass_head: bool = True,
) -> torch.Tensor:
    """The causal-LM loss of `model` on `inputs` (with `labels`), as transformers computes it.

    Normalised by `num_items_in_batch` when the Trainer passes it (the token count of
    the whole accumulated batch), else by this batch's labelled tokens.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep, targets = labelled_positions(labels)
    if bypass_head:
        with output_head_bypassed(model) as head:
            hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    else:
        head = torch.nn.Identity()  # the forward applied the real head already
        hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    loss = chunked_cross_entropy(hidden, head, targets.to(hidden.device), chunk_size)
    if num_items_in_batch is None:
        return loss / targets.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
