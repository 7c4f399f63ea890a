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
    attn_implementation: str = "auto"
    """Attention kernel: auto (flash_attention_2 on a GPU where flash-attn is installed,
    else sdpa), or one passed to transformers as is: sdpa, eager, flash_attention_2."""
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
    storage_dtype: str | None = None
    """Dtype the packed 4-bit weights are stored in: null (uint8) or, for FSDP / DeepSpeed
    ZeRO-3, which shard float tensors only, bfloat16 (the same as model.dtype)."""


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
    """Column (or field) names of flat JSONL/CSV files and Hugging Face tables."""

    image: str = "image"
    """Image path, or (in a datasets table) the image itself; empty means text-only. LLaVA records use it too."""
    question: str = "question"
    answer: str = "answer"
    id: str = "id"
    """Optional record id, shown in problems; the record's place (file:line) when absent."""
    question_type: str = "question_type"
    """Optional question type (e.g. closed/open), counted in the report and used by eval."""


@dataclass
class DataConfig:
    train: str | None = None
    """Training data: LLaVA JSON, JSONL, CSV, parquet/arrow file or glob, a datasets
    save_to_disk folder, an imagefolder with metadata.jsonl, or `demo` (synthetic set)."""
    eval: str | None = None
    """Held-out data in the same formats; null splits `eval_fraction` off the training set."""
    image_root: str | None = None
    """Directory image paths are relative to; defaults to the data file's directory (or the
    dataset folder). Paths that lead outside it are refused."""
    eval_fraction: float = 0.05
    """Share of the training records held out for evaluation when `eval` is null."""
    max_eval_samples: int | None = 200
    """Cap on the evaluation records (generation is slow); null keeps all."""
    max_length: int = 2048
    """Longest sample in tokens, image tokens included. Longer samples are never truncated."""
    on_error: str = "fail"
    """What to do with invalid records: fail (stop with a report) or skip (train on the rest)."""
    verify_images: bool = True
    """Decode every image before training (and in `check`) to find broken ones up front."""
    max_image_pixels: int | None = 89_478_485
    """Refuse images with more pixels (decompression-bomb guard; PIL's default); null: no limit."""
    columns: DataColumns = field(default_factory=DataColumns)
    """Column names of flat JSONL/CSV files and datasets tables."""
    demo_size: int = 320
    """Number of images the synthetic demo set generates (train + eval)."""
    num_workers: int = 2
    """Worker processes that decode images: DataLoader workers, and the image check's pool."""
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
    loss_impl: str = "chunked"
    """chunked: output head and cross entropy on the labelled positions only, in chunks, so
    the [batch, tokens, vocab] logits (mostly over image tokens) are never built; default:
    transformers' loss over every position. Same loss and gradients."""
    loss_chunk_size: int = 1024
    """Labelled positions per chunk of the chunked loss (peak logits: chunk x vocab)."""
    gpu_memory_gb: float | None = None
    """GPU memory budget in GiB (a "12 GB" card: 12): pick the largest power-of-two micro-batch
    whose modelled peak fits, set grad_accum to keep batch_size x grad_accum, fail fast if
    even 1 does not fit. null: use batch_size and grad_accum as given."""
    logging_steps: int = 10
    eval_steps: int | None = None
    """Loss on the eval split every N optimizer steps (MLflow `eval/loss`), to watch for
    overfitting while training; null: only the before/after evaluation."""
    keep_best: bool = False
    """With eval_steps: end with the adapter of the lowest eval loss, not the last one
    (kept in RUN/best/ while training; its step goes to metrics.json and MLflow)."""
    save_steps: int = 200
    save_total_limit: int = 2
    """Finished checkpoints kept (the oldest are deleted)."""
    resume: str | None = None
    """Continue a run: `auto` (latest finished checkpoint in the run directory, or start) or a checkpoint path."""
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
    """Evaluate the base model (adapter off): before training, and in `eval`."""
    after: bool = True
    """Evaluate the adapted model: after training, and in `eval`."""
    max_new_tokens: int = 32
    """Longest generated answer (greedy decoding)."""
    batch_size: int = 8
    """Samples generated together (left padding)."""
    adapter: str | None = None
    """`eval` only: the adapter directory; null reads OUTPUT_DIR/adapter."""
    data: str | None = None
    """`eval` only: a data file to evaluate on (any data.train format); null uses the run's eval split."""
    output: str | None = None
    """`eval` only: where metrics, predictions and the chart go; null: OUTPUT_DIR/eval."""
    overwrite: bool = False
    """`eval` only: replace an existing eval output directory."""
    table_images: bool = True
    """Put image thumbnails into the MLflow predictions table (else image paths only)."""


@dataclass
class ExportConfig:
    format: str = "merged"
    """merged: a plain llava-hf model (adapter merged into an unquantized base); adapter: the adapter alone."""
    dir: str | None = None
    """Export directory; null: OUTPUT_DIR/export-<format>."""
    adapter: str | None = None
    """The adapter directory; null reads OUTPUT_DIR/adapter."""
    dtype: str | None = None
    """Dtype of the merged weights: bfloat16, float16 or float32; null: the run's model.dtype."""
    overwrite: bool = False
    """Replace an existing export directory."""
    parity_samples: int = 4
    """Eval samples on which merged logits are checked against the adapter's."""
    parity_tolerance: float | None = None
    """Largest allowed logit difference, relative to the largest logit; null picks by dtype
    (float32 1e-4, float16 1e-2, bfloat16 5e-2)."""
    log_model: bool = True
    """Log the merged model to MLflow (pyfunc flavour) when tracking is on."""
    register_name: str | None = None
    """Register the logged model in the MLflow Model Registry under this name (merged only)."""


@dataclass
class PredictConfig:
    image: str | None = None
    """Image file for a single question."""
    question: str | None = None
    """The question to answer (with or without `image`)."""
    input: str | None = None
    """JSONL of questions: `question`, optional `image` (relative to the file) and `id`."""
    output: str | None = None
    """Where the answers of `input` go (JSONL); null prints them."""
    model: str | None = None
    """An exported model directory; null uses the base model + adapter."""
    adapter: str | None = None
    """The adapter directory (without `model`); null reads OUTPUT_DIR/adapter."""
    max_new_tokens: int = 64
    batch_size: int = 8


@dataclass
class DpoConfig:
    """The preference stage (DPO through TRL's DPOTrainer); `enabled` selects it over SFT."""

    enabled: bool = False
    """Train on preference pairs (image, prompt, chosen, rejected) instead of answers."""
    init_adapter: str | None = None
    """Adapter directory to start from (an SFT run's RUN/adapter), loaded trainable into the
    quantized base; null starts a fresh LoRA (peft.*) on the base."""
    beta: float = 0.1
    """Strength of the pull towards the reference (higher: stay closer to it)."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """TRL loss names, combined when several: sigmoid (DPO), ipo, hinge, robust, sft (NLL on
    the chosen answer, as in RPO), ..."""
    loss_weights: list[float] | None = None
    """Weight of each loss_type; null weighs each 1."""
    reference: str = "adapter_off"
    """adapter_off: the reference is the same quantized weights with the adapter switched off
    (no extra memory); initial: a frozen copy of the starting adapter (the SFT model when
    starting from one; costs the adapter's size once more)."""
    train_projector: bool = False
    """Train the projector in DPO too (it stays as the starting adapter left it otherwise)."""


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
    export: ExportConfig = field(default_factory=ExportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)


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
