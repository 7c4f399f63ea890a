"""`python -m lmmtune merge adapters=[RUN_A,RUN_B] weights=[0.5,0.5] merge.combination=ties`:
LoRA adapters of one base, trained on different data, combined into one adapter.

The LoRA matrices are combined by peft's `add_weighted_adapter` (`merge.combination`,
`merge.density`). The modules trained in full (the projector with peft.train_projector,
the output head with peft.train_lm_head), which peft refuses to combine, follow
`merge.projector`: their weighted average (the sum of weight x tensor divided by the sum
of the weights), or the named adapter's, as they are.

What can be refused is refused before any model loads: the settings in `lmmtune.validate`,
the adapters' own records here (one base model, ranks the combination can mix, the same
target modules and fully trained modules, plain LoRA).

OUTPUT_DIR gets what `eval`, `export`, `predict` and `chat` read of a run: `adapter/` (a
standard peft adapter folder that plain peft loads, with its base record and processor),
`config.yaml` (the first adapter's run settings, its eval split, the combined rank) and
`merge.json` (the inputs and how they were combined). It is written beside OUTPUT_DIR and
renamed into place when complete; an existing OUTPUT_DIR is replaced only with
overwrite=true, and only when an earlier merge made it and holds nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lmmtune.config import PROJECTOR_AVERAGE, SAME_RANK_COMBINATIONS, load_yaml_config
from lmmtune.errors import LmmtuneError
from lmmtune.export.run import portable_path, tracking_record_folder
from lmmtune.finished_run import (
    ADAPTER_CONFIG,
    RUN_SECTIONS,
    FinishedRun,
    load_given_adapter,
    source_run_id,
)
from lmmtune.rundir.files import ADAPTER_WEIGHTS, STAGING_MARKER, staged_directory
from lmmtune.rundir.folders import MERGE_KIND, OwnedFolder, check_claim, files_under, foreign_files
from lmmtune.rundir.run import BASE_RECORD, RunDir, save_config
from lmmtune.tracking.mlflow_run import tracked_run
from lmmtune.tracking.tracker import start_tracker

log = logging.getLogger(__name__)

MERGE_RECORD = "merge.json"
DENSITY_COMBINATIONS = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
"""The combinations that prune to merge.density first."""
NOT_COPIED = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md")
"""Files of the first adapter folder the merge writes anew (the model card describes a
trained run, not the merge); the others (base record, processor) are copied."""


@dataclass(eq=False)
class MergeInput:
    """One adapter to combine: as `adapters=` names it, its run, its adapter_config.json."""

    given: str
    run: FinishedRun
    lora: dict

    @property
    def rank(self) -> int:
        """The largest rank of the adapter's layers (peft sizes the combination by it)."""
        return max([self.lora.get("r", 0), *(self.lora.get("rank_pattern") or {}).values()])

    @property
    def targets(self) -> list[str]:
        targets = self.lora.get("target_modules") or []
        return sorted([targets] if isinstance(targets, str) else targets)

    @property
    def full_modules(self) -> list[str]:
        """The modules trained in full (peft's modules_to_save)."""
        return sorted(self.lora.get("modules_to_save") or [])

    @property
    def base(self) -> str:
        """The base model the adapter was trained on: its base record, else peft's note."""
        record = self.run.adapter / BASE_RECORD
        try:
            return str(json.loads(record.read_text())["base_model"])
        except (OSError, ValueError, KeyError, TypeError):
            return str(self.lora.get("base_model_name_or_path"))


def run_merge(cfg: DictConfig) -> dict:
    """Combine `cfg.adapters` into OUTPUT_DIR; return the merge record (merge.json)."""
    inputs = [merge_input(cfg, given) for given in cfg.adapters]
    refuse_incompatible(inputs, str(cfg.merge.combination))
    target = Path(cfg.output_dir)
    check_merge_target(target, cfg.overwrite, inputs)
    count = len(inputs)
    weights = [float(w) for w in cfg.weights] if cfg.weights is not None else [1 / count] * count
    record = merge_record(inputs, weights, cfg.merge, target)
    settings = merged_settings(inputs[0].run, record["rank"])  # refused here, not after loading
    tracker = start_tracker(
        cfg.tracking,
        inputs[0].run.settings.name,
        f"{target.name}-merge",
        tracking_record_folder(target),
        "the merge",
        only_if_needed=True,
    )
    with tracked_run(tracker):
        tracker.set_tags(merge_tags(inputs))
        tracker.log_params(merge_params(inputs, weights, cfg.merge))
        with staged_directory(target, cfg.overwrite, marked=True, note=tracker.run_id or "") as tmp:
            write_merged_adapter(inputs, weights, cfg.merge, tmp / "adapter")
            save_config(settings, tmp)
            (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2))
            OwnedFolder(tmp, MERGE_KIND).write_manifest(files_under(tmp) - {STAGING_MARKER})
        tracker.log_dict(record, MERGE_RECORD)
    log.info("merged %d adapters (%s) into %s", count, cfg.merge.combination, target)
    return record


