"""Models in MLflow: an export as a registered pyfunc model, the run's adapter as a logged model.

Log an exported model to MLflow as a pyfunc model, and register it in the Model Registry.

The pyfunc flavour (model code in `pyfunc_model.py`, the export directory as its
artifact) works offline and with any store, sqlite included; `mlflow.pyfunc.load_model`
then answers questions with plain transformers. Requirements are given explicitly:
inferring them would load the model once more in a subprocess.

The training run's adapter as an MLflow logged model of that run (pyfunc, models from code).

`mlflow.pyfunc.load_model(run's model URI)` answers questions with the adapter on its
base; the export command's merged model is the one to register and serve. The model
code, shipped package, requirements and signature are the merged export's, plus peft.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).parent.parent / "export" / "pyfunc_model.py"
PACKAGE_DIR = Path(__file__).parent.parent
"""lmmtune itself, shipped with the model: the pyfunc opens images with its `open_image`."""
MODEL_NAME = "model"


def requirements() -> list[str]:
    """The versions this export was made and checked with (local build tags dropped)."""
    import mlflow
    import PIL
    import torch
    import transformers

    return [
        f"mlflow=={mlflow.__version__}",
        f"transformers=={transformers.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"pillow=={PIL.__version__}",
        "numpy",
        "safetensors",
    ]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "question"), ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )


@contextmanager
def shareable_code(code_file: Path) -> Iterator[str]:
    """A temporary copy of a model-code file: MLflow records the path it is given in the
    shared MLmodel file, and the installed one is under the user's home (site-packages)."""
    with tempfile.TemporaryDirectory(prefix="lmmtune-model-code-") as folder:
        yield shutil.copy(code_file, folder)


def log_pyfunc_model(model_dir: Path, registered_name: str | None = None) -> dict:
    """Log `model_dir` into the active MLflow run; register it as `registered_name` if given."""
    import mlflow

    with shareable_code(PYFUNC_CODE) as code:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=code,
            artifacts={"model": str(model_dir)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(),
            pip_requirements=requirements(),
            registered_model_name=registered_name,
        )
    logged = {"model_uri": info.model_uri}
    if registered_name:
        version = info.registered_model_version
        logged.update(registered_name=registered_name, registered_version=version)
        logged["registered_uri"] = f"models:/{registered_name}/{version}"
        log.info("registered %s version %s", registered_name, version)
    return logged


ADAPTER_MODEL_NAME = "adapter_model"
"""Not `adapter`: MLflow would take the run's `adapter/` artifact folder for this model."""


def log_adapter_model(adapter_dir: Path) -> str:
    """Log `adapter_dir` as the active run's `adapter` model; its model URI."""
    import mlflow
    import peft

    with warnings.catch_warnings(), shareable_code(PYFUNC_CODE) as code:
        # MLflow's advice to the model's author (type hints, an input example); the signature
        # is given in full, so there is nothing for a user to act on.
        warnings.filterwarnings(
            "ignore", message=".*(type hints|input example)", category=UserWarning
        )
        info = mlflow.pyfunc.log_model(
            name=ADAPTER_MODEL_NAME,
            python_model=code,
            code_paths=[str(PACKAGE_DIR)],  # images open as training opened them, anywhere
            artifacts={"adapter": str(adapter_dir)},
            signature=signature(),
            pip_requirements=[*requirements(), f"peft=={peft.__version__}"],
        )
    return info.model_uri
