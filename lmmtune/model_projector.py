"""An aligned projector for stage 2 (`model.projector`): read, checked, placed into the base.

Three sources are read:

- a stage-1 run folder: `RUN/projector/projector.safetensors`, confined to that folder
  (no link on the way, nothing outside it);
- a projector safetensors file, with llava-hf's key names (`multi_modal_projector.linear_1.*`,
  `.linear_2.*`) or LLaVA's own (`model.mm_projector.0.*`, `.2.*`);
- LLaVA's own `mm_projector.bin`. It is the one pickle lmmtune loads: `torch.load` with
  `weights_only=True`, which unpickles tensors and plain containers only (no code), and the
  result must be a flat dict of tensors. Every other pickle (.pt, .pth, .pkl, .ckpt, any
  other .bin) is refused.

Written here, not taken from a library: no maintained library maps LLaVA's projector keys
onto llava-hf's and checks them against a model's shapes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.run import PROJECTOR_FILE, RunDir

PROJECTOR = "multi_modal_projector"
"""The projector's module name in llava-hf's LLaVA (its keys start with it)."""
LLAVA_KEYS = {
    "model.mm_projector.0.weight": "linear_1.weight",
    "model.mm_projector.0.bias": "linear_1.bias",
    "model.mm_projector.2.weight": "linear_2.weight",
    "model.mm_projector.2.bias": "linear_2.bias",
}
"""LLaVA's own names (its `mm_projector.bin`) -> the projector module's own names."""
LLAVA_HF_KEYS = {f"{PROJECTOR}.{name}": name for name in LLAVA_KEYS.values()}
"""llava-hf's names (a stage-1 run's projector.safetensors) -> the projector module's own."""
ALIGNED_COPY = "aligned_projector.safetensors"
"""In a stage-2 adapter folder: the projector the run started from, llava-hf keys (the base
"before", adapter off, is measured with it)."""
PICKLE_SUFFIX = ".bin"
MAX_BYTES = 2**30
"""Larger than any LLaVA projector (13B: ~32M parameters, 126 MB in fp32)."""


@dataclass(eq=False)
class AlignedProjector:
    """The projector weights (the module's own names: `linear_1.weight`, ...) and their source."""

    weights: dict[str, torch.Tensor]
    source: Path
    """The file read (inside the run folder for a stage-1 run)."""
    sha256: str
    """Of the file read."""

    def tags(self) -> dict[str, str]:
        """MLflow tags naming where the projector came from."""
        return {"projector_source": str(self.source.resolve()), "projector_sha256": self.sha256}

    def save_copy(self, adapter_dir: Path) -> Path:
        """Write the weights (llava-hf keys, as read) into `adapter_dir`, complete or not at all."""
        from safetensors.torch import save_file

        target = Path(adapter_dir) / ALIGNED_COPY
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        named = {f"{PROJECTOR}.{name}": t.contiguous() for name, t in self.weights.items()}
        save_file(named, str(staging), metadata={"source_sha256": self.sha256})
        os.replace(staging, target)
        return target


def read_projector(setting: str, where: str | None = None) -> AlignedProjector:
    """The projector `setting` names (a stage-1 run folder, a .safetensors file or LLaVA's
    mm_projector.bin), its keys mapped and its values checked; LmmtuneError in one line
    starting with `where` (default: `model.projector=SETTING`) otherwise."""
    path = Path(setting).expanduser()
    where = where or f"model.projector={setting}"
    if path.is_dir():
        path = run_projector_file(path, where)
    elif not path.exists():
        raise LmmtuneError(f"{where}: no such file or folder")
    elif not path.is_file():
        raise LmmtuneError(f"{where}: not a regular file")
    if path.stat().st_size > MAX_BYTES:
        raise LmmtuneError(f"{where}: {path.stat().st_size:,} bytes, more than any projector")
    weights = mapped_weights(read_tensors(path, where), where)
    return AlignedProjector(weights=weights, source=path, sha256=file_sha256(path))


def run_projector_file(run_dir: Path, where: str) -> Path:
    """RUN/projector/projector.safetensors of a stage-1 run, with no link on the way out of RUN."""
    run = RunDir(run_dir)
    if not run.holds_run():
        raise LmmtuneError(
            f"{where}: a folder that is no lmmtune run (no run manifest); pass a stage-1 run "
            "folder, a projector .safetensors file or LLaVA's mm_projector.bin"
        )
    target = run.projector_dir / PROJECTOR_FILE
    for part in (run.projector_dir, target):
        if part.is_symlink():
            raise LmmtuneError(f"{where}: {part} is a link; the projector must lie inside the run")
    if not target.is_file():
        raise LmmtuneError(
            f"{where}: the run holds no projector ({target} missing): pass a finished stage-1 "
            "run (recipe=demo_align or an align recipe)"
        )
    if not target.resolve().is_relative_to(run_dir.resolve()):
        raise LmmtuneError(f"{where}: {target} lies outside the run folder; refused")
    return target


