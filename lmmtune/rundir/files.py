"""Files that appear complete or not at all, and weights read from safetensors only.

Files and directories that appear complete or not at all.

Everything is written into a temporary sibling, which is renamed into place (atomic
within one filesystem) only when the block succeeds; a failure or a crash leaves at
most the temporary, never a half-written target. A staging directory left by a killed
process is recognised by its marker and its dead process id, and removed next time.

Weights load from safetensors only: a pickle (`*.bin`, `*.pt`) can run code when loaded.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmmtune.errors import LmmtuneError
from lmmtune.hub import hub_id_of

STAGING_MARKER = ".lmmtune-staging"
_STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: never an empty or half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # one a killed process left; a link planted there is removed
    # A new file only (O_EXCL), never through a link: in a folder someone else made.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with open(os.open(tmp, flags, 0o644), "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: Path) -> list[dict]:
    """Remove staging folders for `target` left by killed processes (marker present, pid dead);
    return what their markers said (`note`: e.g. the MLflow run the killed process had open)."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for candidate in target.parent.iterdir():
        match = _STAGING_NAME.match(candidate.name)
        if not match or match["name"] != target.name or not candidate.is_dir():
            continue
        marker = candidate / STAGING_MARKER
        if marker.exists() and not process_alive(int(match["pid"])):
            note = marker.read_text(errors="replace").partition("\n")[2]
            shutil.rmtree(candidate)
            removed.append({"path": str(candidate), "note": note})
    return removed


@contextmanager
def staged_directory(
    target: Path, replace: bool, marked: bool = False, note: str = ""
) -> Iterator[Path]:
    """A temporary path next to `target`, renamed to it if the block succeeds.

    An existing `target` is removed first when `replace` (callers check that lmmtune made
    it and that it holds nothing else); otherwise the rename fails on it. `marked`: the
    temporary is created with a marker (holding `note`), so that one a killed process left
    is removed later.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.is_symlink():  # planted there: removed as a link, never entered
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    if marked:
        tmp.mkdir()
        (tmp / STAGING_MARKER).write_text(f"{os.getpid()}\n{note}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / STAGING_MARKER).unlink(missing_ok=True)
    if target.exists() and replace:
        shutil.rmtree(target)
    tmp.rename(target)


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
