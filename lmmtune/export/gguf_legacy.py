"""Run llama.cpp's legacy `convert_image_encoder_to_gguf.py` on transformers 5.

    python -m lmmtune.export.gguf_legacy SCRIPT [ARGS...]

The script was written for transformers 4.x, whose `CLIPVisionModel` wrapped the tower
in `.vision_model` (`model.vision_model.encoder.layers`, weights named
`vision_model.*`). transformers 5 flattened it (`model.encoder.layers`, `encoder.*`), and
the script stops with "'CLIPVisionModel' object has no attribute 'vision_model'". This
runner gives it the 4.x layout around the same tower and then runs the script unchanged,
so llama.cpp's own code still names the tensors and writes the metadata.
"""

from __future__ import annotations

import runpy
import sys

import torch
from transformers.models.clip import modeling_clip

CLIPVisionModel = modeling_clip.CLIPVisionModel


class LegacyCLIPVisionModel(torch.nn.Module):
    """transformers 4.x's CLIPVisionModel layout: the tower under `.vision_model`."""

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.vision_model = tower

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> torch.nn.Module:
        tower = CLIPVisionModel.from_pretrained(path, **kwargs)
        return tower if hasattr(tower, "vision_model") else cls(tower)  # 4.x: as it is


def main() -> None:
    script, *args = sys.argv[1:]
    # `from transformers import CLIPVisionModel` in the script resolves to modeling_clip's.
    modeling_clip.CLIPVisionModel = LegacyCLIPVisionModel
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
