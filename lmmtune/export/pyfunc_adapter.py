"""MLflow pyfunc model of a training run's adapter, logged as code ("models from code").

The training run's `adapter/` folder is the artifact; the base model is loaded from the
`base_model` model config when given (`mlflow.pyfunc.load_model(uri, model_config=
{"base_model": ...})`), else from the folder trained on (`lmmtune_base.json`). Questions
and answers work as in the merged export's model (`pyfunc_model.py`, shipped beside this
file), with the adapter on an unquantized base. Loading needs peft, transformers, torch
and PIL, never lmmtune.
"""

import json
from pathlib import Path

import mlflow

try:
    from pyfunc_model import LlavaAnswerer  # loaded from MLflow: shipped as a code path
except ImportError:  # read by MLflow at logging time, inside lmmtune
    from lmmtune.export.pyfunc_model import LlavaAnswerer


class LlavaAdapterAnswerer(LlavaAnswerer):
    def load_context(self, context):
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor

        adapter = Path(context.artifacts["adapter"])
        base = (context.model_config or {}).get("base_model")
        if not base:
            base = json.loads((adapter / "lmmtune_base.json").read_text())["base_model"]
        self.processor = AutoProcessor.from_pretrained(adapter)
        model = AutoModelForImageTextToText.from_pretrained(
            base, dtype="auto", use_safetensors=True
        )
        self.model = PeftModel.from_pretrained(model, str(adapter))
        self.model.eval()


mlflow.models.set_model(LlavaAdapterAnswerer())
