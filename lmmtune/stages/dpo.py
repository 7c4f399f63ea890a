"""`DPORecipe`: the preference stage, the SFT recipe with its own data, model and trainer.

Its data are pairs (chosen and rejected answer); its model, the policy, starts from an SFT
run's adapter (`dpo.init_adapter`, trainable) or a fresh LoRA; its trainer is TRL's
DPOTrainer on lmmtune's Trainer pieces, with the reference `dpo.reference` names (the
adapter switched off, or a frozen copy of the starting adapter). The DPO loss, reference
log-probs, rewards, margins and reward accuracy are all TRL's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from torch.utils.data import SequentialSampler
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from lmmtune.config import DpoReference
from lmmtune.data.checks import load_splits
from lmmtune.data.pairs import PAIR, PreferenceCollator, check_rejected_lengths
from lmmtune.data.records import Sample
from lmmtune.demo import pair_data_config
from lmmtune.distributed import on_main
from lmmtune.errors import LmmtuneError
from lmmtune.model import PROJECTOR, apply_lora, resolve_model_path, trainable_in_fp32
from lmmtune.model_projector import adapter_copy
from lmmtune.rundir.files import require_adapter_weights
from lmmtune.rundir.run import base_model_file
from lmmtune.stages.sft import SFTRecipe, training_numbers
from lmmtune.training.trainer import LlavaTrainer, build_training_arguments

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
REFERENCE_ADAPTER = "ref"
"""The frozen copy of the starting adapter TRL adds to a PeftModel (dpo.reference=initial)."""
PREFERENCE_KEYS = ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class DPORecipe(SFTRecipe):
    """Direct preference optimization after (or instead of) SFT."""

    sequences_per_sample = 2
    """A DPO step puts the chosen and the rejected conversation of each pair through the model."""

    def preflight(self) -> None:
        """SFT's checks, and the starting adapter, before the run folder is touched."""
        super().preflight()
        check_init_adapter(self.cfg.dpo, resolve_model_path(self.cfg.model))

    def aligned_projector(self):
        """model.projector, else the aligned projector the starting adapter carries (a stage-2
        adapter): the reference with the adapter off uses it too."""
        if self.cfg.model.projector is not None or self.cfg.dpo.from_base:
            return super().aligned_projector()
        try:
            return adapter_copy(Path(self.cfg.dpo.init_adapter).expanduser())
        except LmmtuneError as exc:
            raise LmmtuneError(f"refused before training: dpo.init_adapter: {exc}") from None

    def build_dataset(self):
        """Pairs only; the demo pairs are written once."""
        data_cfg = on_main(pair_data_config, self.cfg.data, self.folder.root)
        splits = on_main(load_splits, data_cfg, self.folder.root, self.processor, pairs_only=True)
        return data_cfg, splits

    def grouped_training_set(self) -> None:
        """Pairs are trained one per record: data.group_by_image is SFT's."""
        return None

    def sample_lengths(self) -> list[int]:
        """Tokens of each pair's longer side."""
        train = self.splits.train
        _, rejected = check_rejected_lengths(train, self.processor, self.data_cfg.max_length)
        chosen = self.splits.report.train_lengths
        return [max(n, rejected[s.source]) for s, n in zip(train, chosen, strict=True)]

    def run_tags(self) -> dict[str, str]:
        return {**super().run_tags(), "stage": "dpo", **sft_parent(self.cfg.dpo)}

    def log_datasets(self) -> None:
        """Pairs are not logged as MLflow datasets."""

    def data_counts(self) -> dict[str, int]:
        return {"train_pairs": len(self.splits.train), "eval_pairs": len(self.splits.eval)}

    def build_model(self, base: torch.nn.Module) -> torch.nn.Module:
        """The policy (the SFT adapter or a fresh LoRA), evaluated before training."""
        set_seed(self.cfg.train.seed)  # a fresh LoRA's random init
        policy = start_policy(base, self.cfg)
        self.evaluate_before(policy)
        return policy

    def build_trainer(self):
        """TRL's DPOTrainer with the reference `dpo.reference` names."""
        cfg, splits, data_cfg = self.cfg, self.splits, self.data_cfg
        args = build_dpo_arguments(
            self.train_cfg, cfg.dpo, self.folder.root, cfg.data.num_workers, cfg.model.dtype
        )
        # The held-out preference before training, measured by the Trainer once it has wrapped
        # the model: an evaluate() before train() marks the model prepared, and under DDP the
        # training then runs unwrapped, each process on its own gradients.
        args.eval_on_start = bool(splits.eval) and self.resume_from is None
        collator = PreferenceCollator(
            splits.train + splits.eval,
            self.processor,
            data_cfg.max_length,
            data_cfg.max_image_pixels,
        )
        frozen = () if cfg.dpo.train_projector else (PROJECTOR,)
        return build_dpo_trainer(
            self.model, splits.train, splits.eval, collator, args, self.processor,
            cfg.peft.projector_lr, self.lengths, self.callbacks(), cfg.dpo.reference, frozen,
            cfg.peft.loraplus_lr_ratio,
        )  # fmt: skip

    def best_adapter_keeper(self) -> None:
        """None: train.keep_best picks by the SFT eval loss."""
        return None

    def record_training(self, result) -> None:
        """The held-out preference before and after, the reward accuracy; the reference gone."""
        history = self.trainer.state.log_history
        if self.trainer.args.eval_on_start:
            self.metrics["preference_before"] = preference_at_start(history)
        accuracies = [e["rewards/accuracies"] for e in history if "rewards/accuracies" in e]
        self.metrics["train"] = {
            **training_numbers(history, result),
            "reward_accuracy_history": accuracies,
        }
        if self.splits.eval:
            self.metrics["preference_after"] = held_out_preference(self.trainer)
        drop_reference_adapter(self.model)


