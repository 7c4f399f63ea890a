"""The model: LLaVA 1.5 and its processor loaded (the only place a BitsAndBytesConfig is built), LoRA on the language model, the projector, the fp32 trainable weights.

Load LLaVA 1.5 and its processor; the only place a BitsAndBytesConfig is built.

The language model is quantized (4-bit NF4 by default); the vision tower, the
projector and the output head never are.

LoRA on the language model only, the projector trained in full or frozen, the vision tower frozen.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from transformers import (
    AutoConfig,
    AutoProcessor,
    BitsAndBytesConfig,
    LlavaForConditionalGeneration,
)

from lmmtune import distributed
from lmmtune.config import (
    Dtype,
    ModelConfig,
    PeftConfig,
    PeftInit,
    PeftMethod,
    QuantConfig,
    QuantMode,
)
from lmmtune.data.prompt import UnknownTokenizer, chunk_tokenizer
from lmmtune.demo import TINY_NAME, tiny_model_dir
from lmmtune.errors import LmmtuneError
from lmmtune.hub import cached_snapshot, download_hint, hub_reachable
from lmmtune.model_projector import (
    PROJECTOR,
    AlignedProjector,
    check_fits,
    expected_shapes,
    place_projector,
    read_projector,
)

log = logging.getLogger(__name__)

# Full module paths: transformers 5.x matches these against full names, and the short
# names ("vision_tower") would silently quantize the vision tower and projector too.
NEVER_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
DTYPES = {
    Dtype.bfloat16: torch.bfloat16,
    Dtype.float16: torch.float16,
    Dtype.float32: torch.float32,
}
"""Every `Dtype` of the schema (which refuses other names at composition) as a torch dtype."""


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """A local directory, a hub id, or the built-in tiny LLaVA (built on first use).

    A hub id is checked up front: with no hub reachable and no cached copy, fail at
    once with instructions, instead of minutes of download retries.
    """
    if model_cfg.path == TINY_NAME:
        return str(tiny_model_dir())
    path = model_cfg.path
    if Path(path).is_dir():
        return path
    if Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") > 1:
        raise LmmtuneError(f"model.path '{path}' is not a directory")
    if not hub_reachable():
        cached = cached_snapshot(path, model_cfg.revision)
        if cached is None:
            raise download_hint("model", path, "model.path")
        return cached
    return path


def torch_dtype(name: Dtype | str) -> torch.dtype:
    """The torch dtype of a `Dtype` (or its name)."""
    return DTYPES[name]


def build_quantization_config(quant_cfg: QuantConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings for `quant.mode` (a `QuantMode`); None for `none`."""
    if quant_cfg.mode == QuantMode.none:
        return None
    if quant_cfg.mode == QuantMode["8bit"]:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NEVER_QUANTIZED)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.quant_type,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant_cfg.compute_dtype),
        bnb_4bit_quant_storage=(
            torch_dtype(quant_cfg.storage_dtype) if quant_cfg.storage_dtype else torch.uint8
        ),
        llm_int8_skip_modules=NEVER_QUANTIZED,
    )


def device_map() -> dict | str | None:
    """Each process loads the whole model on its own device (data parallel under torchrun).

    Under FSDP / DeepSpeed (accelerate launch with their configs) none: the weights are
    loaded on the CPU and the launcher shards them across the GPUs.
    """
    if distributed.shards_model():
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def resolve_attention(attn_implementation: str, dtype: str) -> str:
    """`auto`: FlashAttention-2 where it can run (a CUDA GPU, flash-attn installed, 16-bit
    compute), else PyTorch's SDPA. Any other value is passed to transformers as is."""
    if attn_implementation != "auto":
        return attn_implementation
    flash = (
        torch.cuda.is_available()
        and dtype in ("bfloat16", "float16")
        and importlib.util.find_spec("flash_attn") is not None
    )
    return "flash_attention_2" if flash else "sdpa"


def load_model(
    model_cfg: ModelConfig, quant_cfg: QuantConfig, projector: AlignedProjector | None = None
) -> LlavaForConditionalGeneration:
    """The base as `model_cfg` and `quant_cfg` say, with `projector` (model.projector, read
    and checked by `read_aligned_projector`) in place of its own projector."""
    path = resolve_model_path(model_cfg)
    attention = resolve_attention(model_cfg.attn_implementation, model_cfg.dtype)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            path,
            dtype=torch_dtype(model_cfg.dtype),
            quantization_config=build_quantization_config(quant_cfg),
            device_map=device_map(),
            attn_implementation=attention,
            trust_remote_code=model_cfg.trust_remote_code,
            revision=model_cfg.revision,
            use_safetensors=True,
        )
    except OSError as exc:
        raise LmmtuneError(f"could not load the model from {path}: {exc}") from None
    except ImportError as exc:  # e.g. flash_attention_2 without flash-attn
        raise LmmtuneError(
            f"model.attn_implementation={attention}: {exc} "
            "Use model.attn_implementation=auto (FlashAttention-2 where installed, else sdpa)."
        ) from None
    disable_bnb_cpu_repack(model)
    if projector is not None:
        where = f"model.projector={model_cfg.projector}" if model_cfg.projector else "projector"
        place_projector(model, projector, f"{where} ({projector.source})")
        log.info("projector from %s (sha256 %s)", projector.source, projector.sha256[:12])
    log.info(
        "loaded %s (%s, quantization %s, attention %s)",
        path,
        model_cfg.dtype,
        quant_cfg.mode,
        attention,
    )
    return model