def merge_input(cfg: DictConfig, given: str) -> MergeInput:
    """The adapter `given` names (a run folder or an adapter folder), its records read."""
    run = load_given_adapter(cfg, given)
    path = run.adapter / ADAPTER_CONFIG
    try:
        lora = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LmmtuneError(f"adapters: {path} cannot be read as JSON ({exc})") from None
    if not isinstance(lora, dict):
        raise LmmtuneError(f"adapters: {path} is not a peft adapter config (not a mapping)")
    return MergeInput(given, run, lora)


def refuse_incompatible(inputs: list[MergeInput], combination: str) -> None:
    """One line for each reason the adapters cannot be combined; raised together."""
    problems = [problem for item in inputs for problem in adapter_problems(item)]
    first = inputs[0]
    for item in inputs[1:]:
        if item.base != first.base:
            problems.append(
                f"different base models: {first.given} was trained on {first.base}, "
                f"{item.given} on {item.base}"
            )
        if item.targets != first.targets:
            problems.append(
                f"different target modules: {first.given} adapts {first.targets}, "
                f"{item.given} {item.targets}"
            )
        if item.full_modules != first.full_modules:
            problems.append(
                f"different fully trained modules: {first.given} {first.full_modules}, "
                f"{item.given} {item.full_modules} (peft.train_projector, peft.train_lm_head)"
            )
    ranks = {item.rank for item in inputs}
    if combination in SAME_RANK_COMBINATIONS and len(ranks) > 1:
        listed = ", ".join(f"r={item.rank} ({item.given})" for item in inputs)
        problems.append(
            f"merge.combination={combination} needs adapters of one rank, got {listed}; "
            "cat, svd and ties_svd mix ranks"
        )
    if problems:
        raise LmmtuneError("cannot merge these adapters:\n  " + "\n  ".join(problems))


def adapter_problems(item: MergeInput) -> list[str]:
    """What rules out one adapter on its own: peft combines plain LoRA matrices only."""
    kind = item.lora.get("peft_type")
    if kind != "LORA":
        return [f"{item.given}: a {kind} adapter; merge combines LoRA adapters"]
    if item.lora.get("use_dora"):
        return [
            f"{item.given}: a DoRA adapter; peft's add_weighted_adapter combines LoRA matrices, "
            "not DoRA's magnitude vectors"
        ]
    return []


def check_merge_target(target: Path, overwrite: bool, inputs: list[MergeInput]) -> None:
    """OUTPUT_DIR may be new, empty, or an earlier merge's (with overwrite=true) holding
    nothing else; never an input, a folder holding one, or anything of a user's."""
    resolved = target.resolve()
    for item in inputs:
        for kept in filter(None, (item.run.adapter, item.run.run_dir)):
            if resolved == kept.resolve() or resolved in kept.resolve().parents:
                raise LmmtuneError(
                    f"output_dir={target} would replace {kept}, which this merge reads; "
                    "choose another output_dir"
                )
    check_claim(target, MERGE_KIND, overwrite, "output_dir", "overwrite")
    foreign = foreign_files(target) if target.is_dir() and any(target.iterdir()) else []
    if foreign:
        raise LmmtuneError(
            f"{target} holds files the merge did not write ({', '.join(foreign[:5])}); move "
            "them away or choose another output_dir"
        )


def combined_rank(inputs: list[MergeInput], combination: str) -> int:
    """The rank peft gives the combination: the sum (cat), the largest (svd kinds), the one."""
    ranks = [item.rank for item in inputs]
    return sum(ranks) if combination == "cat" else max(ranks)


def write_merged_adapter(
    inputs: list[MergeInput], weights: list[float], merge_cfg, folder: Path
) -> None:
    """The combined adapter as a peft adapter folder in `folder`."""
    import torch
    from peft.utils import save_and_load

    model, names = lora_model(inputs)
    torch.manual_seed(merge_cfg.seed)  # dare's random pruning
    combination = str(merge_cfg.combination)
    density = merge_cfg.density if combination in DENSITY_COMBINATIONS else None
    model.add_weighted_adapter(names, weights, "default", combination, density=density)
    state = save_and_load.get_peft_model_state_dict(model, adapter_name="default")
    state.update(full_modules(inputs, weights, merge_cfg.projector))
    config = model.peft_config["default"]
    config.modules_to_save = inputs[0].lora.get("modules_to_save")
    config.target_modules = inputs[0].lora.get("target_modules")  # peft joins equal ones
    config.inference_mode = True
    save_adapter_folder(folder, state, config, inputs[0].run.adapter)


