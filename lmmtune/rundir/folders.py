"""Folders lmmtune made for one purpose, and the files it wrote into them.

Every folder lmmtune creates for a run, an evaluation or an export holds a manifest,
`.lmmtune.json`: what the folder is for (`kind`), the files lmmtune wrote there, and (a
run) the folders of its own that later commands made inside it (`RUN/eval`,
`RUN/export-merged`). `overwrite=true` clears only such a folder of its own kind, only the
files the manifest lists and those own folders (each by its own manifest); a file the user
put there survives, and a folder without a manifest (a user folder, a parent of a run, a
run kept inside a run) is never cleared. Written by hand: no library tracks "files this
program wrote" across processes.

A run folder may come from someone else, so a manifest is checked before it is used: a
plain file of bounded size, each entry a plain relative path inside the folder (no
absolute path, no `..`), and nothing is deleted or written through a link. A manifest that
breaks a rule makes the command refuse in one line, before anything is deleted."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lmmtune.errors import LmmtuneError
from lmmtune.rundir.files import write_text_atomic

MANIFEST = ".lmmtune.json"
LOCK = ".lmmtune.lock"  # a run's lock (lmmtune.rundir.run): never listed, never cleared
LABELS = {
    "run": "a run",
    "eval": "an evaluation",
    "export": "an export",
    "two_stage": "a two-stage run",
    "merge": "a merge",
}
RUN_KIND = "run"
EVAL_KIND = "eval"
EXPORT_KIND = "export"
MERGE_KIND = "merge"  # `merge`'s output: a combined adapter with its run settings
NESTED_KINDS = ("eval", "export", "tracking")
"""Kinds of the folders a run may hold of its own (its evaluations, exports, export records)."""
MAX_MANIFEST_BYTES = 64 * 2**20
"""Larger than the manifest of any run (about 100 bytes per file); a bigger one is refused."""
MAX_ENTRY_CHARS = 4096  # PATH_MAX on Linux


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when lmmtune did not make the folder (no manifest).

    A manifest that is there but broken (a link, not a plain file, too big, not JSON, an
    entry outside the folder) raises LmmtuneError naming it: lmmtune neither writes into nor
    clears a folder it cannot trust.
    """
    path = folder / MANIFEST
    try:  # O_NOFOLLOW: a link is refused, O_NONBLOCK: a FIFO does not hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        reason = "it is a link" if path.is_symlink() else f"unreadable: {exc.strerror}"
        raise invalid_manifest(path, reason) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, a FIFO, a device
        os.close(fd)
        raise invalid_manifest(path, "it is not a plain file")
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise invalid_manifest(path, f"larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid_manifest(path, "not JSON") from None
    problem = manifest_problem(data)
    if problem:
        raise invalid_manifest(path, problem)
    return data


def invalid_manifest(path: Path, reason: str) -> LmmtuneError:
    return LmmtuneError(
        f"{path} is not a valid lmmtune manifest ({reason}): lmmtune neither writes into nor "
        f"clears {path.parent} with it. Restore the folder as lmmtune left it, or move what "
        "you keep out of it and delete it"
    )


def manifest_problem(data) -> str | None:
    """What is wrong with a parsed manifest (None: nothing)."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        return "no kind"
    if not isinstance(data.get("files"), list):
        return "no file list"
    for entry in data["files"]:
        problem = entry_problem(entry)
        if problem:
            return f"entry {str(entry)[:80]!r}: {problem}"
    folders = data.get("folders", [])
    if not isinstance(folders, list):
        return "folders is not a list"
    for name in folders:
        problem = entry_problem(name) or ("not a folder name" if "/" in name else None)
        if problem:
            return f"folder {str(name)[:80]!r}: {problem}"
    return None


def entry_problem(entry) -> str | None:
    """Why `entry` is no plain path inside the folder (None: it is one)."""
    if not isinstance(entry, str) or not entry or len(entry) > MAX_ENTRY_CHARS:
        return "not a path"
    if "\x00" in entry:
        return "holds a NUL character"
    if entry.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in entry.split("/")):
        return "leaves the folder or is not a plain relative path"
    if entry in (MANIFEST, LOCK):
        return "lmmtune's own bookkeeping file"
    return None


def files_under(folder: Path, own_only: bool = False) -> set[str]:
    """Every file (and link) below `folder`, as paths relative to it; the manifest excluded.

    `own_only`: not inside the folders below that hold a manifest of their own (an
    evaluation, an export, a run someone copied in): they are not `folder`'s files.
    """
    found = set()
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        if own_only:
            dirs[:] = [d for d in dirs if not os.path.lexists(os.path.join(root, d, MANIFEST))]
        for name in files + links:
            found.add(os.path.relpath(os.path.join(root, name), folder))
    found -= {MANIFEST, LOCK}
    return found


def refuse_links(folder: Path, option: str) -> None:
    """Refuse a folder lmmtune is about to write into or clear that holds a link (the folder
    itself may be one: the user named it). Folders below with a manifest of their own are
    not looked into: they are cleared by their own manifest, or never."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            if path.is_symlink():
                raise link_refused(path, f"Remove the link, or choose another {option}")
        dirs[:] = [d for d in dirs if not os.path.lexists(os.path.join(root, d, MANIFEST))]


def link_refused(path: Path, advice: str = "Remove the link first") -> LmmtuneError:
    """The one-line refusal of a link where lmmtune would write or clear."""
    return LmmtuneError(
        f"{path} is a link (to {os.readlink(path)}): lmmtune never writes or clears through a "
        f"link it did not make. {advice}"
    )


def write_manifest(folder: Path, kind: str, files: set[str], folders: set[str] | None = None):
    """`folder`'s manifest: made by lmmtune for `kind`, holding `files` (relative paths) and,
    for a run, the `folders` of its own that later commands made inside it."""
    data: dict = {"kind": kind, "files": sorted(files)}
    if kind == RUN_KIND:  # only a run holds folders of its own
        data["folders"] = sorted(folders or ())
    write_text_atomic(folder / MANIFEST, json.dumps(data, indent=1))


class OwnedFolder:
    """A folder lmmtune made for `kind`; `record()` adds the files written since it was opened."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind
        self._existing = files_under(path, own_only=True) if path.is_dir() else set()

    def write_manifest(self, files: set[str], folders: set[str] | None = None) -> None:
        """Write the manifest with `files`; the recorded own folders are kept unless given."""
        if folders is None:
            folders = recorded_folders(read_manifest(self.path) or {})
        write_manifest(self.path, self.kind, files, folders)

    def tracked(self) -> set[str]:
        manifest = read_manifest(self.path)
        return set(manifest["files"]) if manifest else set()

    def record(self) -> None:
        """Add to the manifest every file that appeared since this object was created."""
        new = files_under(self.path, own_only=True) - self._existing
        self.write_manifest(self.tracked() | new)

    def clear(self, inputs: Iterable[tuple[str, str]] = ()) -> None:
        """Delete the files the manifest lists and the folders of its own it records (each by
        its own manifest), then the folders that became empty.

        Everything is checked first (manifests, links, and that no path in `inputs`, the
        settings the command reads, would be deleted); a refusal deletes nothing.
        """
        doomed = self.planned_deletions()
        refuse_deleting_inputs(self.path, doomed, inputs)
        for path in doomed:
            path.unlink(missing_ok=True)
        for path in sorted(doomed, key=lambda p: len(p.parts), reverse=True):
            remove_empty_parents(path, self.path)
        self._existing = files_under(self.path, own_only=True)
        self.write_manifest(set(), folders=set())

    def planned_deletions(self) -> list[Path]:
        """The files and links `clear()` deletes (nested manifests included), checked: an
        entry reached through a link, or an own folder that is a link, is refused."""
        manifest = read_manifest(self.path) or {"files": []}
        doomed = []
        folders: dict[str, bool] = {}  # checked folders on the way: a real folder or not
        for entry in manifest["files"]:
            if not real_folder(self.path, os.path.dirname(entry), folders):
                continue  # nothing below a missing folder
            target = self.path / entry
            if target.is_symlink() or target.is_file():
                doomed.append(target)  # a listed link is removed as a link, never entered
        for inner in own_folders(self.path, manifest):
            nested = read_manifest(inner)
            doomed += OwnedFolder(inner, nested["kind"]).planned_deletions()
            doomed.append(inner / MANIFEST)
        return doomed


def recorded_folders(manifest: dict) -> set[str]:
    """The names of the folders of its own a manifest records (a run's only)."""
    return set(manifest.get("folders", []))


def own_folders(folder: Path, manifest: dict) -> list[Path]:
    """The folders inside `folder` that its manifest records as its own and that still hold
    an evaluation's, export's or export record's manifest (never a run kept inside a run)."""
    found = []
    for name in sorted(recorded_folders(manifest)):
        inner = folder / name
        if inner.is_symlink():
            raise link_refused(inner)
        if inner.is_dir() and (read_manifest(inner) or {}).get("kind") in NESTED_KINDS:
            found.append(inner)
    return found


def real_folder(root: Path, relative: str, known: dict[str, bool]) -> bool:
    """Whether `root/relative` is a folder reached through no link (`known`: the answers so
    far, one check per folder); a link on the way is refused."""
    if not relative:
        return True
    if relative not in known:
        parent_ok = real_folder(root, os.path.dirname(relative), known)
        try:
            mode = os.lstat(os.path.join(root, relative)).st_mode if parent_ok else 0
        except OSError:  # missing
            mode = 0
        if stat.S_ISLNK(mode):
            raise link_refused(root / relative)
        known[relative] = stat.S_ISDIR(mode)
    return known[relative]


def remove_empty_parents(path: Path, root: Path) -> None:
    """Remove the folders between `path` and `root` that are left empty (not `root`)."""
    for parent in path.parents:
        if parent == root or root not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:  # not empty (a user's file), or gone already
            return


def refuse_deleting_inputs(
    root: Path, doomed: list[Path], inputs: Iterable[tuple[str, str]]
) -> None:
    """Refuse when a path the command reads (`inputs`: setting, path) would be deleted."""
    base = root.resolve()
    deleted = [base / path.relative_to(root) for path in doomed]
    for setting, value in inputs:
        used = Path(value).expanduser().resolve()
        if any(used == gone or used in gone.parents for gone in deleted):
            raise LmmtuneError(
                f"overwrite=true would delete {setting}={value}, which this command reads: it "
                f"is part of the run in {root}. Choose another output_dir, or copy it out first"
            )


def adopt(folder: Path) -> None:
    """Record `folder` in the manifest of the run it sits in (its direct parent), if any: the
    run's overwrite=true clears it with the run."""
    parent = folder.parent
    manifest = read_manifest(parent)
    if manifest is None or manifest.get("kind") != RUN_KIND:
        return
    folders = recorded_folders(manifest)
    if folder.name not in folders:
        write_manifest(parent, RUN_KIND, set(manifest["files"]), folders | {folder.name})


def claim_folder(
    path: Path, kind: str, overwrite: bool, option: str, overwrite_key: str
) -> OwnedFolder:
    """Create `path` for `kind`, or reopen one lmmtune made for `kind` (cleared with `overwrite`).

    Refused: a link, a non-empty folder without lmmtune's manifest of this kind, whatever
    `overwrite` says; one of this kind without `overwrite`. `option` and `overwrite_key` name
    the settings.
    """
    check_claim(path, kind, overwrite, option, overwrite_key)
    if path.is_dir() and any(path.iterdir()):
        folder = OwnedFolder(path, kind)
        folder.clear()
        adopt(path)
        return folder
    path.mkdir(parents=True, exist_ok=True)
    folder = OwnedFolder(path, kind)
    folder.write_manifest(set())
    adopt(path)
    return folder


def check_claim(path: Path, kind: str, overwrite: bool, option: str, overwrite_key: str) -> None:
    """What `claim_folder` refuses, checked without creating or clearing anything."""
    if path.is_symlink():
        raise link_refused(path, f"Give {option} the folder itself, or choose another")
    if path.exists() and not path.is_dir():
        raise LmmtuneError(f"{path} is a file, not a folder; choose another {option}")
    if not (path.is_dir() and any(path.iterdir())):
        return
    manifest = read_manifest(path)
    if manifest is None or manifest.get("kind") != kind:
        found = (
            f"holds {label(manifest['kind'])}, not {label(kind)}"
            if manifest
            else "holds files and was not made by lmmtune"
        )
        raise LmmtuneError(
            f"{path} {found}: lmmtune never writes into or clears it. Choose an empty or new "
            f"{option}"
        )
    if not overwrite:
        raise LmmtuneError(
            f"{path} already holds {label(kind)}; pass {overwrite_key}=true to replace "
            f"it, or choose another {option}"
        )
    refuse_links(path, option)
    OwnedFolder(path, kind).planned_deletions()


@contextmanager
def claimed_for_this_command(claim, path: Path, *args) -> Iterator[OwnedFolder]:
    """`claim(path, *args)`'s folder for the block; when the block fails, what it wrote is
    removed again if the folder was new or empty (and a new one itself): a failed command
    leaves no folder that would refuse the corrected one."""
    was_new = not path.exists()
    was_empty = was_new or not any(path.iterdir())
    folder = claim(path, *args)
    try:
        yield folder
    except BaseException:
        if was_empty:
            folder.clear()
            (path / MANIFEST).unlink(missing_ok=True)
            if was_new and not any(path.iterdir()):
                path.rmdir()
        raise


def label(kind: str) -> str:
    return LABELS.get(kind, f"an lmmtune {kind} folder")


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
    folders = recorded_folders(manifest) if manifest["kind"] == RUN_KIND else None
    write_manifest(folder, manifest["kind"], set(manifest["files"]) | names, folders)


def owning_folder(path: Path) -> Path | None:
    """The lmmtune folder `path` belongs to: one above it whose manifest lists it, or a
    run's own folder (an evaluation, an export) that holds it; None when it is nobody's."""
    path = path.resolve()  # `..` and links in the folders on the way resolved
    for folder in path.parents:
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        inside = path.relative_to(folder)
        if str(inside) in manifest["files"] or inside.parts[0] in recorded_folders(manifest):
            return folder
    return None


def foreign_files(path: Path) -> list[str]:
    """Files under `path` that its manifest does not list (what lmmtune must not delete)."""
    manifest = read_manifest(path)
    tracked = set(manifest["files"]) if manifest else set()
    return sorted(files_under(path) - tracked)