def read_aligned_projector(model_cfg: ModelConfig) -> AlignedProjector | None:
    """`model.projector` read and checked against the model's config before the model loads
    (keys, shapes, float values, `model.projector_sha256`); None when it is not set."""
    if model_cfg.projector is None:
        return None
    where = f"model.projector={model_cfg.projector}"
    aligned = read_projector(model_cfg.projector)
    pinned = model_cfg.projector_sha256
    if pinned is not None and pinned != aligned.sha256:
        raise LmmtuneError(
            f"{where}: its sha256 is {aligned.sha256}, not model.projector_sha256={pinned} "
            "(the file changed since the run started, or another file was given)"
        )
    config = AutoConfig.from_pretrained(
        resolve_model_path(model_cfg),
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
    )
    check_fits(aligned, expected_shapes(config), where)
    return aligned


def load_processor(model_cfg: ModelConfig, source: str | Path | None = None):
    """The processor of `source` (default: the model's directory), its image-token count set
    from the model's vision config (see `match_vision_config`)."""
    path = resolve_model_path(model_cfg)
    try:
        processor = AutoProcessor.from_pretrained(
            source or path,
            trust_remote_code=model_cfg.trust_remote_code,
            revision=None if source else model_cfg.revision,
        )
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision
        )
    except OSError as exc:
        raise LmmtuneError(f"could not load the processor from {source or path}: {exc}") from None
    try:  # ids must not depend on how tokenizer.json was written: refuse what cannot be read
        chunk_tokenizer(getattr(processor, "tokenizer", processor))
    except UnknownTokenizer as exc:
        raise UnknownTokenizer(f"{source or path}: {exc}") from None
    return match_vision_config(processor, config)


def _class_tokens(vision_config) -> int:
    return 1 if "clip" in vision_config.model_type else 0  # CLIP has a CLS token, SigLIP none


def match_vision_config(processor, config):
    """Set the processor's patch size, strategy and extra tokens from the model's config.

    Older llava-hf snapshots lack `num_additional_image_tokens` in processor_config.json;
    transformers then expands `<image>` to 575 tokens where the tower yields 576 features
    ("Image features and image tokens do not match"). The vision config is the truth.
    """
    if not hasattr(config, "vision_config") or not hasattr(processor, "patch_size"):
        return processor
    vision = config.vision_config
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    if crop.get("height", vision.image_size) != vision.image_size:
        raise LmmtuneError(
            f"the image processor crops to {crop['height']} px but the vision tower takes "
            f"{vision.image_size} px: the processor does not belong to this model"
        )
    processor.patch_size = vision.patch_size
    processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    processor.num_additional_image_tokens = _class_tokens(vision)
    return processor


def disable_bnb_cpu_repack(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into a CPU-only layout.

    On CPUs with AVX512-BF16 a forward pass without gradients (eval, generate)
    repacks the weights for good; training or merging after it then silently gives
    wrong gradients and wrong merged weights.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


LM_HEAD = "lm_head"


def lora_target_regex(target_modules: list[str]) -> str:
    """Match the named linears inside the language model, never in the vision tower."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf".*language_model.*\.({names})"


def build_lora_config(peft_cfg: PeftConfig, carry_projector: bool = False) -> LoraConfig:
    """peft's LoraConfig for `peft.*`: `method` sets use_dora / use_rslora, `init` the starting
    A and B (loftq starts as default and is replaced after wrapping, see `apply_lora`); the
    projector saved with the adapter when it trains or when `carry_projector` (an aligned
    projector the adapter must carry), the head when it trains."""
    modules_to_save = []
    if peft_cfg.train_projector or carry_projector:
        modules_to_save.append(PROJECTOR)
    if peft_cfg.train_lm_head:
        modules_to_save.append(LM_HEAD)
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=lora_target_regex(peft_cfg.target_modules),
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=peft_cfg.method == PeftMethod.dora,
        use_rslora=peft_cfg.method == PeftMethod.rslora,
        init_lora_weights="gaussian" if peft_cfg.init == PeftInit.gaussian else True,
    )


def apply_lora(
    model: torch.nn.Module,
    peft_cfg: PeftConfig,
    gradient_checkpointing: bool,
    carry_projector: bool = False,
) -> PeftModel:
    """Freeze the base, wrap the language model's linears with LoRA, unfreeze what the config
    trains. `carry_projector`: the projector is saved with the adapter even when it does not
    train (frozen then), so that the adapter carries the aligned projector it started from."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or no gradient reaches LoRA.
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, build_lora_config(peft_cfg, carry_projector))
    if not peft_cfg.train_projector:
        for name, parameter in peft_model.named_parameters():
            if PROJECTOR in name:
                parameter.requires_grad_(False)
    if peft_cfg.init == PeftInit.loftq:
        loftq_init(peft_model, peft_cfg)
    trainable_in_fp32(peft_model)
    match_dtypes_at_trained_modules(peft_model)
    return peft_model