def lora_model(inputs: list[MergeInput]):
    """The first adapter's base with each adapter's LoRA matrices attached, named input_N.

    The fully trained modules are left out (peft raises when adapters share them); they are
    combined by `full_modules`."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    base = inputs[0].run.load_base()
    model, names = None, []
    for index, item in enumerate(inputs):
        name = f"input_{index}"
        config = LoraConfig.from_pretrained(str(item.run.adapter))
        config.modules_to_save, config.inference_mode = None, True
        if model is None:
            model = PeftModel(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        lora = {k: v for k, v in load_peft_weights(str(item.run.adapter)).items() if "lora_" in k}
        loaded = set_peft_model_state_dict(model, lora, adapter_name=name)
        if [key for key in loaded.unexpected_keys if "lora_" in key]:
            raise LmmtuneError(
                f"adapters: {item.given} holds LoRA weights its config does not name"
            )
        names.append(name)
    return model.eval(), names


def full_modules(inputs: list[MergeInput], weights: list[float], projector: str) -> dict:
    """The fully trained modules' tensors as merge.projector says: the weighted average, or
    the named adapter's."""
    from safetensors.torch import load_file

    tensors = [
        {k: v for k, v in load_file(item.run.adapter / ADAPTER_WEIGHTS).items() if "lora_" not in k}
        for item in inputs
    ]
    if projector != PROJECTOR_AVERAGE:
        return tensors[[item.given for item in inputs].index(projector)]
    total = sum(weights)
    return {
        key: (sum(w * t[key].float() for w, t in zip(weights, tensors, strict=True)) / total).to(
            tensors[0][key].dtype
        )
        for key in tensors[0]
    }


def save_adapter_folder(folder: Path, state: dict, config, source: Path) -> None:
    """`state` and `config` as peft saves an adapter, plus the first adapter's base record
    and processor files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, folder / ADAPTER_WEIGHTS, {"format": "pt"}
    )
    config.save_pretrained(str(folder))
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.is_symlink() and path.name not in NOT_COPIED:
            shutil.copy2(path, folder / path.name)


def merged_settings(first: FinishedRun, rank: int) -> DictConfig:
    """The run settings `eval`, `export`, `predict` and `chat` read: the first adapter's,
    with its eval split and the combined rank (peft scales the result by 1: alpha = r)."""
    settings = first.settings
    saved = OmegaConf.create({section: settings[section] for section in RUN_SECTIONS})
    saved.name = settings.name
    saved.data = first.data_settings()
    if first.run_dir is not None:  # the base as the run names it (`tiny`, a hub id)
        saved.model.path = load_yaml_config(RunDir(first.run_dir).config).model.path
    saved.peft.r, saved.peft.alpha = rank, rank
    return saved


def merge_record(inputs: list[MergeInput], weights: list[float], merge_cfg, target: Path) -> dict:
    """What merge.json keeps: each input (path relative to OUTPUT_DIR, MLflow run, weight)
    and how they were combined."""
    return {
        "combination": str(merge_cfg.combination),
        "rank": combined_rank(inputs, str(merge_cfg.combination)),
        "density": merge_cfg.density
        if str(merge_cfg.combination) in DENSITY_COMBINATIONS
        else None,
        "projector": str(merge_cfg.projector),
        "seed": merge_cfg.seed,
        "inputs": [
            {
                "adapter": portable_path(item.run.adapter, target),
                "source_run_id": source_run_id(item.run.run_dir),
                "weight": weight,
            }
            for item, weight in zip(inputs, weights, strict=True)
        ],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def merge_params(inputs: list[MergeInput], weights: list[float], merge_cfg) -> dict:
    params = {f"merge.{key}": value for key, value in merge_cfg.items()}
    params["adapters"] = [str(item.run.adapter.resolve()) for item in inputs]
    params["weights"] = weights
    return params


def merge_tags(inputs: list[MergeInput]) -> dict:
    """The command, the base, and each input's adapter and training run (when known)."""
    tags = {"command": "merge", "base_model": inputs[0].run.settings.model.path}
    for index, item in enumerate(inputs):
        tags[f"adapter.{index}"] = str(item.run.adapter.resolve())
        run_id = source_run_id(item.run.run_dir)
        if run_id:
            tags[f"source_run_id.{index}"] = run_id
    return tags