def read_tensors(path: Path, where: str) -> dict:
    """The tensors of a .safetensors file, or of the one accepted pickle (`*.bin`, tensors only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own and OS errors
            raise LmmtuneError(
                f"{where}: not a readable safetensors file ({_first(exc)})"
            ) from None
    if path.suffix != PICKLE_SUFFIX:
        raise LmmtuneError(
            f"{where}: {path.suffix or 'no suffix'} is refused: give a .safetensors file, "
            "LLaVA's mm_projector.bin or a stage-1 run folder (other pickles can run code)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise LmmtuneError(
            f"{where}: not a plain file of tensors, refused (torch.load with weights_only: "
            f"{_first(exc)})"
        ) from None


def mapped_weights(loaded, where: str) -> dict[str, torch.Tensor]:
    """The projector module's own names -> float tensors, from exactly LLaVA's or llava-hf's 4 keys."""
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise LmmtuneError(f"{where}: not a flat dict of tensors, refused")
    keys = set(loaded)
    names = next((m for m in (LLAVA_HF_KEYS, LLAVA_KEYS) if keys == set(m)), None)
    if names is None:
        shown = ", ".join(sorted(map(str, keys))[:6]) + (" ..." if len(keys) > 6 else "")
        raise LmmtuneError(
            f"{where}: keys {{{shown}}} are not a LLaVA projector's (expected "
            f"{', '.join(LLAVA_HF_KEYS)}, or LLaVA's {', '.join(LLAVA_KEYS)})"
        )
    for key, tensor in loaded.items():
        if not tensor.is_floating_point():
            raise LmmtuneError(f"{where}: {key} is {tensor.dtype}, not a float tensor")
        if not torch.isfinite(tensor).all():
            raise LmmtuneError(f"{where}: {key} holds NaN or infinite values")
    return {names[key]: tensor for key, tensor in loaded.items()}


def expected_shapes(model_config) -> dict[str, torch.Size]:
    """The projector's shapes for a llava-hf config (vision hidden -> text hidden), built on
    the meta device by transformers' own class (no memory, no weights)."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.device("meta"):
        module = LlavaMultiModalProjector(model_config)
    return {name: tensor.shape for name, tensor in module.state_dict().items()}


def check_fits(aligned: AlignedProjector, shapes: dict[str, torch.Size], where: str) -> None:
    """Refuse weights whose names or shapes differ from the model's projector (`shapes`)."""
    if set(shapes) != set(aligned.weights):
        raise LmmtuneError(
            f"{where}: the model's projector has {', '.join(sorted(shapes))}, the file "
            f"{', '.join(sorted(aligned.weights))}"
        )
    for name, shape in shapes.items():
        found = aligned.weights[name].shape
        if found != shape:
            raise LmmtuneError(
                f"{where}: {name} is {list(found)}, the model's projector takes {list(shape)} "
                "(vision hidden -> text hidden): a projector of another model"
            )


def place_projector(model: torch.nn.Module, aligned: AlignedProjector, where: str) -> None:
    """Copy the aligned weights into the (unwrapped) model's projector, in its dtype and device."""
    modules = [m for name, m in model.named_modules() if name.split(".")[-1] == PROJECTOR]
    if len(modules) != 1:
        raise LmmtuneError(f"{where}: the model has {len(modules)} projectors, expected one")
    module = modules[0]
    check_fits(aligned, {k: v.shape for k, v in module.state_dict().items()}, where)
    with torch.no_grad():
        module.load_state_dict(aligned.weights)


def adapter_copy(adapter_dir: Path) -> AlignedProjector | None:
    """The aligned projector a stage-2 adapter folder carries (None: it carries none); a link
    there is refused."""
    path = Path(adapter_dir) / ALIGNED_COPY
    if path.is_symlink():
        raise LmmtuneError(f"{path} is a link; an adapter's projector must lie in its folder")
    if not path.is_file():
        return None
    return read_projector(str(path), where=f"the adapter's aligned projector {path}")


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _first(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
