"""The Hugging Face Hub: what a hub id is, whether the hub answers, cached copies, the download hint.

Models (`model.path`) and data sets (`data.train`, `data.eval`) name hub repositories the
same way (`org/name`); both are checked up front: with no hub reachable and no cached copy,
a command stops at once with the command that downloads the copy and the setting that
points lmmtune at it, instead of minutes of download retries.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from lmmtune.errors import LmmtuneError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_of(configured: str | None) -> str | None:
    """`configured` when it is a hub id (`org/name`, not a local path), else None."""
    if not configured or not HUB_ID.match(configured) or Path(configured).expanduser().exists():
        return None
    return configured


def hub_reachable(timeout: float = 3.0) -> bool:
    """False with HF_HUB_OFFLINE set, or when the hub's host does not answer within `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_snapshot(repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The folder of a copy already in the local hub cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id, revision=revision, repo_type=repo_type, local_files_only=True
        )
    except Exception:  # not in the local cache (the hub raises several error types)
        return None


def download_hint(what: str, hub_id: str, setting: str, repo_type: str = "model") -> LmmtuneError:
    """The error of a hub id that cannot be loaded offline: how to download it, where to point."""
    kind, local = (
        ("", "directory") if repo_type == "model" else (f" --repo-type {repo_type}", "path")
    )
    copy = f"/path/to/{Path(hub_id).name}"
    return LmmtuneError(
        f"could not load {what} '{hub_id}': it is not a local {local} and the Hugging Face "
        "Hub could not be reached (offline?). Download it where there is internet, e.g.\n"
        f"  hf download {hub_id}{kind} --local-dir {copy}\n"
        f"then point lmmtune at the copy: {setting}={copy}"
    )
