"""`python -m lmmtune [COMMAND] [overrides...]`: compose the Hydra config and run a command.

The commands are listed in `lmmtune.commands` (train is the default). Every command
that takes `key=value` overrides composes the same config, so `recipe=...` and any
override work everywhere; the config is validated before the command runs.
"""

from __future__ import annotations

import logging
import os
import sys

from lmmtune.commands import COMMANDS, DEFAULT_COMMAND, Command, command_help, usage

HELP = ("-h", "--help")


def split_command(argv: list[str]) -> tuple[Command, list[str]]:
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]], argv[1:]
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        print(
            f"lmmtune: unknown command '{argv[0]}': use one of {', '.join(COMMANDS)}, "
            "or start with key=value overrides (python -m lmmtune --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return COMMANDS[DEFAULT_COMMAND], argv


def setup_logging() -> None:
    logging.basicConfig(
        # Under torchrun / accelerate launch only rank 0 reports progress; the others warn.
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    from lmmtune.redact import RedactingFilter

    for handler in logging.getLogger().handlers:  # every line, Hydra's and MLflow's too
        handler.addFilter(RedactingFilter())
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A failing store logs a traceback per call; lmmtune's tracker reports the failure in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    from lmmtune.track.notices import library_bars_off_terminal, silence_harmless_notices

    silence_harmless_notices()
    library_bars_off_terminal()


def run_command(command: Command, cfg) -> None:
    """Validate the composed config, then run the command; a LmmtuneError exits in one message."""
    from lmmtune.config_checks import validate
    from lmmtune.errors import LmmtuneError

    setup_logging()
    try:
        validate(cfg, command.name)
        command.function()(cfg)
    except LmmtuneError as exc:
        print(f"lmmtune {command.name}: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or a SignalStop naming what to run next
        message = getattr(exc, "message", "interrupted")
        print(f"lmmtune {command.name}: {message}", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 130)) from None


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] and argv[0] in HELP:
        print(usage())
        return
    command, args = split_command(argv)
    if not command.composes_config:
        sys.argv[0] = f"lmmtune {command.name}"  # argparse's usage line
        command.function()(args)
        return
    if any(arg in HELP for arg in args):
        print(command_help(command))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import hydra

    from lmmtune.config import CONF_DIR, recipe_files_to_names, register_configs
    from lmmtune.errors import LmmtuneError

    try:
        register_configs()
        sys.argv = [sys.argv[0], *recipe_files_to_names(args)]
    except LmmtuneError as exc:
        print(f"lmmtune {command.name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def entry(cfg) -> None:
        run_command(command, cfg)

    entry()


if __name__ == "__main__":
    main()
