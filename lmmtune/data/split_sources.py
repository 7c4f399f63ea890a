"""Data sets published in splits: a Hub dataset id, its downloaded copy, a save_to_disk DatasetDict.

A Hub dataset id (`data.train=flaviagiammarino/vqa-rad`) is downloaded into the local hub
cache (`huggingface_hub.snapshot_download`), or found there when the Hub cannot be
reached; without either the command stops with the `hf download` line to run. The
downloaded copy is a folder in the Hub's layout (`data/train-00000-of-00001.parquet`,
`data/test-...`), the same folder that `hf download --repo-type dataset --local-dir`
writes, so a dataset read by its id and one read from a copy are read alike.

Which files form which split is decided by `datasets` (its data-files patterns, or the
`configs` of the dataset card), and the chosen split is read by its dataset builder, as
`datasets.load_dataset` reads it: converted once into the datasets cache and memory-mapped,
never all in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmmtune.errors import LmmtuneError
from lmmtune.hub import cached_snapshot, download_hint, hub_id_of, hub_reachable

TABLE_BUILDERS = ("parquet", "arrow")
"""Split layouts read here: parquet and arrow files (what the Hub's own conversion writes)."""


def split_label(path: str, split: str) -> str:
    """How one split of a source is named: in its records' places, the report and MLflow."""
    return f"{path}:{split}"


def split_of(label: str) -> tuple[str, str | None]:
    """(path or Hub id, split) of a `split_label`; (label, None) for a source of one table."""
    path, colon, split = label.rpartition(":")
    if Path(label).exists() or not colon or not (Path(path).exists() or hub_id_of(path)):
        return label, None
    return path, split


def download_dataset(hub_id: str, setting: str) -> Path:
    """The local folder of Hub dataset `hub_id`: downloaded (or updated) into the hub cache,
    or the cached copy when the Hub cannot be reached; else the download hint for `setting`."""
    if not hub_reachable():
        cached = cached_snapshot(hub_id, None, repo_type="dataset")
        if cached is None:
            raise download_hint("dataset", hub_id, setting, repo_type="dataset")
        return Path(cached)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, repo_type="dataset"))
    except Exception as exc:  # noqa: BLE001 - not found, gated, network: the hub's own errors
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise LmmtuneError(
            f"{setting}={hub_id}: could not download the dataset from the Hugging Face Hub "
            f"({reason})"
        ) from None


@dataclass
class SplitFolder:
    """A local folder that holds a data set in splits: a save_to_disk DatasetDict, or
    parquet/arrow files in the Hub's layout (read through `datasets`' builder for them)."""

    folder: Path
    names: list[str]
    builder: object | None = None
    """`datasets`' builder of a Hub-layout folder; None for a DatasetDict."""

    def load(self, label: str, split: str | None, split_setting: str):
        """Split `split` as a `datasets.Dataset`; a missing or unknown split names the others."""
        import datasets

        if split is None or split not in self.names:
            chosen = f"has no split '{split}'" if split else "holds several splits"
            raise LmmtuneError(
                f"{label} {chosen} (splits: {', '.join(self.names)}): choose one with "
                f"{split_setting}=NAME"
            )
        if self.builder is None:
            return datasets.load_from_disk(str(self.folder / split))
        try:
            self.builder.download_and_prepare()  # local files: converted once into the cache
        except datasets.exceptions.NonMatchingSplitsSizesError:
            raise LmmtuneError(
                f"{label}: its files do not hold the rows its dataset card (README.md) lists "
                "per split: the copy is incomplete or changed; download it again"
            ) from None
        return self.builder.as_dataset(split=split)


def split_folder(folder: Path) -> SplitFolder | None:
    """The splits of `folder`, or None when it holds no data set in splits."""
    if (folder / "dataset_dict.json").exists():
        names = sorted(p.name for p in folder.iterdir() if (p / "state.json").exists())
        return SplitFolder(folder, names)
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(folder))
    except Exception:  # noqa: BLE001 - no data files datasets recognizes: not a split layout
        return None
    if builder.name not in TABLE_BUILDERS or not builder.config.data_files:
        return None
    return SplitFolder(folder, list(builder.config.data_files), builder)
