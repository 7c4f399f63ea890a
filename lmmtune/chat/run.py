"""`python -m lmmtune chat output_dir=RUN`: load the model, start the Gradio app, serve until Ctrl-C.

    python -m lmmtune chat output_dir=RUN                       # base + adapter, side by side
    python -m lmmtune chat chat.model=RUN/export-merged         # a merged export
    python -m lmmtune chat chat.model=models:/NAME/VERSION      # a registered MLflow model

The app listens on 127.0.0.1:7860 unless `chat.host` / `chat.port` say otherwise, and
asks Gradio for a public link only with `chat.share=true`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)


def require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LmmtuneError(
            "the chat app needs gradio, which is not installed: pip install 'lmmtune[chat]'"
        ) from None


def run_chat(cfg: DictConfig, overrides: list[str] | None = None, block: bool = True):
    """Serve the app; with `block=False` return (app, url) with the server running (tests)."""
    require_gradio()
    from lmmtune.chat.app import build_app
    from lmmtune.chat.model import load_chat_model

    started = time.monotonic()
    chat_model = load_chat_model(cfg, overrides)
    app = build_app(chat_model, cfg.chat)
    app.queue(default_concurrency_limit=1, max_size=cfg.chat.queue_size)
    _, url, share_url = app.launch(
        server_name=cfg.chat.host,
        server_port=cfg.chat.port,
        share=cfg.chat.share,
        max_file_size=f"{cfg.chat.max_upload_mb}mb",
        allowed_paths=sorted({str(Path(s.image).parent) for s in chat_model.examples}),
        prevent_thread_lock=True,
        quiet=True,
    )
    log.info("model loaded and app started in %.1f s", time.monotonic() - started)
    print(f"lmmtune chat: {share_url or url} (Ctrl-C stops it)", flush=True)
    if not block:
        return app, url
    try:
        app.block_thread()
    finally:
        app.close()
    return app, url
