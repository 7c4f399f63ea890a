"""`python -m lmmtune [COMMAND] [overrides...]`: compose the Hydra config and run a command.

COMMAND is one of train (the default), check, eval, export, predict. Every command
composes the same config, so `recipe=...` and any override work everywhere.
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = """usage: python -m lmmtune [COMMAND] [key=value ...] [--cfg job]

commands:
  train    fine-tune (default when the first word is an override)
  check    validate the data set and print a report, without loading a model
  eval     evaluate the base model and an adapter on the eval split
  export   merge the adapter into the base and save a llava-hf model
  predict  answer questions about images

examples:
  python -m lmmtune recipe=demo
  python -m lmmtune recipe=medical data.train=/data/train.json model.path=/models/llava-1.5-7b-hf
  python -m lmmtune recipe=demo --cfg job        # print the resolved config
"""
COMMANDS = ("train", "check", "eval", "export", "predict")


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        print(
            f"lmmtune: unknown command '{argv[0]}': use one of {', '.join(COMMANDS)}, "
            "or start with key=value overrides (python -m lmmtune --help)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return "train", argv


def setup_logging() -> None:
    logging.basicConfig(
        # Under torchrun / accelerate launch only rank 0 reports progress; the others warn.
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A failing store logs a traceback per call; lmmtune's tracker reports the failure in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def run_command(command: str, cfg) -> None:
    from lmmtune.errors import LmmtuneError

    setup_logging()
    try:
        if command == "train":
            train_command(cfg)
        elif command == "check":
            from lmmtune.check import check

            check(cfg)
        elif command == "eval":
            from lmmtune.eval.run import run_eval

            run_eval(cfg)
        elif command == "export":
            from lmmtune.export.run import run_export

            run_export(cfg)
        elif command == "predict":
            from lmmtune.predict import predict

            predict(cfg)
        else:
            raise LmmtuneError(f"'{command}' is not implemented yet")
    except LmmtuneError as exc:
        print(f"lmmtune {command}: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def train_command(cfg) -> None:
    """Join the process group (torchrun / accelerate launch), settle the run directory, train."""
    from lmmtune import distributed
    from lmmtune.pipeline import train
    from lmmtune.rundir import job_output_dir

    distributed.init()
    try:
        cfg.output_dir = job_output_dir(cfg.output_dir)
        if cfg.dpo.enabled:  # the preference stage (recipes demo_dpo, medical_dpo)
            from lmmtune.dpo.pipeline import train_dpo

            train_dpo(cfg)
        else:
            train(cfg)
    finally:
        distributed.shutdown()


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:2]):
        print(USAGE)
        return
    command, overrides = split_command(sys.argv[1:])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import hydra

    from lmmtune.config import CONF_DIR, register_configs

    register_configs()
    sys.argv = [sys.argv[0], *overrides]

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def entry(cfg) -> None:
        run_command(command, cfg)

    entry()


if __name__ == "__main__":
    main()