# -- the policy ------------------------------------------------------------------------


def start_policy(model: torch.nn.Module, cfg) -> PeftModel:
    """The model DPO starts from: `dpo.init_adapter` (trainable) or a fresh LoRA (`peft.*`)."""
    checkpointing = cfg.train.gradient_checkpointing
    if not cfg.dpo.from_base:
        adapter_dir = Path(cfg.dpo.init_adapter).expanduser()
        policy = load_trainable_adapter(model, adapter_dir, checkpointing)
    else:
        peft_cfg = OmegaConf.merge(cfg.peft, {"train_projector": cfg.dpo.train_projector})
        policy = apply_lora(model, peft_cfg, checkpointing, cfg.model.projector is not None)
    if not cfg.dpo.train_projector:
        for name, parameter in policy.named_parameters():
            if PROJECTOR in name:
                parameter.requires_grad_(False)
    return policy


def check_init_adapter(dpo_cfg, base_path: str) -> None:
    """Before the run directory is touched: `dpo.init_adapter` holds an adapter (config and
    readable safetensors weights) trained on `base_path`. Its presence is checked with the
    settings (`config_checks.dpo_start`)."""
    if dpo_cfg.from_base:
        return
    adapter_dir = Path(dpo_cfg.init_adapter).expanduser()
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise LmmtuneError(
            f"dpo.init_adapter={adapter_dir}: no adapter there ({ADAPTER_CONFIG} missing); "
            "pass the adapter directory of a finished SFT run (RUN/adapter)"
        )
    try:
        settings = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        raise LmmtuneError(f"dpo.init_adapter={adapter_dir}: {ADAPTER_CONFIG} is damaged")
    require_adapter_weights(adapter_dir, "dpo.init_adapter")
    check_base(adapter_dir, base_path)


def load_trainable_adapter(
    model: torch.nn.Module, adapter_dir: Path, gradient_checkpointing: bool
) -> PeftModel:
    """An SFT run's adapter (LoRA, and projector/head it trained) attached for further training
    (checked by `check_init_adapter` first)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # or no gradient reaches LoRA through checkpoints
    policy = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    trainable_in_fp32(policy)  # fp32 updates, as SFT trains them
    log.info("starting from the adapter in %s", adapter_dir)
    return policy


def check_base(adapter_dir: Path, base_path: str) -> None:
    """Refuse an adapter trained on another base (its record says which one)."""
    record = base_model_file(adapter_dir)
    if not record.is_file():
        return
    try:
        trained_on = json.loads(record.read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        raise LmmtuneError(f"dpo.init_adapter={adapter_dir}: {record.name} is damaged") from None
    if not isinstance(trained_on, str | None):
        raise LmmtuneError(f"dpo.init_adapter={adapter_dir}: {record.name} is damaged")
    moved = trained_on and Path(trained_on).exists()  # a hub id or a moved base: not compared
    if moved and Path(trained_on).resolve() != Path(base_path).resolve():
        raise LmmtuneError(
            f"dpo.init_adapter={adapter_dir} was trained on {trained_on}, not on "
            f"model.path's {base_path}; set model.path to the adapter's base"
        )


def sft_parent(dpo_cfg) -> dict[str, str]:
    """MLflow tags linking a DPO run to the SFT run its adapter came from (RUN/tracking.json)."""
    if dpo_cfg.from_base:
        return {"dpo_start": "base"}
    adapter_dir = dpo_cfg.init_adapter
    from lmmtune.finished_run import source_run_id

    tags = {"dpo_start": "adapter", "init_adapter": str(Path(adapter_dir).resolve())}
    parent = source_run_id(Path(adapter_dir).resolve().parent)
    if parent:
        tags["sft_parent_run_id"] = parent
    return tags


# -- the trainer -----------------------------------------------------------------------


@dataclass
class LlavaDPOConfig(DPOConfig):
    """`DPOConfig` plus the loss settings lmmtune's Trainer reads (the DPO loss ignores them)."""

    loss_impl: str = "default"
    loss_chunk_size: int = 1024


