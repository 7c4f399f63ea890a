"""The command line: the command registry, `--help` from the schema, logging, and composing the Hydra config.

`python -m lmmtune [COMMAND] [overrides...]`: compose the Hydra config and run a command.

The commands are listed in `lmmtune.cli` (train is the default). Every command
that takes `key=value` overrides composes the same config, so `recipe=...` and any
override work everywhere; the config is validated before the command runs.

Every `python -m lmmtune COMMAND`: one registry that the command line and `--help` read.

A command either composes the Hydra config (`key=value` overrides, validated before it
runs) or takes its own arguments (`import`). Implementations stay in their
modules and are imported only when their command runs, so `--help` is instant.

Silence exactly the harmless notices every command showed, and nothing else; and no
library progress bars where no one watches them.

Installed by the command line before any command runs (the bitsandbytes notice comes at
its import). A filter on one logger and one warning message: other warnings of the same
libraries, and every other FutureWarning, still show.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import logging
import os
import sys
import textwrap
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from omegaconf import DictConfig

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
    from lmmtune.cli import library_bars_off_terminal, silence_harmless_notices

    silence_harmless_notices()
    library_bars_off_terminal()


def run_command(command: Command, cfg) -> None:
    """Validate the composed config, then run the command; a LmmtuneError exits in one message."""
    from lmmtune.errors import LmmtuneError
    from lmmtune.validate import validate

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
    library_bars_off_terminal()  # before Hydra's callbacks import transformers: read at import

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


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    target: str
    """`module:function`: called with the composed config, or with the argument list."""
    keys: tuple[str, ...] = ()
    """Config sections and keys its `--help` lists."""
    composes_config: bool = True

    def function(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "train",
            "fine-tune (the default when the first word is an override)",
            "lmmtune.stages:train",
            ("name", "output_dir", "overwrite", "model", "quant", "peft", "data", "train")
            + ("tracking", "eval.before", "eval.after", "eval.max_new_tokens", "eval.batch_size")
            + ("eval.table_images", "two_stage"),
        ),
        Command(
            "check",
            "validate the data set and print a report, without loading a model",
            "lmmtune.commands:check",
            ("model.path", "data", "train.gpu_memory_gb", "two_stage"),
        ),
        Command(
            "eval",
            "evaluate the base model and an adapter on the eval split",
            "lmmtune.cli:evaluate",
            ("output_dir", "eval", "tracking", "data.max_eval_samples"),
        ),
        Command(
            "export",
            "merge the adapter into the base and save a llava-hf model (or GGUF for llama.cpp)",
            "lmmtune.cli:export",
            ("output_dir", "export", "tracking"),
        ),
        Command(
            "predict",
            "answer questions about images",
            "lmmtune.commands:predict",
            ("output_dir", "predict"),
        ),
        Command(
            "chat",
            "try the model in the browser (Gradio): base and adapted answers side by side",
            "lmmtune.chat.app:run_chat",
            ("output_dir", "chat", "data.max_length"),
        ),
        Command(
            "merge",
            "combine adapters of one base (adapters=[RUN_A,RUN_B]) into one adapter",
            "lmmtune.combine:run_merge",
            ("adapters", "weights", "merge", "output_dir", "overwrite", "tracking"),
        ),
        Command(
            "import",
            "import a folder's local tracking record into MLflow: import FOLDER [--tracking-uri URI]",
            "lmmtune.tracking.importing:main",
            composes_config=False,
        ),
    )
}
DEFAULT_COMMAND = "train"


def evaluate(cfg: DictConfig) -> None:
    """`eval`; SIGINT/SIGTERM mark its MLflow run KILLED and leave nothing half-written."""
    from lmmtune.eval.run import run_eval

    _restartable("eval", run_eval, cfg)


def export(cfg: DictConfig) -> None:
    """`export`; SIGINT/SIGTERM mark its MLflow run KILLED and leave no staging folder."""
    from lmmtune.export.gguf import run_gguf_export
    from lmmtune.export.run import run_export

    _restartable("export", run_gguf_export if cfg.export.format == "gguf" else run_export, cfg)


def _restartable(name: str, function: Callable, cfg: DictConfig) -> None:
    from lmmtune.training.callbacks import InterruptOutsideTraining

    with InterruptOutsideTraining(f"Run `{name}` again to start it over.") as guard:
        guard.phase = f"running {name}"
        function(cfg)


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values())
    return f"""usage: python -m lmmtune [COMMAND] [key=value ...] [--cfg job]