def require_peft_init(peft_cfg: PeftConfig) -> None:
    """Refuse, before anything loads, an init that cannot run on this machine: peft 0.21's
    `replace_lora_weights_loftq` computes its SVD on CUDA (or XPU) only."""
    if peft_cfg.init == PeftInit.loftq and not (torch.cuda.is_available() or _has_xpu()):
        raise LmmtuneError(
            "peft.init=loftq needs a CUDA GPU (peft's replace_lora_weights_loftq computes on "
            "CUDA only); on a CPU use peft.init=default or gaussian"
        )


def _has_xpu() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def loftq_init(peft_model: PeftModel, peft_cfg: PeftConfig) -> None:
    """LoftQ on the 4-bit base: each LoRA pair starts as the best rank-r fit of the error
    between the full-precision weights (read from the base's safetensors) and their 4-bit copy.

    peft fits B @ A to the error itself; the forward adds scaling * B @ A, so B is divided by
    the scaling (alpha / r, or alpha / sqrt(r) under rslora) to start at the full-precision base.
    """
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    require_peft_init(peft_cfg)
    source = peft_model.get_base_model().config._name_or_path
    replace_lora_weights_loftq(peft_model, model_path=source if Path(source).is_dir() else None)
    for module in peft_model.modules():
        if isinstance(module, Linear4bit):
            for name, scaling in module.scaling.items():
                module.lora_B[name].weight.data /= scaling
    log.info("peft.init=loftq: LoRA starts at the 4-bit base's quantization error")


def trainable_in_fp32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Cast the trainable weights to fp32 (optimizer updates in bf16 lose small steps);
    return them by name."""
    trainable = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
            trainable[name] = parameter.data
    return trainable


def match_dtypes_at_trained_modules(model: torch.nn.Module) -> None:
    """Let the fp32 projector and head sit in a bf16/fp16 model without autocast.

    Their inputs are cast to their weights' dtype; the projector's output is cast back
    to its input's dtype, the language model's. Autocast cannot be relied on: the
    Trainer autocasts only the forward, and generation after training runs without it.
    """
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name.endswith((PROJECTOR, LM_HEAD)):
            compute_in_own_dtype(module, cast_back=name.endswith(PROJECTOR))


def compute_in_own_dtype(module: torch.nn.Module, cast_back: bool) -> None:
    """Cast `module`'s inputs to its trained weights' dtype; with `cast_back`, its output back
    to the input's dtype (the projector's output enters the language model)."""
    module.register_forward_pre_hook(_cast_input_to_weights)
    if cast_back:
        module.register_forward_hook(_cast_output_to_input)


def _cast_input_to_weights(module: torch.nn.Module, args: tuple) -> tuple:
    module.lmmtune_input_dtype = next((a.dtype for a in args if torch.is_tensor(a)), None)
    dtype = _trained_dtype(module)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _cast_output_to_input(module: torch.nn.Module, args: tuple, output):
    dtype = getattr(module, "lmmtune_input_dtype", None)
    return output.to(dtype) if dtype is not None and torch.is_tensor(output) else output


def _trained_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the trained copy (peft registers it after the frozen original)."""
    parameters = list(module.parameters())
    trained = [p for p in parameters if p.requires_grad]
    return (trained or parameters[-1:])[0].dtype


@dataclass
class TrainableReport:
    lora: int
    projector: int
    lm_head: int
    other: int
    total: int

    @property
    def trainable(self) -> int:
        return self.lora + self.projector + self.lm_head + self.other

    def as_dict(self) -> dict[str, int | float]:
        return {
            "trainable_lora": self.lora,
            "trainable_projector": self.projector,
            "trainable_lm_head": self.lm_head,
            "trainable_other": self.other,
            "trainable_total": self.trainable,
            "params_total": self.total,
            "trainable_percent": round(100 * self.trainable / max(self.total, 1), 4),
        }

    def __str__(self) -> str:
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} "
            f"({100 * self.trainable / max(self.total, 1):.3f}%) = LoRA {self.lora:,} "
            f"+ projector {self.projector:,} + lm_head {self.lm_head:,}"
            + (f" + other {self.other:,}" if self.other else "")
        )


def trainable_report(model: torch.nn.Module) -> TrainableReport:
    counts = {"lora": 0, "projector": 0, "lm_head": 0, "other": 0}
    total = 0
    for name, parameter in model.named_parameters():
        count = _numel(parameter)
        total += count
        if not parameter.requires_grad:
            continue
        if "lora_" in name:
            counts["lora"] += count
        elif PROJECTOR in name:
            counts["projector"] += count
        elif LM_HEAD in name:
            counts["lm_head"] += count
        else:
            counts["other"] += count
    return TrainableReport(total=total, **counts)


def _numel(parameter: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; count logical parameters.
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and hasattr(quant_state, "shape"):
        return int(torch.Size(quant_state.shape).numel())
    return parameter.numel()
