"""Memory planner: the largest micro-batch that fits a GPU memory budget.

`train.gpu_memory_gb=12` models the peak GPU memory of a training step from the
model's config and the recipe (quantized weights, LoRA and projector weights with
their gradients and optimizer states, checkpointed and recomputed activations per
token, the logits the loss builds, the CUDA context), picks the largest power-of-two
micro-batch that fits, and sets gradient accumulation so that the effective batch
(batch_size x grad_accum) stays the same. When even micro-batch 1 does not fit it
fails before the model is loaded, naming the settings that would help.

The model is a first-principles estimate, not yet calibrated on a GPU:
`python -m benchmarks.bench` prints it next to the measured peak, so that its constants
can be checked and corrected on a real card. Budgets are in GiB (a "12 GB" card has
12 GiB)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from lmmtune.errors import LmmtuneError

log = logging.getLogger(__name__)

GIB = 2**30
CUDA_CONTEXT_GIB = 0.75
"""CUDA context, cuBLAS workspaces and kernels: memory the card loses outside PyTorch's pool."""
FRAGMENTATION = 1.10
"""PyTorch's caching allocator reserves more than it hands out."""
NF4_BITS = {True: 4.127, False: 4.5}
"""Bits per 4-bit weight with (True) or without double-quantized block constants."""
OPTIMIZER_STATE_BYTES = {"8bit": 2.0, "32bit": 8.0, "sgd": 0.0, "adafactor": 0.5}
"""Optimizer state bytes per trainable parameter (AdamW: two moments)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaVA that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_tokens: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a `LlavaConfig` (text_config: Llama, vision_config: CLIP)."""
        text, vision = config.text_config, config.vision_config
        return cls(
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads or text.num_attention_heads,
            vocab=text.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            image_tokens=(vision.image_size // vision.patch_size) ** 2,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of one decoder layer."""
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, self.intermediate),
            "up_proj": (h, self.intermediate),
            "down_proj": (self.intermediate, h),
        }

    def llm_linear_params(self) -> int:
        """Parameters of the decoder's linears: what quantization compresses."""
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    def matmul_params(self) -> int:
        """N of the 6N FLOPs-per-token rule: the decoder's linears and the output head."""
        return self.llm_linear_params() + self.hidden * self.vocab

    def lora_params(self, r: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(r * sum(shapes[t]) for t in targets if t in shapes)

    def dora_magnitude_params(self, targets: list[str]) -> int:
        """DoRA's trained magnitudes: one per output feature of each targeted linear."""
        shapes = self.linear_shapes()
        return self.layers * sum(shapes[t][1] for t in targets if t in shapes)

    def dora_forward_bytes(self, targets: list[str], act_bytes: int) -> int:
        """The largest weight-sized temporaries of one DoRA linear's forward (peft 0.21's
        `DoraLinearLayer`): an fp32 identity [in, in] pushed through A and B into an fp32
        B @ A [in, out], its copy in the compute dtype, the dequantized weight, and
        weight + scaling * B @ A, whose row norms are taken (all freed before the next
        linear; the norm is detached, so none is kept for the backward)."""
        shapes = self.linear_shapes()
        sizes = [shapes[t] for t in targets if t in shapes]
        return max((4 * i * i + 4 * i * o + 3 * act_bytes * i * o for i, o in sizes), default=0)

    def projector_params(self) -> int:
        return self.vision_hidden * self.hidden + self.hidden * self.hidden + 2 * self.hidden

    def vision_params(self) -> int:
        v = self.vision_hidden
        return self.vision_layers * (4 * v * v + 2 * v * self.vision_intermediate) + 600 * v


@dataclass(frozen=True)
class MemorySetup:
    """The recipe settings memory depends on, read from the config (`from_configs`, `defaults`)."""

    quant: str
    double_quant: bool
    weight_bytes: int
    """Bytes per unquantized weight (model.dtype)."""
    act_bytes: int
    """Bytes per activation: 2 under bf16/fp16 mixed precision, 4 in fp32."""
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    peft_method: str
    """lora, dora or rslora (`peft.method`): DoRA adds magnitudes and forward temporaries."""
    train_projector: bool
    train_lm_head: bool
    optim: str
    gradient_checkpointing: bool
    loss_impl: str
    loss_chunk_size: int
    attn_implementation: str
    lora: bool = True
    """LoRA on the language model (stage 1, `stage=align`: none, the projector alone trains)."""

    @classmethod
    def defaults(cls) -> MemorySetup:
        """lmmtune's defaults (`lmmtune.config`): 4-bit, r=128 on every LLM linear, paged 8-bit AdamW."""
        from lmmtune.config import ModelConfig, PeftConfig, QuantConfig, TrainConfig

        return cls.from_configs(ModelConfig(), QuantConfig(), PeftConfig(), TrainConfig())

    @classmethod
    def from_configs(
        cls, model_cfg, quant_cfg, peft_cfg, train_cfg, stage: str = "sft"
    ) -> MemorySetup:
        """`stage=align`: no LoRA, the projector trained, no head (what `AlignRecipe` trains)."""
        weight_bytes = 4 if model_cfg.dtype == "float32" else 2
        align = stage == "align"
        return cls(
            quant=quant_cfg.mode,
            double_quant=quant_cfg.double_quant,
            weight_bytes=weight_bytes,
            act_bytes=weight_bytes,  # the Trainer autocasts to model.dtype
            lora_r=peft_cfg.r,
            lora_targets=tuple(peft_cfg.target_modules),
            lora_dropout=peft_cfg.dropout,
            peft_method=str(getattr(peft_cfg, "method", "lora")),
            train_projector=align or peft_cfg.train_projector,
            train_lm_head=not align and peft_cfg.train_lm_head,
            optim=train_cfg.optim,
            gradient_checkpointing=train_cfg.gradient_checkpointing,
            loss_impl=train_cfg.loss_impl,
            loss_chunk_size=train_cfg.loss_chunk_size,
            attn_implementation=model_cfg.attn_implementation,
            lora=not align,
        )


def optimizer_state_bytes(optim: str) -> float:
    """Bytes of optimizer state per trainable parameter for a transformers optimizer name."""
    name = optim.lower()
    if "8bit" in name:
        return OPTIMIZER_STATE_BYTES["8bit"]
    if name.startswith("sgd"):
        return OPTIMIZER_STATE_BYTES["sgd"]
    if "adafactor" in name:
        return OPTIMIZER_STATE_BYTES["adafactor"]
    return OPTIMIZER_STATE_BYTES["32bit"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Modelled peak GPU memory of one training step, by part, in bytes."""

    weights: float
    trainable: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        parts = ("weights", "trainable", "activations", "logits", "overhead")
        return ", ".join(f"{p} {getattr(self, p) / GIB:.2f}" for p in parts)


def estimate_memory(
    shape: ModelShape, setup: MemorySetup, micro_batch: int, seq_len: int
) -> MemoryEstimate:
    """Peak GPU memory of a training step at `micro_batch` samples padded to `seq_len` tokens."""
    parts = {
        "weights": _weight_bytes(shape, setup),
        "trainable": _trainable_bytes(shape, setup),
        "activations": _activation_bytes(shape, setup, micro_batch, seq_len),
        "logits": _logit_bytes(shape, setup, micro_batch * seq_len),
    }
    overhead = sum(parts.values()) * (FRAGMENTATION - 1) + CUDA_CONTEXT_GIB * GIB
    return MemoryEstimate(**parts, overhead=overhead)


def _weight_bytes(shape: ModelShape, setup: MemorySetup) -> float:
    bits = {"4bit": NF4_BITS[setup.double_quant], "8bit": 8.0}.get(setup.quant)
    linear = shape.llm_linear_params() * (bits / 8 if bits else setup.weight_bytes)
    embed_and_head = 2 * shape.vocab * shape.hidden * setup.weight_bytes
    frozen = shape.vision_params() * setup.weight_bytes
    projector = shape.projector_params() * (4 if setup.train_projector else setup.weight_bytes)
    # bitsandbytes dequantizes one weight at a time for its matmul (forward and backward).
    dequantized = max(i * o for i, o in shape.linear_shapes().values()) * 2 if bits else 0
    if setup.peft_method == "dora":  # DoRA's weight norm: its temporaries replace that copy
        targets = list(setup.lora_targets)
        dequantized = max(dequantized, shape.dora_forward_bytes(targets, setup.act_bytes))
    return linear + embed_and_head + frozen + projector + dequantized


def _trainable_bytes(shape: ModelShape, setup: MemorySetup) -> float:
    """fp32 weights (apply_lora upcasts them), fp32 gradients and optimizer states."""
    params = shape.lora_params(setup.lora_r, list(setup.lora_targets)) if setup.lora else 0
    if setup.lora and setup.peft_method == "dora":
        params += shape.dora_magnitude_params(list(setup.lora_targets))
    if setup.train_lm_head:
        params += shape.vocab * shape.hidden
    per_param = 4 + optimizer_state_bytes(setup.optim)  # gradient + states
    projector = shape.projector_params() if setup.train_projector else 0
    return params * (4 + per_param) + projector * per_param  # projector weights: in weights


def layer_activation_bytes(shape: ModelShape, setup: MemorySetup) -> float:
    """Bytes one decoder layer saves for its backward, per token.

    Attention: norm input, q/k/v/o inputs and outputs, rotated q/k, SDPA output (about
    12 hidden-sized tensors); MLP: gate, up, SiLU and product (4 intermediate-sized);
    RMSNorm's fp32 intermediates; LoRA dropout keeps a masked copy of each input; DoRA
    keeps each targeted linear's base output and scaled LoRA output (the magnitude's
    gradient needs both): two output-sized tensors per target.
    """
    h, i, a = shape.hidden, shape.intermediate, setup.act_bytes
    saved = (12 * h + 4 * i) * a + 4 * h * 4
    if setup.lora and setup.lora_dropout > 0:
        inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h}
        inputs |= {"gate_proj": h, "up_proj": h, "down_proj": i}
        saved += sum(inputs[t] for t in setup.lora_targets if t in inputs) * (a + 1)
    if setup.peft_method == "dora":
        outputs = {name: out for name, (_, out) in shape.linear_shapes().items()}
        saved += sum(2 * outputs[t] for t in setup.lora_targets if t in outputs) * a
    return saved


def _activation_bytes(shape: ModelShape, setup: MemorySetup, micro_batch: int, seq_len: int):
    tokens = micro_batch * seq_len
    layer = layer_activation_bytes(shape, setup) * tokens
    if setup.attn_implementation == "eager":  # materialised [heads, seq, seq] scores and probs
        layer += micro_batch * shape.heads * seq_len**2 * (2 * setup.act_bytes + 1)
    if setup.gradient_checkpointing:
        # Every layer keeps its input; one layer at a time is rebuilt, and its
        # backward needs about as much again for the gradients it produces.
        stored = shape.layers * shape.hidden * setup.act_bytes * tokens + 2 * layer
    else:
        stored = shape.layers * layer + layer
    projector = micro_batch * shape.image_tokens * (shape.vision_hidden + 2 * shape.hidden)
    return stored + projector * setup.act_bytes


def _logit_bytes(shape: ModelShape, setup: MemorySetup, tokens: int) -> float:
    """Logits in the compute dtype, their fp32 copy, and the fp32 gradient the loss returns."""
    rows = min(tokens, setup.loss_chunk_size) if setup.loss_impl == "chunked" else tokens
    return rows * shape.vocab * (2 * setup.act_bytes + 8)


@dataclass(frozen=True)
class BatchPlan:
    """The chosen micro-batch and accumulation for a memory budget."""

    budget_gib: float
    micro_batch: int
    grad_accum: int
    seq_len: int
    estimate: MemoryEstimate
    candidates: dict[int, float]
    """Modelled peak in GiB of every micro-batch tried."""

    def describe(self) -> str:
        tried = ", ".join(f"{b}: {gib:.1f}" for b, gib in self.candidates.items())
        return (
            f"memory plan for {self.budget_gib:g} GiB: micro-batch {self.micro_batch} x "
            f"grad_accum {self.grad_accum} (effective {self.micro_batch * self.grad_accum}), "
            f"samples up to {self.seq_len} tokens; modelled peak "
            f"{self.estimate.total / GIB:.2f} GiB ({self.estimate.describe()}); "
            f"micro-batch -> GiB: {tried}"
        )


def plan_batch(
    shape: ModelShape,
    setup: MemorySetup,
    budget_gib: float,
    effective_batch: int,
    seq_len: int,
    sequences_per_sample: int = 1,
) -> BatchPlan:
    """The largest power-of-two micro-batch that divides `effective_batch` and fits `budget_gib`.

    `sequences_per_sample`: sequences one sample puts through the model (a DPO pair: 2).
    """
    candidates: dict[int, float] = {}
    best = None
    micro_batch = 1
    while micro_batch <= effective_batch:
        if effective_batch % micro_batch == 0:
            estimate = estimate_memory(shape, setup, micro_batch * sequences_per_sample, seq_len)
            candidates[micro_batch] = estimate.total / GIB
            if estimate.total > budget_gib * GIB:
                break
            best = (micro_batch, estimate)
        micro_batch *= 2
    if best is None:
        raise LmmtuneError(_does_not_fit(shape, setup, budget_gib, seq_len))
    micro_batch, estimate = best
    return BatchPlan(
        budget_gib, micro_batch, effective_batch // micro_batch, seq_len, estimate, candidates
    )


def _does_not_fit(shape: ModelShape, setup: MemorySetup, budget_gib: float, seq_len: int) -> str:
    estimate = estimate_memory(shape, setup, 1, seq_len)
    levers = []
    if setup.quant != "4bit":
        levers.append(f"quant.mode=4bit (now {setup.quant})")
    if optimizer_state_bytes(setup.optim) > OPTIMIZER_STATE_BYTES["8bit"]:
        levers.append(f"train.optim=paged_adamw_8bit (now {setup.optim})")
    if not setup.gradient_checkpointing:
        levers.append("train.gradient_checkpointing=true")
    if setup.loss_impl != "chunked":
        levers.append("train.loss_impl=chunked")
    if setup.train_lm_head:
        levers.append("peft.train_lm_head=false")
    if setup.lora:
        levers.append(f"peft.r (now {setup.lora_r}; LoRA state {estimate.trainable / GIB:.1f} GiB)")
    levers.append(f"data.max_length (the longest sample has {seq_len} tokens)")
    levers.append("a smaller model")
    return (
        f"the recipe does not fit train.gpu_memory_gb={budget_gib:g}: even micro-batch 1 needs "
        f"about {estimate.total / GIB:.1f} GiB ({estimate.describe()} GiB). Lower one of: "
        + "; ".join(levers)
        + ". Or raise train.gpu_memory_gb if the card has more."
    )


def fit_to_memory(
    train_cfg,
    model_cfg,
    quant_cfg,
    peft_cfg,
    seq_len: int,
    sequences_per_sample: int = 1,
    stage: str = "sft",
):
    """`train_cfg` with batch_size and grad_accum planned for `train.gpu_memory_gb` (`stage`:
    the `stage` setting; align trains the projector alone).

    Returns `train_cfg` itself when no budget is set; else a copy (the same type, a
    dataclass or an OmegaConf node). Reads only the model's config, not its weights.
    """
    if train_cfg.gpu_memory_gb is None:
        return train_cfg
    from transformers import AutoConfig

    from lmmtune.model import resolve_model_path

    config = AutoConfig.from_pretrained(
        resolve_model_path(model_cfg), trust_remote_code=model_cfg.trust_remote_code
    )
    plan = plan_batch(
        ModelShape.from_config(config),
        MemorySetup.from_configs(model_cfg, quant_cfg, peft_cfg, train_cfg, stage),
        train_cfg.gpu_memory_gb,
        train_cfg.batch_size * train_cfg.grad_accum,
        seq_len,
        sequences_per_sample,
    )
    log.info("%s", plan.describe())
    planned = copy.deepcopy(train_cfg)
    planned.batch_size = plan.micro_batch
    planned.grad_accum = plan.grad_accum
    return planned
