"""Read a data file, folder or `datasets` table, whatever its format, into Samples and named problems.

Read a data file or folder, whatever its format, into Samples and named problems.

Formats, chosen by the path:
- `.json`: LLaVA JSON, a list of records.
- `.jsonl`: one record per line (LLaVA or flat columns).
- `.csv`: flat columns, a header row naming them.
- `.parquet`, `.arrow` files, a folder of them or a glob (`data/train-*.parquet`), and a
  `save_to_disk` folder: Hugging Face `datasets` tables.
- a folder with `metadata.jsonl` or `metadata.csv`: the `imagefolder` layout, whose
  `file_name` column names the image next to the metadata.
- a data set published in splits, one split of it (`data.train_split`, `data.eval_split`):
  a Hub dataset id (`org/name`, downloaded into the hub cache), its downloaded copy (parquet
  files in the Hub's layout, `data/train-*.parquet`) or a save_to_disk DatasetDict folder
  (`lmmtune.data.split_sources`).

A broken JSONL line or CSV row is one bad record; a file that cannot be read at all
(not UTF-8, invalid JSON document, missing columns) stops with a file-level error.

Hugging Face `datasets` tables as records: `save_to_disk` folders, parquet and arrow files.

Image columns may hold decoded images (the `Image` feature), `{"bytes", "path"}` dicts,
raw bytes or path strings. Tables are read in Arrow format, so no image is decoded
here: a path becomes a path, and an image stored in the table becomes a `TableImage`
that reads its bytes only when a DataLoader worker (or `check`) needs them.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmmtune.config import DataColumns, DataConfig
from lmmtune.data.pairs import is_pair_columns, is_pair_record, pair_to_sample
from lmmtune.data.records import (
    Sample,
    caption_field,
    image_field,
    problem_for,
    record_to_sample,
)
from lmmtune.data.split_sources import SplitFolder, download_dataset, split_folder, split_label
from lmmtune.demo import DEMO, DEMO_CAPTIONS, write_demo_captions, write_demo_dataset
from lmmtune.errors import Kind, LmmtuneError, RecordInvalid, RecordProblem
from lmmtune.hub import hub_id_of

TABLE_SUFFIXES = (".parquet", ".arrow")
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
DEFAULT_SPLIT = "train"
"""data.train_split's default: a source with no splits is read whole with it."""


@dataclass(frozen=True)
class Source:
    """What to read: a path or Hub dataset id, the split of a source that holds several, and
    the settings that name them (in errors and in the download hint)."""

    path: str
    split: str | None = None
    setting: str = "data.train"
    split_setting: str = "data.train_split"


@dataclass
class DataFile:
    """What one data file held: the good samples, the bad records, and where images live."""

    path: str
    samples: list[Sample] = field(default_factory=list)
    problems: list[RecordProblem] = field(default_factory=list)
    warnings: list[RecordProblem] = field(default_factory=list)
    image_root: Path = Path(".")
    """Default root of relative image paths: the file's folder, or the dataset folder itself."""

    @property
    def records(self) -> int:
        return len(self.samples) + len(self.problems)


def read_data(path: str | Path | Source, columns: DataColumns) -> DataFile:
    """Read every record of a data file, folder, glob or split; keep going past bad records."""
    source = path if isinstance(path, Source) else Source(str(path))
    data = DataFile(source.path)
    raw, data.image_root = _raw_records(source, columns, data)
    for source, record in raw:
        if isinstance(record, RecordInvalid):
            data.problems.append(RecordProblem(source, None, record.reason, record.kind))
            continue
        try:
            to_sample = pair_to_sample if is_pair_record(record) else record_to_sample
            data.samples.append(to_sample(record, source, columns))
        except RecordInvalid as error:
            data.problems.append(problem_for(record, source, columns, error))
    return data


def data_sources(data_cfg: DataConfig, work_dir: Path) -> tuple[Source, Source | None]:
    """data.train and the eval data, each with its split: data.eval, else data.train's
    data.eval_split, else None (a fraction is split off). `demo` writes the synthetic set
    into `work_dir` first (its own eval split unless data.eval names another)."""
    if data_cfg.train is None:
        raise LmmtuneError(
            "no training data: set data.train=PATH (LLaVA JSON, JSONL, CSV, parquet, a datasets "
            "folder, a Hub dataset id), data.train=demo or data.train=demo_captions"
        )
    eval_split = data_cfg.eval_split
    if data_cfg.train in (DEMO, DEMO_CAPTIONS):
        train, evaluation = write_demo_data(data_cfg, work_dir / "demo_data")
        eval_path = data_cfg.eval or str(evaluation)
        return Source(str(train)), Source(eval_path, eval_split, "data.eval", "data.eval_split")
    train = Source(data_cfg.train, data_cfg.train_split)
    if data_cfg.eval is not None:
        return train, Source(data_cfg.eval, eval_split, "data.eval", "data.eval_split")
    if eval_split is not None:
        return train, Source(data_cfg.train, eval_split, "data.train", "data.eval_split")
    return train, None


