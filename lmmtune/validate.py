"""`validate(cfg)`: the checks every command runs right after composing its config.

The schema (`lmmtune.config`) already refuses unknown keys, wrong types and values
outside a closed set (its Enums), at composition; nothing checks those again. What a type
cannot say is checked here, once, before any data is read, model loaded or folder
created: numbers in range, settings that need each other (every cross-field check lives
here), transformers' optimizer and scheduler names, an output directory that can be
written, and `${...}` interpolations that resolve. Every problem is one line; all of them
are reported together."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmmtune.errors import LmmtuneError

NAME_MAX = 255
"""Longest file name (bytes) on the usual Linux, macOS and Windows file systems."""
PATH_MAX = 4096

Rule = tuple[str, Callable[[object], bool], str]

RULES: tuple[Rule, ...] = (
    ("train.epochs", lambda v: v > 0, "must be > 0"),
    ("train.max_steps", lambda v: v == -1 or v >= 1, "must be -1 (run train.epochs) or >= 1"),
    ("train.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("train.grad_accum", lambda v: v >= 1, "must be >= 1"),
    ("train.learning_rate", lambda v: v > 0, "must be > 0"),
    ("train.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("train.warmup_ratio", lambda v: 0 <= v <= 1, "must be within [0, 1]"),
    ("train.max_grad_norm", lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
    ("train.loss_chunk_size", lambda v: v >= 1, "must be >= 1"),
    ("train.gpu_memory_gb", lambda v: v is None or v > 0, "must be > 0 or null"),
    ("train.logging_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.eval_steps", lambda v: v is None or v >= 1, "must be >= 1 or null"),
    ("train.save_steps", lambda v: v >= 1, "must be >= 1"),
    (
        "train.save_total_limit",
        lambda v: v is None or v >= 1,
        "must be >= 1 (checkpoints kept) or null (keep all)",
    ),
    ("peft.r", lambda v: v >= 1, "must be >= 1"),
    ("peft.alpha", lambda v: v > 0, "must be > 0"),
    ("peft.dropout", lambda v: 0 <= v < 1, "must be within [0, 1)"),
    ("peft.projector_lr", lambda v: v is None or v > 0, "must be > 0 or null"),
    ("peft.target_modules", lambda v: len(v) > 0, "must name at least one module"),
    (
        "peft.loraplus_lr_ratio",
        lambda v: v is None or v >= 1,
        "must be >= 1 (B's learning rate over A's) or null",
    ),
    ("data.eval_fraction", lambda v: 0 <= v < 1, "must be within [0, 1)"),
    ("data.max_eval_samples", lambda v: v is None or v >= 1, "must be >= 1 or null (all)"),
    ("data.max_length", lambda v: v >= 1, "must be >= 1"),
    ("data.max_image_pixels", lambda v: v is None or v >= 1, "must be >= 1 or null"),
    ("data.demo_size", lambda v: v >= 2, "must be >= 2"),
    ("data.num_workers", lambda v: v >= 0, "must be >= 0"),
    ("eval.max_new_tokens", lambda v: v >= 1, "must be >= 1"),
    ("eval.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("export.parity_samples", lambda v: v >= 0, "must be >= 0 (0: no parity check)"),
    ("export.parity_tolerance", lambda v: v is None or v > 0, "must be > 0 or null"),
    ("predict.max_new_tokens", lambda v: v >= 1, "must be >= 1"),
    ("predict.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("chat.port", lambda v: 0 <= v <= 65535, "must be a port number in [0, 65535]"),
    ("chat.max_new_tokens", lambda v: v >= 1, "must be >= 1"),
    ("chat.temperature", lambda v: v >= 0, "must be >= 0 (0: greedy)"),
    ("chat.top_p", lambda v: 0 < v <= 1, "must be within (0, 1]"),
    ("chat.examples", lambda v: v >= 0, "must be >= 0"),
    ("chat.queue_size", lambda v: v >= 1, "must be >= 1"),
    ("chat.max_upload_mb", lambda v: v >= 1, "must be >= 1"),
)
"""Numeric ranges: (key, test, what the value must be)."""


def validate(cfg: DictConfig, command: str = "train") -> None:
    """Raise LmmtuneError listing every setting of `cfg` that cannot work, one line each."""
    problems = list(unresolved(cfg))
    if not problems:  # the checks below read values, which must resolve first
        problems += out_of_range(cfg)
        problems += cross_field(cfg)
        problems += peft_method(cfg.peft, cfg.quant.mode)
        problems += training_data(cfg) if command in ("train", "check") else []
        problems += trainer_names(cfg) if command in ("train", "check") else []
        problems += dpo_start(cfg.dpo) if command == "train" else []
        problems += output_dir_problems(cfg.output_dir, writes=command == "train")
    if problems:
        raise LmmtuneError("invalid settings:\n  " + "\n  ".join(problems))


def unresolved(cfg: DictConfig) -> Iterator[str]:
    """One line per key whose `${...}` does not resolve (an unset `${oc.env:VAR}`, a typo)."""
    for key in _leaf_keys(cfg):
        if key.startswith("hydra."):
            continue
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException as exc:
            reason = str(exc).splitlines()[0]
            yield f"{key}: {reason}"


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> Iterator[str]:
    for key in cfg:
        full = f"{prefix}{key}"
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_interpolation():
            yield from _leaf_keys(node, f"{full}.")
        else:
            yield full


def out_of_range(cfg: DictConfig) -> Iterator[str]:
    for key, test, requirement in RULES:
        value = OmegaConf.select(cfg, key)
        if not test(value):
            yield f"{key}={value}: {requirement}"


def cross_field(cfg: DictConfig) -> Iterator[str]:
    """Settings that need each other."""
    train, export, dpo = cfg.train, cfg.export, cfg.dpo
    if train.keep_best and train.eval_steps is None:
        yield ("train.keep_best=true needs train.eval_steps=N (the eval loss it picks the best by)")
    if dpo.loss_weights is not None and len(dpo.loss_weights) != len(dpo.loss_type):
        yield (
            f"dpo.loss_weights has {len(dpo.loss_weights)} weight(s) for "
            f"{len(dpo.loss_type)} dpo.loss_type name(s): give one per loss, or null"
        )
    if export.register_name and export.format != "merged":
        yield "export.register_name needs export.format=merged (a loadable model)"
    if export.register_name and (cfg.tracking.backend == "none" or not export.log_model):
        yield "export.register_name needs tracking on and export.log_model=true"
    if export.model is not None and export.format != "gguf":
        yield "export.model (a merged export to convert) needs export.format=gguf"


def peft_method(peft: DictConfig, quant_mode: str) -> Iterator[str]:
    """peft.method and peft.init combinations that peft refuses or that cannot run here."""
    if peft.init == "pissa":
        why = (
            "peft's pissa_init refuses quantized weights"
            if quant_mode != "none"
            else "it rewrites the base weights, so the saved adapter would not fit the base "
            "that eval, export, predict and chat load"
        )
        yield f"peft.init=pissa: not offered ({why}); use default, gaussian or loftq"
    if peft.init == "loftq" and quant_mode != "4bit":
        yield (
            f"peft.init=loftq with quant.mode={quant_mode}: LoftQ fits LoRA to the error of a "
            "4-bit base (peft's replace_lora_weights_loftq); use quant.mode=4bit"
        )
    if peft.init == "loftq" and peft.method == "dora":
        yield (
            "peft.init=loftq with peft.method=dora: DoRA's magnitudes are measured before "
            "LoftQ replaces A and B, so the start would not be the base; choose one"
        )


def dpo_start(dpo: DictConfig) -> Iterator[str]:
    """The preference stage starts from an SFT adapter, or from the base when asked to."""
    if not dpo.enabled:
        return
    if dpo.init_adapter is None and not dpo.from_base:
        yield (
            "dpo.init_adapter is not set: DPO starts from an SFT run's adapter "
            "(dpo.init_adapter=RUN/adapter). For recipe=demo_dpo, run the SFT demo first "
            "(python -m lmmtune recipe=demo output_dir=outputs/demo_sft) and pass "
            "dpo.init_adapter=outputs/demo_sft/adapter; dpo.from_base=true starts from the "
            "base model on purpose"
        )
    elif dpo.init_adapter is not None and not dpo.init_adapter.strip():
        yield "dpo.init_adapter='': empty; pass RUN/adapter of an SFT run, or dpo.from_base=true"
    elif dpo.init_adapter is not None and dpo.from_base:
        yield "dpo.from_base=true and dpo.init_adapter exclude each other: choose one"


def training_data(cfg: DictConfig) -> Iterator[str]:
    if cfg.data.train is None:
        yield (
            "data.train=null: set data.train=PATH (LLaVA JSON, JSONL, CSV, parquet, a datasets "
            "folder) or data.train=demo"
        )


def trainer_names(cfg: DictConfig) -> Iterator[str]:
    """train.optim and train.scheduler are transformers' names: check them against its lists."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, names in (("train.optim", OptimizerNames), ("train.scheduler", SchedulerType)):
        value = OmegaConf.select(cfg, key)
        allowed = [member.value for member in names]
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            yield f"{key}={value}: {hint}not one of transformers' {names.__name__} values"


def output_dir_problems(output_dir: str, writes: bool) -> Iterator[str]:
    """output_dir must be a folder (or not exist yet), of a length the file system takes,
    and, for a command that writes into it, writable."""
    path = Path(output_dir).expanduser()
    too_long = [p for p in path.parts if len(os.fsencode(p)) > NAME_MAX]
    if too_long or len(os.fsencode(str(path.absolute()))) >= PATH_MAX:
        yield f"output_dir={output_dir[:80]}...: longer than the file system allows"
        return
    if path.exists() and not path.is_dir():
        yield f"output_dir={output_dir}: is a file, not a folder"
        return
    if writes:
        existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            yield f"output_dir={output_dir}: cannot create or write it ({existing} is not writable)"
