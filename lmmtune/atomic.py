"""Directories that appear complete or not at all.

Everything is written into a temporary sibling, which is renamed into place (atomic
within one filesystem) only when the block succeeds; a failure or a crash leaves at
most the temporary directory, never a half-written target.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(target: Path, replace: bool) -> Iterator[Path]:
    """A temporary path next to `target` (not yet created), renamed to it if the block succeeds.

    An existing `target` is removed first when `replace`; otherwise the rename fails on it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() and replace:
        shutil.rmtree(target)
    tmp.rename(target)
