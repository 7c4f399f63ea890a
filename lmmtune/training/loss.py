"""A causal-LM loss that never builds the [batch, tokens, vocab] logits tensor.

LLaVA 1.5 puts 576 image tokens and the prompt in front of every answer, and only
the answer carries labels, so the default loss spends most of its logits (and their
fp32 copy and gradient) on positions it then ignores. Here the output head is
swapped, for the forward pass, for a module that only keeps the hidden states of
the labelled positions; the real head plus cross entropy then run over those rows
in checkpointed chunks: at most `chunk_size x vocab` logits are alive at any time.
Loss and gradients equal the default loss.

Under FSDP or DeepSpeed the head's weights may only be gathered inside the forward,
so there the head stays in place (`bypass_head=False`) and a pre-forward hook hands
it the labelled rows only: their logits are built at once, still none over the
image and prompt.

Both work on every transformers 5.x (whose `logits_to_keep` took a boolean mask
only from 5.2x on): the row selection is ours, not the model's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmmtune.data.prompt import IGNORE_INDEX


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


class KeepRows(torch.nn.Module):
    """Stands in for the output head: the [batch, tokens, hidden] states at `keep`, flattened."""

    def __init__(self, keep: torch.Tensor | None = None):
        super().__init__()
        self.keep = keep

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.keep is None else hidden[self.keep.to(hidden.device)]


@contextmanager
def output_head_bypassed(
    model: torch.nn.Module, keep: torch.Tensor | None = None
) -> Iterator[torch.nn.Module]:
    """Swap the output head for `KeepRows(keep)` during a forward pass; yield the real head.

    The forward then returns hidden states (of the `keep` positions) where it would
    return logits, still through the wrapped model's own forward (so DDP hooks and
    peft adapters run as usual).
    """
    owner = find_head_owner(model)
    head = owner.lm_head
    owner.lm_head = KeepRows(keep)
    try:
        yield head
    finally:
        owner.lm_head = head


@contextmanager
def head_fed_rows(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Keep the output head in place but feed it the hidden states at `keep` only."""
    head = find_head_owner(model).lm_head
    handle = head.register_forward_pre_hook(lambda _module, args: (KeepRows(keep)(args[0]),))
    try:
        yield
    finally:
        handle.remove()


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Sum of the cross entropy of `head(hidden)` against `targets`, `chunk_size` rows at a time.

    Each chunk is checkpointed: its logits are freed after the forward and rebuilt in
    the backward, so the full [rows, vocab] tensor never exists. The hidden states are
    cast to the head's dtype: this runs after the forward, outside any autocast (the
    Trainer hands the forward's outputs back in fp32), and a bf16 head refuses fp32 rows.
    """
    head_dtype = next((p.dtype for p in head.parameters()), hidden.dtype)
    hidden = hidden.to(head_dtype)
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
        with output_head_bypassed(model, keep) as head:
            hidden = model(**inputs, use_cache=False).logits
    else:
        head = torch.nn.Identity()  # the forward applied the real head already
        with head_fed_rows(model, keep):
            hidden = model(**inputs, use_cache=False).logits
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    loss = chunked_cross_entropy(hidden, head, targets.to(hidden.device), chunk_size)
    if num_items_in_batch is None:
        return loss / targets.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
