"""A resumed run is the same run: same settings, same data, or it is refused before any work.

The resolved config is compared with the run's `config.yaml`, and a digest of the data
files with the one written when the run started (`data_digest.json`). Only keys that do
not change what is trained may differ (`SAFE_TO_CHANGE`): where things are written and
logged, how often checkpoints are kept, worker processes, and the settings of the other
commands. The images are compared too, by content, once the data check has read them
(before the model loads): the check hashes each image it decodes anyway, so this costs no
extra read, and `data_digest.json` keeps 20 hex digits per image."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmmtune.data.checks import DIGEST
from lmmtune.errors import LmmtuneError
from lmmtune.redact import redact
from lmmtune.rundir.files import write_text_atomic
from lmmtune.yaml_config import load_yaml_config

log = logging.getLogger(__name__)

SAFE_TO_CHANGE = (
    "output_dir",
    "overwrite",
    "train.resume",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "data.num_workers",
    "tracking.",
    "eval.adapter",
    "eval.data",
    "eval.output",
    "eval.overwrite",
    "eval.table_images",
    "eval.share_image_prefix",
    "export.",
    "predict.",
)
"""Keys (or key prefixes ending in '.') a resume may change: none of them changes the weights."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for each key that differs and may not (keys new since: skipped)."""
    old, new = _flat(saved), _flat(current)
    return [
        f"{key}: {old[key]!r} -> {new.get(key)!r}"
        for key in sorted(old)
        if not _safe(key) and old[key] != new.get(key)
    ]


def data_digest(data_cfg: DictConfig) -> dict[str, str]:
    """sha256 of each data file (train, eval); a folder: of its file names and sizes."""
    return {split: _digest(data_cfg[split]) for split in ("train", "eval") if data_cfg[split]}


def _digest(source: str) -> str:
    path = Path(source)
    sha = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    elif path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            sha.update(f"{item.relative_to(path)}\0{item.stat().st_size}\n".encode())
    else:
        return f"not a local file: {source}"  # the demo set or a hub id: its config is compared
    return sha.hexdigest()


def check_resume(cfg: DictConfig, config_file: Path, digest_file: Path) -> None:
    """Refuse a resume whose settings or data differ from the run's, listing the differences."""
    if not config_file.is_file():
        return
    # Through the same YAML as the saved file, so that types and masked secrets compare alike.
    current = OmegaConf.to_container(
        OmegaConf.create(OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=True))))
    )
    try:
        saved = OmegaConf.to_container(load_yaml_config(config_file), resolve=False)
    except Exception as exc:  # omegaconf/yaml raise several types for a broken file
        raise LmmtuneError(f"{config_file} cannot be read ({exc}); cannot resume") from None
    differences = config_differences(saved, current)
    if digest_file.is_file():
        before = {k: v for k, v in json.loads(digest_file.read_text()).items() if k != IMAGES}
        now = data_digest(cfg.data)
        differences += [
            f"data.{split} content changed (sha256 {before.get(split)} -> {now.get(split)})"
            for split in sorted(set(before) | set(now))
            if before.get(split) != now.get(split)
        ]
    if differences:
        raise LmmtuneError(
            "train.resume: this run was started with other settings or data, and a resumed "
            "run must be the same run:\n  "
            + "\n  ".join(differences)
            + "\nUse the run's settings, or start a new run with another output_dir=... "
            f"(keys a resume may change: {', '.join(SAFE_TO_CHANGE)})"
        )


def save_data_digest(cfg: DictConfig, digest_file: Path) -> None:
    """Written once, when the run starts: what a resume compares the data with."""
    if not digest_file.exists():
        write_text_atomic(digest_file, json.dumps(data_digest(cfg.data), indent=1))


IMAGES = "images"
"""Key in `data_digest.json`: each split's image content digests, in record order."""


def check_image_digests(splits, digest_file: Path) -> None:
    """Refuse a resume whose images changed since the run started, naming a few; on the
    first start (or a run from before this check) record them instead.

    `splits` comes from the data check, which set each image's content digest
    (`Sample.extra[DIGEST]`) while decoding it.
    """
    now = {
        split: [s.extra.get(DIGEST, "-") for s in samples if s.image is not None]
        for split, samples in (("train", splits.train), ("eval", splits.eval))
    }
    saved = json.loads(digest_file.read_text()) if digest_file.is_file() else {}
    before = saved.get(IMAGES)
    if before is None:
        write_text_atomic(digest_file, json.dumps({**saved, IMAGES: now}))
        return
    samples = {"train": splits.train, "eval": splits.eval}
    differences = [
        _image_difference(split, before.get(split, []), now[split], samples[split])
        for split in ("train", "eval")
        if before.get(split, []) != now[split]
    ]
    if differences:
        raise LmmtuneError(
            "train.resume: the images changed since this run started, and a resumed run "
            "must be the same run:\n  " + "\n  ".join(differences) + "\nRestore them, or "
            "start a new run with another output_dir=..."
        )


def _image_difference(split: str, before: list[str], now: list[str], samples) -> str:
    if len(before) != len(now):
        return f"data.{split}: {len(before)} images when the run started, {len(now)} now"
    with_images = [s for s in samples if s.image is not None]
    changed = [s.image for s, a, b in zip(with_images, before, now, strict=True) if a != b]
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"data.{split}: {len(changed)} of {len(now)} images have other content ({shown})"