def write_demo_data(data_cfg: DataConfig, folder: Path) -> tuple[Path, Path]:
    """The synthetic demo set data.train names (`demo`: questions of data.demo_task;
    `demo_captions`: one caption per scan), written into `folder`: its train and eval files."""
    if data_cfg.train == DEMO_CAPTIONS:
        return write_demo_captions(folder, data_cfg.demo_size, data_cfg.seed)
    return write_demo_dataset(
        folder, data_cfg.demo_size, data_cfg.seed, task=str(data_cfg.demo_task)
    )


def _raw_records(source: Source, columns: DataColumns, data: DataFile) -> tuple[Iterable, Path]:
    """(source, record) pairs and the default image root, by the path's format."""
    path = source.path
    if glob.has_magic(path):
        files = [Path(p) for p in sorted(glob.glob(path))]
        if not files:
            raise LmmtuneError(f"no files match {path}")
        _one_table(source)
        return _table(files, path, columns, data), Path(path).parent
    location = Path(path)
    if not location.exists() and is_hub_dataset_id(path):
        location = download_dataset(path, source.setting)
    if not location.exists():
        raise LmmtuneError(f"data file not found: {location}")
    if location.is_dir():
        return _folder(location, source, columns, data), location
    _one_table(source)
    suffix = location.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return _table([location], path, columns, data), location.parent
    if suffix == ".csv":
        return csv_records(location, read_text(location), columns, data), location.parent
    if suffix == ".jsonl":
        return jsonl_records(location, read_text(location)), location.parent
    if suffix == ".json":
        return json_records(location, read_text(location)), location.parent
    raise LmmtuneError(
        f"{location}: unknown data format '{suffix}': use .json, .jsonl, .csv, .parquet, "
        ".arrow, a datasets save_to_disk folder or an imagefolder with metadata.jsonl"
    )


def is_hub_dataset_id(path: str) -> bool:
    """`org/name` with no local file of that name and no data file suffix (a mistyped
    `data/train.json` is a missing file, not a Hub dataset)."""
    suffix = Path(path).suffix.lower()
    return hub_id_of(path) is not None and suffix not in (
        *TABLE_SUFFIXES,
        ".csv",
        ".json",
        ".jsonl",
    )


def _folder(folder: Path, source: Source, columns: DataColumns, data: DataFile) -> Iterable:
    """A folder by its layout: an imagefolder, one table (save_to_disk, parquet/arrow files),
    or a data set in splits (a DatasetDict, parquet/arrow files in the Hub's layout)."""
    metadata = next((folder / n for n in IMAGEFOLDER_METADATA if (folder / n).exists()), None)
    if metadata is not None:
        _one_table(source)
        return imagefolder_records(metadata, columns, data)
    if (folder / "state.json").exists() or any(
        p.suffix in TABLE_SUFFIXES for p in folder.iterdir()
    ):
        _one_table(source)
        return _table([folder], str(folder), columns, data)
    splits = split_folder(folder)
    if splits is not None:
        return _split(splits, source, columns, data)
    raise LmmtuneError(
        f"{folder}: a folder, but not a datasets save_to_disk folder (no state.json), "
        "not an imagefolder (no metadata.jsonl/metadata.csv), no parquet/arrow files and no "
        "splits of them (a DatasetDict, or the Hub's data/train-*.parquet)"
    )


def _one_table(source: Source) -> None:
    """A source with no splits is read whole: a split other than the default is refused."""
    if source.split in (None, DEFAULT_SPLIT):
        return
    whole = (
        "data.eval_split=null evaluates on data.eval whole, or on data.eval_fraction of data.train"
        if source.split_setting == "data.eval_split"
        else f"it is read whole with {source.split_setting}={DEFAULT_SPLIT}"
    )
    raise LmmtuneError(
        f"{source.split_setting}={source.split}: {source.path} holds one table, not splits "
        f"({whole})"
    )


def _split(splits: SplitFolder, source: Source, columns: DataColumns, data: DataFile) -> Iterable:
    """One split of a source that holds several; its records named `PATH:SPLIT[row]`."""
    table = splits.load(source.path, source.split, source.split_setting)
    data.path = name = split_label(source.path, source.split)
    _check_columns(table.column_names, name, columns, data)
    return table_records(table, name, columns)


def _table(paths: list[Path], name: str, columns: DataColumns, data: DataFile) -> Iterable:
    import datasets

    tables = [load_table(p) for p in paths]
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    _check_columns(table.column_names, name, columns, data)
    return table_records(table, name, columns)


