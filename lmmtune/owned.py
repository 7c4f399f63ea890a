"""Folders lmmtune made for one purpose, and the files it wrote into them.

Every folder lmmtune creates for a run, an evaluation or an export holds a manifest,
`.lmmtune.json`: what the folder is for (`kind`) and the files lmmtune wrote there.
`overwrite=true` clears only such a folder of its own kind, and only the files the
manifest lists; a file the user put there survives, and a folder without a manifest
(a user folder, a parent of a run, a run when an eval folder is asked for) is never
cleared. Written by hand: no library tracks "files this program wrote" across processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmmtune.atomic import write_text_atomic
from lmmtune.errors import LmmtuneError

MANIFEST = ".lmmtune.json"
LOCK = ".lmmtune.lock"  # a run's lock (lmmtune.rundir): never listed, never cleared
LABELS = {"run": "a run", "eval": "an evaluation", "export": "an export"}


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when lmmtune did not make it (or it is unreadable)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def files_under(folder: Path) -> set[str]:
    """Every file (and link) below `folder`, as paths relative to it; the manifest excluded."""
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(os.path.relpath(os.path.join(root, name), folder))
    found -= {MANIFEST, LOCK}
    return found


def write_manifest(folder: Path, kind: str, files: set[str]) -> None:
    """`folder`'s manifest: made by lmmtune for `kind`, holding `files` (relative paths)."""
    data = {"kind": kind, "files": sorted(files)}
    write_text_atomic(folder / MANIFEST, json.dumps(data, indent=1))


class OwnedFolder:
    """A folder lmmtune made for `kind`; `record()` adds the files written since it was opened."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind
        self._existing = files_under(path) if path.is_dir() else set()

    def write_manifest(self, files: set[str]) -> None:
        write_manifest(self.path, self.kind, files)

    def tracked(self) -> set[str]:
        manifest = read_manifest(self.path)
        return set(manifest["files"]) if manifest else set()

    def record(self) -> None:
        """Add to the manifest every file that appeared since this object was created."""
        new = files_under(self.path) - self._existing
        self.write_manifest(self.tracked() | new)

    def clear(self) -> None:
        """Delete the files the manifest lists, then the folders that became empty.

        A folder inside made by lmmtune too (a run's eval/ or export-merged/) is cleared the
        same way: by its own manifest.
        """
        for root, dirs, _ in os.walk(self.path):
            for name in dirs:
                inner = Path(root) / name
                manifest = read_manifest(inner)
                if manifest is not None and not inner.is_symlink():
                    OwnedFolder(inner, manifest.get("kind", "")).clear()
                    (inner / MANIFEST).unlink()
        for relative in sorted(self.tracked()):
            target = self.path / relative
            if target.is_symlink() or target.is_file():
                target.unlink()
        for root, dirs, _ in os.walk(self.path, topdown=False):
            for name in dirs:
                folder = Path(root) / name
                if not folder.is_symlink() and not any(folder.iterdir()):
                    folder.rmdir()
        self._existing = files_under(self.path)
        self.write_manifest(set())


def claim_folder(
    path: Path, kind: str, overwrite: bool, option: str, overwrite_key: str
) -> OwnedFolder:
    """Create `path` for `kind`, or reopen one lmmtune made for `kind` (cleared with `overwrite`).

    Refused: a non-empty folder without lmmtune's manifest of this kind, whatever `overwrite`
    says; one of this kind without `overwrite`. `option` and `overwrite_key` name the settings.
    """
    if path.exists() and not path.is_dir():
        raise LmmtuneError(f"{path} is a file, not a folder; choose another {option}")
    if path.is_dir() and any(path.iterdir()):
        manifest = read_manifest(path)
        if manifest is None or manifest.get("kind") != kind:
            made_for = f"an lmmtune {manifest['kind']}" if manifest else "not made by lmmtune"
            raise LmmtuneError(
                f"{path} is {made_for} folder, not an lmmtune {kind} folder: lmmtune never "
                f"writes into or clears it. Choose an empty or new {option}"
            )
        if not overwrite:
            raise LmmtuneError(
                f"{path} already holds {LABELS.get(kind, kind)}; pass {overwrite_key}=true to replace "
                f"it, or choose another {option}"
            )
        folder = OwnedFolder(path, kind)
        folder.clear()
        return folder
    path.mkdir(parents=True, exist_ok=True)
    folder = OwnedFolder(path, kind)
    folder.write_manifest(set())
    return folder


@contextmanager
def listed_when_done(folder: OwnedFolder) -> Iterator[OwnedFolder]:
    """List what the block writes into `folder` in its manifest, even when the block fails:
    a later `overwrite=true` clears a failed command's files (its tracking record too)."""
    try:
        yield folder
    finally:
        folder.record()


def add_to_manifest(folder: Path, files: list[Path]) -> None:
    """List `files` (about to be written into `folder`, or written after its command ended)
    in its manifest, if it has one: `overwrite=true` clears them with the rest, and they
    count as lmmtune's."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    names = {os.path.relpath(path, folder) for path in files}
    write_manifest(folder, manifest.get("kind"), set(manifest["files"]) | names)


def foreign_files(path: Path) -> list[str]:
    """Files under `path` that its manifest does not list (what lmmtune must not delete)."""
    manifest = read_manifest(path)
    tracked = set(manifest["files"]) if manifest else set()
    return sorted(files_under(path) - tracked)
