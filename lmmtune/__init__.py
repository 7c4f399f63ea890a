"""lmmtune: QLoRA fine-tuning of LLaVA 1.5 on one consumer GPU.

`import lmmtune` is cheap: the notebook functions below import their dependencies
(torch, transformers, Hydra) only when first used.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("lmmtune")
except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "check_data",
    "compose_config",
    "evaluate",
    "export_model",
    "finetune",
    "merge_adapters",
    "predict_answers",
]


def __getattr__(name: str):
    if name in __all__:
        from lmmtune import api

        value = getattr(api, name)
        globals()[name] = value  # __getattr__ runs only while the name is unset
        return value
    raise AttributeError(f"module 'lmmtune' has no attribute {name!r}")