def build_dpo_arguments(train_cfg, dpo_cfg, run_dir: Path, num_workers: int, dtype: str):
    """SFT's Trainer arguments, as `DPOConfig`, with the preference settings."""
    return build_training_arguments(
        train_cfg,
        run_dir,
        num_workers,
        dtype,
        args_class=LlavaDPOConfig,
        beta=dpo_cfg.beta,
        loss_type=list(dpo_cfg.loss_type),
        loss_weights=list(dpo_cfg.loss_weights) if dpo_cfg.loss_weights else None,
        max_length=None,  # lengths are checked up front, sequences never truncated
        precompute_ref_log_probs=False,
    )


def pair_index(samples: list[Sample], offset: int = 0) -> datasets.Dataset:
    """The table TRL iterates: each pair's index in the collator's list (from `offset`), and
    its image label (which makes TRL treat it as a vision set and leave tokenizing to us)."""
    return datasets.Dataset.from_dict(
        {
            PAIR: list(range(offset, offset + len(samples))),
            "image": [s.image or "" for s in samples],
        }
    )


class LlavaDPOTrainer(LlavaTrainer, DPOTrainer):
    """DPOTrainer with LlavaTrainer's optimizer groups, sampler and atomic checkpoints."""

    def __init__(self, *, reference: str, frozen: tuple[str, ...] = (), **kwargs):
        """`frozen`: names of weights that stay frozen (peft unfreezes saved modules when
        adapters are added or removed)."""
        # TRL rounds trainable weights to bf16 under a quantized base; SFT keeps them in fp32,
        # and a started adapter must start exactly as it was saved.
        trainable = {
            name: weight.clone() for name, weight in trainable_in_fp32(kwargs["model"]).items()
        }
        super().__init__(**kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        for name, parameter in unwrapped.named_parameters():
            if name in trainable:
                parameter.data = trainable[name].to(parameter.device)
        if reference == DpoReference.adapter_off and REFERENCE_ADAPTER in unwrapped.peft_config:
            unwrapped.delete_adapter(REFERENCE_ADAPTER)  # TRL then disables the adapter instead
        frozen = (f".{REFERENCE_ADAPTER}.", *frozen)
        self.kept_frozen = [
            parameter
            for name, parameter in unwrapped.named_parameters()
            if any(part in name for part in frozen)
        ]
        self.refreeze()

    def refreeze(self) -> None:
        """Switching adapters (the reference forward) makes peft unfreeze saved modules again."""
        for parameter in self.kept_frozen:
            parameter.requires_grad_(False)

    def create_optimizer(self, model=None):
        self.refreeze()  # resuming loads the checkpoint's adapter first, unfreezing saved modules
        return super().create_optimizer(model)

    def compute_loss(self, *args, **kwargs):
        try:
            return super().compute_loss(*args, **kwargs)
        finally:
            self.refreeze()

    def compute_ref_log_probs(self, model, inputs):
        try:
            return super().compute_ref_log_probs(model, inputs)
        finally:
            self.refreeze()

    def _get_eval_sampler(self, eval_dataset):
        # In order: the default groups by length, measuring items the index table does not have.
        return SequentialSampler(eval_dataset)


def build_dpo_trainer(
    model,
    train_samples: list[Sample],
    eval_samples: list[Sample],
    collator,  # over train_samples + eval_samples, in that order
    args,
    processor,
    projector_lr: float | None,
    lengths: list[int] | None,
    callbacks: list,
    reference: str,
    frozen: tuple[str, ...] = (),
    loraplus_lr_ratio: float | None = None,
) -> LlavaDPOTrainer:
    return LlavaDPOTrainer(
        reference=reference,
        frozen=frozen,
        model=model,
        ref_model=None,
        args=args,
        data_collator=collator,
        train_dataset=pair_index(train_samples),
        eval_dataset=pair_index(eval_samples, len(train_samples)) if eval_samples else None,
        processing_class=processor,
        callbacks=callbacks,
        projector_lr=projector_lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        lengths=lengths,
    )


def held_out_preference(trainer) -> dict:
    """Reward accuracy, margin and log-probs on the eval pairs (TRL's evaluation loop)."""
    return preference(trainer.evaluate())


def preference_at_start(history: list[dict]) -> dict:
    """The held-out preference the Trainer measured before the first step (`eval_on_start`)."""
    return preference(next(e for e in history if f"eval_{PREFERENCE_KEYS[0]}" in e))


def preference(logs: dict) -> dict:
    found = {key: logs[f"eval_{key}"] for key in PREFERENCE_KEYS if f"eval_{key}" in logs}
    found["logp_margin"] = found["logps/chosen"] - found["logps/rejected"]
    log.info("held-out preference: %s", found)
    return found


def drop_reference_adapter(model) -> None:
    """The frozen reference copy (dpo.reference=initial) is not part of the result."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
