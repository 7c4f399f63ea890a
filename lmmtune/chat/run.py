"""`python -m lmmtune chat output_dir=RUN`: load the model, start the Gradio app, serve until Ctrl-C.

    python -m lmmtune chat output_dir=RUN                       # base + adapter, side by side
    python -m lmmtune chat chat.model=RUN/export-merged         # a merged export
    python -m lmmtune chat chat.model=models:/NAME/VERSION      # a registered MLflow model

The app listens on 127.0.0.1:7860 unless `chat.host` / `chat.port` say otherwise, and
asks Gradio for a public link only with `chat.share=true`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from lmmtune.data.records import Sample
from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)


def require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LmmtuneError(
            "the chat app needs gradio, which is not installed: pip install 'lmmtune[chat]'"
        ) from None


def run_chat(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Serve the app until Ctrl-C or SIGTERM.

    The app serves nothing but what it made: uploads, previews and copies of the example
    images all live in one folder of its own (mode 0700, Gradio's GRADIO_TEMP_DIR and
    examples cache), which is removed when the app stops. No folder of the user's is handed to Gradio, so
    `/gradio_api/file=...` reaches no data file beside the example images.
    """
    require_gradio()
    app_dir = Path(tempfile.mkdtemp(prefix="lmmtune-chat-"))  # mode 0700
    os.environ["GRADIO_TEMP_DIR"] = str(app_dir)  # read by Gradio when the app is built
    # Gradio also serves its examples cache, `.gradio/cached_examples` of the working folder
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(app_dir / "cached_examples")
    try:
        serve(cfg, overrides, app_dir)
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)


def serve(cfg: DictConfig, overrides: list[str] | None, app_dir: Path) -> None:
    from lmmtune.chat.app import build_app
    from lmmtune.chat.model import load_chat_model

    started = time.monotonic()
    chat_model = load_chat_model(cfg, overrides)
    chat_model.examples = example_copies(chat_model.examples, app_dir / "examples")
    app = build_app(chat_model, cfg.chat)
    app.queue(default_concurrency_limit=1, max_size=cfg.chat.queue_size)
    _, url, share_url = app.launch(
        server_name=cfg.chat.host,
        server_port=cfg.chat.port,
        share=cfg.chat.share,
        max_file_size=f"{cfg.chat.max_upload_mb}mb",
        prevent_thread_lock=True,
        quiet=True,
    )
    log.info("model loaded and app started in %.1f s", time.monotonic() - started)
    print(f"lmmtune chat: {share_url or url} (Ctrl-C stops it)", flush=True)
    try:
        with sigterm_as_interrupt():
            app.block_thread()  # returns on Ctrl-C (and SIGTERM), having closed the server
    finally:
        app.close()


def example_copies(examples: list[Sample], folder: Path) -> list[Sample]:
    """The examples with their images copied into the app's own folder: the app serves the
    copies, never the data folder they sit in (its other files, `train.json`, ...)."""
    from dataclasses import replace

    folder.mkdir(mode=0o700)
    copied: dict[str, Path] = {}  # one copy per image, however many questions it has
    for sample in examples:
        if sample.image not in copied:
            copy = folder / f"{len(copied):02d}" / Path(sample.image).name  # its name shown
            copy.parent.mkdir(mode=0o700, parents=True)
            shutil.copyfile(sample.image, copy)  # the file's bytes; never a link
            copied[sample.image] = copy
    return [replace(sample, image=str(copied[sample.image])) for sample in examples]


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a service manager, `kill`) stops the app as Ctrl-C does, so its folder goes too."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
