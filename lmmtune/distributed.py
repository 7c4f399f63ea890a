"""Data parallel runs under `torchrun` or `accelerate launch`: who writes, who waits.

Every process runs the whole Hydra app and trains its own copy of the QLoRA model
(the Trainer wraps it in DDP). Rank 0 alone prepares the run directory, checks the
data (and writes the demo set), talks to MLflow, saves the adapter, evaluates and
writes `metrics.json`; the other ranks wait for it or receive its results.

Who is who, barriers and broadcasts go through accelerate's `PartialState` (the state the
Trainer itself uses); the functions here are thin names for the rest of lmmtune.

When one rank fails, the launcher (torchrun's elastic agent, which `accelerate launch`
uses too) stops the others, so a rank that waits for rank 0 never hangs on an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ranks wait at a barrier while rank 0 generates (eval before and after training): long
# enough for a few hundred answers of a 13B model, short enough to end a real hang.
WAIT_TIMEOUT = timedelta(hours=2)


def _state():
    """accelerate's `PartialState` once `init()` joined the process group; None in one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        return PartialState()
    return None


def world_size() -> int:
    state = _state()
    return state.num_processes if state else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    state = _state()
    return state.process_index if state else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in a single-process run and on rank 0 of a distributed one."""
    state = _state()
    return state.is_main_process if state else rank() == 0


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def uses_fsdp() -> bool:
    """`accelerate launch` with an FSDP config (it sets ACCELERATE_USE_FSDP for every rank)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def shards_model() -> bool:
    """FSDP or DeepSpeed: the launcher shards the model, no process holds all of it."""
    return uses_fsdp() or uses_deepspeed()


def generates_here() -> bool:
    """Whether this process runs eval generation: rank 0, and only if it holds the whole model."""
    return is_main() and not shards_model()


def find_unused_parameters(train_lm_head: bool, loss_impl: str) -> bool:
    """DDP's `find_unused_parameters` for this run.

    On by default: a batch of text-only records leaves the trained projector unused. Off
    when the chunked loss applies a trained output head outside the forward pass: DDP
    would mark the head's gradient ready twice (once as unused, once in backward).
    """
    return not (train_lm_head and loss_impl == "chunked")


def init() -> None:
    """Join the process group the launcher set up (gloo on CPU, NCCL on GPUs).

    Through accelerate's `PartialState`, as the Trainer would later: it picks the same
    backend (and DeepSpeed's init under `accelerate launch`), and the Trainer then
    reuses this group instead of creating another.
    """
    if not launched() or torch.distributed.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_TIMEOUT)
    log.info("process %d of %d (%s)", rank(), world_size(), torch.distributed.get_backend())
    if shards_model() and is_main():
        log.warning(
            "FSDP/DeepSpeed: the model is sharded, so training skips eval before/after; evaluate the "
            "adapter afterwards on one GPU: python -m lmmtune eval output_dir=RUN_DIR"
        )


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (accelerate's `wait_for_everyone`); nothing to wait for in one process."""
    state = _state()
    if state is not None:
        state.wait_for_everyone()


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only and hand its (picklable) result to every rank.

    For steps that write (the run directory, the demo data) or that need doing once
    (reading and checking the data). An error on rank 0 stops the whole job.
    """
    state = _state()
    if state is None or state.num_processes == 1:
        return fn(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    payload = [fn(*args, **kwargs) if state.is_main_process else None]
    return broadcast_object_list(payload, from_process=0)[0]


def agree_on_output_dir(output_dir: str) -> str:
    """Rank 0's output_dir for every rank.

    The default (`outputs/NAME/${now:...}`) is resolved by each process on its own and
    can differ by a second between ranks. Hydra has already created the directory of a
    rank whose time differs: remove it again if it is still empty.
    """
    if world_size() == 1:
        return output_dir
    shared = on_main(lambda: output_dir)
    if shared != output_dir:
        _remove_if_empty(Path(output_dir))
    return shared


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # rmdir only ever removes an empty directory
        path.rmdir()


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Joined for the stage under torchrun / accelerate launch (alone: nothing to join)."""
    init()
    try:
        yield
    finally:
        shutdown()
