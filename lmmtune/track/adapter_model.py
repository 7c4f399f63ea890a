"""The training run's adapter as an MLflow logged model of that run (pyfunc, models from code).

`mlflow.pyfunc.load_model(run's model URI)` answers questions with the adapter on its
base; the export command's merged model is the one to register and serve. The model
code, shipped package, requirements and signature are the merged export's, plus peft.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lmmtune.track.registry import (
    PACKAGE_DIR,
    PYFUNC_CODE,
    requirements,
    shareable_code,
    signature,
)

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
