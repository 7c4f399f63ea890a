"""The typed schema of every lmmtune setting: the one source of truth for config keys.

Hydra composes `conf/config.yaml`, the group files under `conf/` and a recipe from
`recipes/` on top of this schema, so a misspelled key or a wrong type fails at
composition time with Hydra's short message instead of deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
RECIPES_DIR = REPO_ROOT / "recipes"


@dataclass
class ModelConfig:
    path: str = "llava-hf/llava-1.5-7b-hf"
    """Hub id, local directory, or `tiny` for the built-in tiny LLaVA (offline)."""
    dtype: str = "bfloat16"
    """Dtype of the unquantized parts (vision tower, projector): bfloat16, float16 or float32."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2)."""
    trust_remote_code: bool = False
    """Run code shipped with a checkpoint. Off unless you trust the source."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""


@dataclass
class QuantConfig:
    mode: str = "4bit"
    """4bit (QLoRA, NF4), 8bit (LLM.int8) or none."""
    quant_type: str = "nf4"
    """4-bit data type: nf4 or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: str = "bfloat16"
    """Dtype the 4-bit layers compute in."""


@dataclass
class PeftConfig:
    r: int = 128
    """LoRA rank."""
    alpha: int = 256
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    """Linear layer names inside the language model that get LoRA adapters."""
    train_projector: bool = True
    """Train the vision-to-language MLP projector in full."""
    projector_lr: float | None = 2e-5
    """Learning rate of the projector; null means the main learning rate."""
    train_lm_head: bool = False
    """Train the output head in full (needed by random-init tiny bases, rarely by real ones)."""


@dataclass
class DataColumns:
    image: str = "image"
    question: str = "question"
    answer: str = "answer"
    id: str = "id"
    question_type: str = "question_type"


@dataclass
class DataConfig:
    train: str | None = None
    """Training data: a file (LLaVA JSON, JSONL, CSV) or `demo` for the synthetic lesion set."""
    eval: str | None = None
    """Held-out data in the same formats; null splits `eval_fraction` off the training set."""
    image_root: str | None = None
    """Directory image paths are relative to; defaults to the data file's directory."""
    eval_fraction: float = 0.05
    """Share of the training records held out for evaluation when `eval` is null."""
    max_eval_samples: int | None = 200
    """Cap on the evaluation records (generation is slow); null keeps all."""
    max_length: int = 2048
    """Longest sample in tokens, image tokens included. Longer samples are never truncated."""
    on_error: str = "fail"
    """What to do with invalid records: fail (stop with a report) or skip (train on the rest)."""
    columns: DataColumns = field(default_factory=DataColumns)
    """Column names of flat JSONL/CSV files."""
    demo_size: int = 320
    """Number of images the synthetic demo set generates (train + eval)."""
    num_workers: int = 2
    """DataLoader worker processes that decode and preprocess images."""
    seed: int = 0
    """Seed of the train/eval split and the demo generator."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    batch_size: int = 4
    """Micro-batch per device."""
    grad_accum: int = 4
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    optim: str = "paged_adamw_8bit"
    """transformers optimizer name; paged 8-bit AdamW keeps states small on a consumer card."""
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    group_by_length: bool = True
    """Batch samples of similar length together to cut padding."""
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    seed: int = 42


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    """mlflow or none."""
    tracking_uri: str | None = None
    """MLflow tracking URI; null reads MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str | None = None
    """MLflow experiment name; null uses the recipe name."""
    run_name: str | None = None


@dataclass
class EvalConfig:
    before: bool = True
    """Evaluate the base model before training."""
    after: bool = True
    """Evaluate the adapted model after training."""
    max_new_tokens: int = 32
    batch_size: int = 8


@dataclass
class Config:
    name: str = "custom"
    """Recipe name: MLflow experiment and default run directory."""
    output_dir: str = "outputs/custom"
    """Run directory: resolved config, adapter, checkpoints, metrics."""
    overwrite: bool = False
    """Allow reusing a run directory that already holds a finished run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    """Register the schema and every recipe with Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(name="lmmtune_schema", node=Config)
    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        store.store(
            group="recipe", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_"
        )


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
