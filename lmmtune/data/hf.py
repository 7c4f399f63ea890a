"""Hugging Face `datasets` tables as records: `save_to_disk` folders, parquet and arrow files.

Image columns may hold decoded images (the `Image` feature), `{"bytes", "path"}` dicts,
raw bytes or path strings. Tables are read in Arrow format, so no image is decoded
here: a path becomes a path, and an image stored in the table becomes a `TableImage`
that reads its bytes only when a DataLoader worker (or `check`) needs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmmtune.config import DataColumns
from lmmtune.data.records import image_field
from lmmtune.errors import LmmtuneError

BATCH_ROWS = 1000


class TableImage:
    """One image stored in a datasets table: the table (memory-mapped), its row, a label."""

    def __init__(self, table, row: int, label: str, item: int | None = None):
        self.table = table
        """The image column alone, in Arrow format (`Dataset.select_columns(...).with_format("arrow")`)."""
        self.row = row
        self.label = label
        self.item = item
        """Index inside a list cell (a column of image lists), None for a single image."""

    def read(self) -> tuple[bytes, str]:
        cell = self.table[self.row].column(0)[0].as_py()
        if self.item is not None:
            cell = cell[self.item]
        if isinstance(cell, dict):
            return cell.get("bytes") or b"", cell.get("path") or self.label
        return cell or b"", self.label

    def __repr__(self) -> str:
        return f"TableImage({self.label})"


def load_table(path: Path):
    """A `datasets.Dataset` from a save_to_disk folder, parquet files or arrow files."""
    import datasets

    files = sorted(path.glob("*")) if path.is_dir() else [path]
    if path.is_dir() and (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise LmmtuneError(
            f"{path} holds a DatasetDict with splits {', '.join(splits)}: point data.train "
            f"(and data.eval) at one split's folder, e.g. {path / (splits[0] if splits else 'train')}"
        )
    if path.is_dir() and (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    parquet = [str(f) for f in files if f.suffix == ".parquet"]
    arrow = [str(f) for f in files if f.suffix == ".arrow"]
    if parquet:
        # Converted once into the datasets cache and memory-mapped: never all in RAM.
        return datasets.Dataset.from_parquet(parquet if len(parquet) > 1 else parquet[0])
    if arrow:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in arrow])
    raise LmmtuneError(f"{path}: no parquet or arrow files in it")


def table_records(table, name: str, columns: DataColumns) -> Iterator[tuple[str, dict]]:
    """(source, record) per row; the image column holds a path, a TableImage or None."""
    arrow = table.with_format("arrow")
    image_column = image_field(table.column_names, columns)
    text = arrow.select_columns([c for c in table.column_names if c != image_column])
    images = arrow.select_columns([image_column]) if image_column else None
    for start in range(0, len(table), BATCH_ROWS):
        rows = text[start : start + BATCH_ROWS].to_pylist()
        cells = images[start : start + BATCH_ROWS].column(0).to_pylist() if images else None
        for offset, record in enumerate(rows):
            row = start + offset
            if cells is not None:
                label = f"{name}[{row}]:{image_column}"
                record[image_column] = image_value(cells[offset], images, row, label)
            yield f"{name}[{row}]", record


def image_value(cell, images, row: int, label: str, item: int | None = None):
    """A table cell as the records reader wants it: None, a path, a TableImage or a list."""
    if isinstance(cell, list):
        return [
            image_value(value, images, row, f"{label}[{index}]", index)
            for index, value in enumerate(cell)
        ]
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return TableImage(images, row, label, item)
        return cell.get("path")
    if isinstance(cell, bytes | bytearray):
        return TableImage(images, row, label, item)
    return cell
