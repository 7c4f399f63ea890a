"""Peak tensor memory on a CPU, where PyTorch keeps no allocator statistics.

A dispatch mode sees every tensor an operator returns; each new storage is counted
until it is freed. Tensors that exist before (weights, gradients, optimizer states)
are counted once up front.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakTensorMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storages, from `existing` plus what runs inside the mode."""

    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self._sizes = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0
        for tensor in existing:
            self._count(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # views of sparse or meta tensors
            return
        if storage in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


def state_tensors(model: torch.nn.Module, optimizer) -> list[torch.Tensor]:
    """Weights, buffers, gradients and optimizer states: what a step starts with."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in getattr(optimizer, "state", {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors
