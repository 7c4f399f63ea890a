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
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmmtune.errors import LmmtuneError
from lmmtune.stage_configs import ALIGN, align_problems, stage_configs

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
    ("merge.density", lambda v: 0 < v <= 1, "must be within (0, 1]"),
)
"""Numeric ranges: (key, test, what the value must be)."""


def validate(cfg: DictConfig, command: str = "train") -> None:
    """Raise LmmtuneError listing every setting of `cfg` that cannot work, one line each
    (a two-stage config: both stages' settings)."""
    problems = config_problems(cfg, command)
    if not problems and command in ("train", "check"):
        problems += two_stage_problems(cfg, command)
    if problems:
        raise LmmtuneError("invalid settings:\n  " + "\n  ".join(problems))


def config_problems(cfg: DictConfig, command: str) -> list[str]:
    """Every setting of one config that cannot work for `command`."""
    problems = list(unresolved(cfg))
    if not problems:  # the checks below read values, which must resolve first
        problems += out_of_range(cfg)
        problems += cross_field(cfg)
        problems += stage_settings(cfg)
        problems += peft_method(cfg.peft, cfg.quant.mode)
        problems += training_data(cfg) if command in ("train", "check") else []
        problems += trainer_names(cfg) if command in ("train", "check") else []
        problems += dpo_start(cfg.dpo) if command == "train" else []
        problems += merge_inputs(cfg) if command == "merge" else []
        problems += output_dir_problems(cfg.output_dir, writes=command in ("train", "merge"))
    return problems


def two_stage_problems(cfg: DictConfig, command: str) -> list[str]:
    """A two-stage run (two_stage.enabled) refuses at start for either stage's settings:
    stage 2's are the config's own (checked above), stage 1's are derived here and checked
    alike, each problem named with its stage."""
    if not cfg.two_stage.enabled:
        return []
    if cfg.data.captions is None:
        return [
            "data.captions=null: a two-stage run trains stage 1 on captions; set "
            "data.captions=PATH (data.train is stage 2's instruction data)"
        ]
    if cfg.dpo.enabled:
        return ["dpo.enabled=true: stage 2 of a two-stage run is instruction tuning; run DPO "
                "afterwards from OUTPUT_DIR/instruct/adapter"]  # fmt: skip
    if cfg.stage == "align":
        return ["stage=align: stage 2 of a two-stage run is instruction tuning; stage 1's "
                "settings go in two_stage.align (recipe=*_two_stage sets them)"]  # fmt: skip
    if cfg.model.projector is not None:
        return [f"model.projector={cfg.model.projector}: a two-stage run's stage 2 starts from "
                "its own stage 1's projector; set model.projector=null, or train stage 2 alone "
                "with recipe=medical model.projector=PATH"]  # fmt: skip
    if cfg.train.resume not in (None, "auto"):
        return [f"train.resume={cfg.train.resume}: a two-stage run resumes with train.resume=auto"]
    problems = align_problems(cfg)
    if problems:
        return problems
    try:
        align = stage_configs(cfg).align
    except LmmtuneError as exc:
        return [str(exc)]
    return [f"stage 1 ({ALIGN}): {problem}" for problem in config_problems(align, command)]


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
    if cfg.data.captions is not None and not cfg.two_stage.enabled:
        yield "data.captions is stage 1's data of a two-stage run: it needs two_stage.enabled=true"
    yield from projector_settings(cfg.model)


def stage_settings(cfg: DictConfig) -> Iterator[str]:
    """Stage 1 (`stage=align`) trains the projector on captions in the plain template; the
    plain template is stage 1's alone."""
    align, plain = cfg.stage == "align", cfg.data.template == "plain"
    if plain and not align:
        yield (
            "data.template=plain is stage 1's (captions, no question): it needs stage=align "
            "(recipe=demo_align or medical_align); instruction tuning uses vicuna_v1"
        )
    if not align:
        return
    if cfg.dpo.enabled:
        yield "stage=align and dpo.enabled=true exclude each other: choose one stage"
    if cfg.peft.train_lm_head:
        yield "stage=align trains the projector alone: set peft.train_lm_head=false"
    if cfg.peft.projector_lr is not None:
        yield (
            f"peft.projector_lr={cfg.peft.projector_lr}: stage=align trains the projector alone, "
            "at train.learning_rate; set peft.projector_lr=null"
        )
    if cfg.data.group_by_image:
        yield "stage=align trains one caption per image: set data.group_by_image=false"
    if cfg.model.projector is not None:
        yield "stage=align trains the projector from the base's own: set model.projector=null"


def projector_settings(model: DictConfig) -> Iterator[str]:
    """model.projector names something; a pinned sha256 is one, and of a projector."""
    if model.projector is not None and not str(model.projector).strip():
        yield "model.projector='': empty; pass a stage-1 run folder or a projector file, or null"
    if model.projector_sha256 is not None:
        if model.projector is None:
            yield "model.projector_sha256 needs model.projector (the file it pins)"
        if not re.fullmatch(r"[0-9a-f]{64}", str(model.projector_sha256)):
            yield "model.projector_sha256 must be 64 lowercase hex digits (a sha256)"


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


def merge_inputs(cfg: DictConfig) -> Iterator[str]:
    """What `merge` combines, as far as the settings alone tell (the adapters' own files are
    checked next, still before any model loads)."""
    from lmmtune.config import PROJECTOR_AVERAGE

    adapters, weights, projector = list(cfg.adapters), cfg.weights, cfg.merge.projector
    if len(adapters) < 2:
        yield (
            f"adapters={adapters}: name at least two adapters to combine "
            "(adapters=[RUN_A,RUN_B], run folders or adapter folders)"
        )
    if weights is not None and len(weights) != len(adapters):
        yield (
            f"weights has {len(weights)} weight(s) for {len(adapters)} adapter(s): give one "
            "per adapter, or null (each 1/len(adapters))"
        )
    elif weights is not None and projector == PROJECTOR_AVERAGE and abs(sum(weights)) < 1e-12:
        yield (
            f"weights={list(weights)} sum to 0: merge.projector=average divides by their sum; "
            "name one adapter (merge.projector=RUN) to take its projector"
        )
    if projector != PROJECTOR_AVERAGE and projector not in adapters:
        yield (
            f"merge.projector={projector}: not one of adapters={adapters}; give `average` or "
            "one of them, as written there"
        )


def training_data(cfg: DictConfig) -> Iterator[str]:
    data = cfg.data
    if data.train is None:
        yield (
            "data.train=null: set data.train=PATH (LLaVA JSON, JSONL, CSV, parquet, a datasets "
            "folder, a Hub dataset id), data=vqa_rad|slake|pathvqa or data.train=demo"
        )
    for key in ("train_split", "eval_split"):
        if data[key] is not None and not str(data[key]).strip():
            yield f"data.{key}='': empty; name a split (train, validation, test) or leave it out"
    if data.eval is None and data.eval_split is not None and data.eval_split == data.train_split:
        yield (
            f"data.eval_split={data.eval_split} is data.train_split too: the model would be "
            "evaluated on what it trained on; choose another split (e.g. test)"
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
