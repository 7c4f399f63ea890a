"""The data a run trained and evaluated on, as MLflow Datasets: a name, where it came from,
and a digest of its content, so that two runs on the same data show the same digest.

Only metadata is logged (`MetaDataset`): the records stay where they are; the digest
covers every sample's id, turns and image (the image's content digest when `check`
decoded it, else its path).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from lmmtune.data.records import Sample
from lmmtune.data.validate import DIGEST


def samples_digest(samples: list[Sample]) -> str:
    """A short content digest of the samples, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        image = sample.extra.get(DIGEST) or sample.image
        digest.update(json.dumps([sample.id, sample.turns, image]).encode("utf-8"))
    return digest.hexdigest()[:16]


def dataset_input(name: str, source: str, digest: str):
    """An MLflow dataset of metadata only, its source the data file or folder."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    location = Path(source)
    uri = str(location.resolve()) if location.exists() else source
    schema = Schema(
        [ColSpec("string", "id"), ColSpec("string", "image", required=False)]
        + [ColSpec("string", "question"), ColSpec("string", "answer")]
    )
    with warnings.catch_warnings():
        # A local path matches the "local" source registered twice by MLflow: it says so.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        source_object = resolve_dataset_source(uri)
    return MetaDataset(source_object, name=name, digest=digest, schema=schema)


def log_datasets(tracker, splits) -> None:
    """The train and eval splits as the run's dataset inputs (contexts training, evaluation)."""
    sources = {role: path for role, path, _ in splits.report.files}
    train_source = sources.get("train", "")
    for name, samples, context in (
        ("train", splits.train, "training"),
        ("eval", splits.eval, "evaluation"),
    ):
        if samples:
            source = sources.get(name, train_source)  # a held-out fraction comes from train
            tracker.log_dataset(name, source, samples_digest(samples), context, len(samples))