commands:
{listing}

  python -m lmmtune COMMAND --help   lists the settings a command reads

examples:
  python -m lmmtune recipe=demo
  python -m lmmtune recipe=medical data.train=/data/train.json model.path=/models/llava-1.5-7b-hf
  python -m lmmtune recipe=my_recipe.yaml     # a recipe file of your own
  python -m lmmtune recipe=demo --cfg job     # print the composed config
"""


def command_help(command: Command) -> str:
    """`python -m lmmtune COMMAND --help`: what it does and every key it reads, with its docs."""
    lines = [
        f"usage: python -m lmmtune {command.name} [key=value ...]",
        "",
        f"{command.name}: {command.summary}",
    ]
    if command.name in ("eval", "export", "predict"):
        from lmmtune.finished_run import RUN_SECTIONS

        lines.append(
            f"It reads {', '.join(RUN_SECTIONS)} from the run's config.yaml (output_dir=RUN); "
            "the same keys on the command line win."
        )
    lines += ["", "settings (default, choices; `recipe=NAME` or a YAML path sets many at once):"]
    for key in command.keys:
        for leaf, default, kind, doc in describe(key):
            choices = f"  {{{', '.join(m.value for m in kind)}}}" if _is_choice(kind) else ""
            lines.append(f"  {leaf} = {_show(default)}{choices}")
            if doc:
                lines += textwrap.wrap(doc, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def describe(key: str) -> list[tuple[str, object, type, str]]:
    """(key, default, type, docstring) of `key`, or of every key under a section."""
    from lmmtune.config import Config

    owner, value, kind = Config, Config(), Config
    for part in key.split("."):
        owner, kind = kind, _field_types(kind)[part]
        value = getattr(value, part)
    if dataclasses.is_dataclass(kind):
        return [row for f in dataclasses.fields(kind) for row in describe(f"{key}.{f.name}")]
    return [(key, value, kind, field_docs(owner).get(key.rsplit(".", 1)[-1], ""))]


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {name: _unwrap_optional(hint) for name, hint in hints.items()}


def _unwrap_optional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint


def _is_choice(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, Enum)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (Python keeps none of them at run time)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for field_node, doc_node in zip(body, body[1:], strict=False):
        if (
            isinstance(field_node, ast.AnnAssign)
            and isinstance(field_node.target, ast.Name)
            and isinstance(doc_node, ast.Expr)
            and isinstance(doc_node.value, ast.Constant)
            and isinstance(doc_node.value.value, str)
        ):
            docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward"
"""bitsandbytes tries the optional `kernels` package for a faster CPU 4-bit matmul and,
without it, uses its own implementation: nothing is wrong and nothing is to be done."""
CHECKPOINTING_NOTICE = r"`is_gradient_checkpointing` is deprecated"
"""peft asks transformers' deprecated property; the warning is for peft's authors."""


def _not_kernels_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(BNB_KERNELS_NOTICE)


def silence_harmless_notices() -> None:
    """Drop exactly the two notices every command showed; any other warning still shows."""
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_not_kernels_notice)  # added once, however often
    warnings.filterwarnings("ignore", message=CHECKPOINTING_NOTICE, category=FutureWarning)


BAR_SWITCHES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' "Loading weights"
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
"""Environment switches the libraries read for their bars."""


def library_bars_off_terminal() -> None:
    """When stderr is a file or a pipe, switch the libraries' bars off (unless the user set them)."""
    if not sys.stderr.isatty():
        for switch, off in BAR_SWITCHES.items():
            os.environ.setdefault(switch, off)