def read_text(path: Path) -> str:
    """The file as text; a non-UTF-8 file stops with the line and byte of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LmmtuneError(
            f"{path}:{line}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def json_records(path: Path, text: str) -> list[tuple[str, object]]:
    """A LLaVA JSON file: one list of records."""
    try:
        records = json.loads(text)
    except RecursionError:
        return json_records_one_by_one(path, text)
    except json.JSONDecodeError as exc:
        hint = " (one record per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise LmmtuneError(
            f"{path}:{exc.lineno}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}{hint}"
        ) from None
    if not isinstance(records, list):
        raise LmmtuneError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return [(f"{path}[{index}]", record) for index, record in enumerate(records)]


def jsonl_records(path: Path, text: str) -> list[tuple[str, object]]:
    """One record per line; a broken line is a bad record named by its line number."""
    records: list[tuple[str, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except RecursionError:
            records.append((f"{path}:{number}", too_deep()))
        except json.JSONDecodeError as exc:
            error = RecordInvalid(
                Kind.INVALID_JSON, f"invalid JSON: {exc.msg} (column {exc.colno})"
            )
            records.append((f"{path}:{number}", error))
    return records


def too_deep() -> RecordInvalid:
    return RecordInvalid(Kind.TOO_DEEP, "JSON nested too deeply to read (not a record)")


def json_records_one_by_one(path: Path, text: str) -> list[tuple[str, object]]:
    """A JSON list holding a record nested too deeply for `json`: read record by record,
    so that only that one is bad. Each record's extent is found by matching brackets."""
    start = text.index("[") + 1
    records: list[tuple[str, object]] = []
    for index, (begin, end) in enumerate(top_level_items(text, start)):
        try:
            records.append((f"{path}[{index}]", json.loads(text[begin:end])))
        except RecursionError:
            records.append((f"{path}[{index}]", too_deep()))
        except json.JSONDecodeError as exc:
            raise LmmtuneError(f"{path}[{index}]: invalid JSON: {exc.msg}") from None
    return records


def top_level_items(text: str, start: int) -> list[tuple[int, int]]:
    """(begin, end) of each item of the JSON list whose '[' ends just before `start`."""
    items, depth, begin, in_string, escaped = [], 0, None, False, False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
            continue
        if char.isspace():
            continue
        if begin is None and char not in ",]":
            begin = position
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}" and depth:
            depth -= 1
        elif char in ",]" and depth == 0:
            if begin is not None:
                items.append((begin, position))
            begin = None
            if char == "]":
                break
    return items


def csv_records(
    path: Path, text: str, columns: DataColumns, data: DataFile, rename: dict | None = None
) -> list[tuple[str, object]]:
    """Rows of a CSV file with a header; each named `file:line` by the line it starts on."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    reader.fieldnames = [(rename or {}).get(name, name) for name in reader.fieldnames or []]
    _check_columns(reader.fieldnames, str(path), columns, data)
    records: list[tuple[str, object]] = []
    start = reader.line_num + 1
    for row in reader:
        source = f"{path}:{start}"
        start = reader.line_num + 1
        if None in row or None in row.values():
            error = RecordInvalid(
                Kind.NOT_A_RECORD,
                f"row has a different number of fields than the header ({len(reader.fieldnames)})",
            )
            records.append((source, error))
            continue
        records.append((source, row))
    return records


def imagefolder_records(
    metadata: Path, columns: DataColumns, data: DataFile
) -> list[tuple[str, object]]:
    """An imagefolder's metadata rows, with `file_name` as the image column."""
    text = read_text(metadata)
    if metadata.suffix == ".csv":
        return csv_records(metadata, text, columns, data, rename={"file_name": columns.image})
    rows = jsonl_records(metadata, text)
    for _, record in rows:
        if isinstance(record, dict) and "file_name" in record:
            record[columns.image] = record.pop("file_name")
    return rows


def _check_columns(names: list, where: str, columns: DataColumns, data: DataFile) -> None:
    """Flat tables need the question and answer columns, or a caption column (image + caption
    sets); no image column means text-only."""
    names = [n for n in names if n is not None]
    shaped = "conversations" in names or "messages" in names or is_pair_columns(names)
    captions = caption_field(names, columns) is not None and columns.question not in names
    if not shaped and not captions:
        for key, name in (("question", columns.question), ("answer", columns.answer)):
            if name not in names:
                raise LmmtuneError(
                    f"{where}: no '{name}' column (columns: {', '.join(names)}); "
                    f"name it with data.columns.{key}=COLUMN"
                )
    if image_field(names, columns) is None:
        data.warnings.append(
            RecordProblem(
                where,
                None,
                f"no '{columns.image}' column: every record is text-only "
                "(name the image column with data.columns.image=COLUMN)",
                Kind.NO_IMAGE_COLUMN,
            )
        )


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
