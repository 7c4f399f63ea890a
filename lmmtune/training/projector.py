"""Stage 1's model as the Trainer trains it: LLaVA with its projector alone trainable.

`ProjectorTraining` wraps a loaded LLaVA (the language model frozen, in 4-bit, 8-bit or
unquantized; the vision tower frozen) and makes its projector, in fp32, the only trainable
weights. Its state dict is the projector's alone (llava-hf keys), so a checkpoint holds the
projector and its optimizer state, never a copy of the frozen base, and a resume loads
exactly that back. Own code, not peft: peft's wrappers need a LoRA (or other) target and
stage 1 has none; and transformers' Trainer refuses a quantized model that is no peft
model, a guard against training quantized weights, which are never trained here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmmtune.errors import LmmtuneError
from lmmtune.model import PROJECTOR, compute_in_own_dtype
from lmmtune.rundir.files import staged_directory
from lmmtune.rundir.run import PROJECTOR_CARD, PROJECTOR_FILE

PROJECTOR_WEIGHTS = tuple(
    f"{PROJECTOR}.{layer}.{kind}"
    for layer in ("linear_1", "linear_2")
    for kind in ("weight", "bias")
)
"""The keys of a projector file: llava-hf's names of LLaVA 1.5's two-layer MLP."""


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The projector of a LLaVA model (`model.multi_modal_projector` in llava-hf 5.x)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == PROJECTOR:
            return module
    raise LmmtuneError(f"{type(model).__name__} has no {PROJECTOR}: not a LLaVA model")


def projector_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector's weights under llava-hf's keys, fp32 on the CPU."""
    projector = projector_module(model)
    return {
        f"{PROJECTOR}.{name}": weight.detach().to("cpu", torch.float32).contiguous()
        for name, weight in projector.named_parameters()
    }


class ProjectorTraining(torch.nn.Module):
    """A LLaVA model whose projector alone trains (fp32), as transformers' Trainer sees it."""

    def __init__(self, llava: torch.nn.Module):
        super().__init__()
        self.llava = llava
        for parameter in llava.parameters():
            parameter.requires_grad_(False)
        projector = projector_module(llava)
        projector.float()  # fp32 updates; inputs cast in, the output cast back to the LLM's
        projector.requires_grad_(True)
        compute_in_own_dtype(projector, cast_back=True)

    config = property(lambda self: self.llava.config)
    # bitsandbytes weights cannot be moved with `.to()`: the Trainer reads this to leave them.
    quantization_method = property(lambda self: getattr(self.llava, "quantization_method", None))

    def get_base_model(self) -> torch.nn.Module:
        """The LLaVA model (what the chunked loss and the run's records look into)."""
        return self.llava

    def forward(self, **inputs):
        return self.llava(**inputs)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        self.llava.activation_checkpointing_enable(**kwargs)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The projector's weights (llava-hf keys): what a checkpoint holds."""
        return projector_weights(self.llava)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a projector state dict (llava-hf keys), as a resume does."""
        prefix = f"{PROJECTOR}."
        weights = {key.removeprefix(prefix): value for key, value in state_dict.items()}
        return projector_module(self.llava).load_state_dict(weights, strict=strict)


def save_projector(model: torch.nn.Module, folder: Path, card: str) -> None:
    """`folder` with the projector file and its card, both or neither (staged, then renamed)."""
    with staged_directory(Path(folder), replace=True) as staging:
        staging.mkdir()
        save_file(projector_weights(model), str(staging / PROJECTOR_FILE), {"format": "pt"})
        (staging / PROJECTOR_CARD).write_text(card, encoding="utf-8")


def read_projector_keys(path: Path) -> list[str]:
    """The keys of a projector file, read back (a damaged file raises)."""
    with safe_open(str(path), framework="pt") as opened:
        return sorted(opened.keys())
