"""Weights load from safetensors only: a pickle (`*.bin`, `*.pt`) can run code when loaded."""

from __future__ import annotations

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
