"""Weights load from safetensors only: a pickle (`*.bin`, `*.pt`) can run code when loaded."""

from __future__ import annotations

import re
from pathlib import Path

from lmmtune.errors import LmmtuneError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def convert_command(pickle_file: Path) -> str:
    """One command that converts a pickled state dict to safetensors next to it."""
    target = pickle_file.with_name(
        "adapter_model.safetensors"
        if pickle_file.name.startswith("adapter_model")
        else "model.safetensors"
    )
    return (
        'python -c "import torch; from safetensors.torch import save_file; '
        f"save_file(torch.load('{pickle_file}', weights_only=True), '{target}')\""
    )


def require_safetensors(folder: Path, option: str) -> None:
    """Refuse a weights folder that holds pickled weights and no safetensors, naming the fix."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LmmtuneError(
            f"{option}={folder} holds {pickles[0].name}, pickled weights, and no safetensors: "
            "lmmtune loads safetensors only (a pickle can run code when loaded). Convert it "
            f"once, where you trust the file: {convert_command(pickles[0])} "
            "(a sharded model: load it with transformers and save_pretrained it again)"
        )


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_adapter_weights(folder: Path, option: str) -> None:
    """An adapter folder's weights are safetensors whose header reads (a damaged or cut
    file is refused in one line here, not as a traceback from peft later)."""
    require_safetensors(folder, option)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LmmtuneError(f"{option}={folder} holds no {ADAPTER_WEIGHTS}: it is no adapter")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as opened:
            opened.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own and OS errors
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise LmmtuneError(
            f"{option}={folder}: {ADAPTER_WEIGHTS} is damaged ({reason}); train or copy it again"
        ) from None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_of(configured: str | None) -> str | None:
    """`model.path` when it is a hub id (`org/name`, not a local folder), else None."""
    if not configured or not HUB_ID.match(configured) or Path(configured).expanduser().exists():
        return None
    return configured


def name_base_by_hub_id(model, configured: str | None) -> None:
    """Write the hub id, not the local cache path (a home directory), as the adapter's base in
    `adapter_config.json` and its model card; lmmtune reloads from `lmmtune_base.json`."""
    hub_id = hub_id_of(configured)
    if hub_id is None:
        return
    for peft_config in (getattr(model, "peft_config", None) or {}).values():
        peft_config.base_model_name_or_path = hub_id
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config._name_or_path = base.name_or_path = hub_id  # what peft's model card names
