"""MLflow pyfunc model of a LLaVA model lmmtune made, logged as code ("models from code").

One class for both of lmmtune's logged models: a merged export (artifact `model`) and a
training run's adapter (artifact `adapter`, put on its base: the `base_model` model
config when given, `mlflow.pyfunc.load_model(uri, model_config={"base_model": ...})`,
else the folder it was trained on, from `lmmtune_base.json`).
MLflow copies this file next to the model, and lmmtune's package with it (`code_paths`),
so the model answers where lmmtune is not installed, and images open exactly as training
opened them: `open_image` (EXIF rotation, 16-bit and DICOM scaling, transparency on
white); the processor pads to a square in LLaVA's padding colour.
Input: a DataFrame with a `question` column and an optional `image` column (file
paths); output: one answer per row. The processor carries the training prompt (chat
template, the same token ids as training).
"""

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

BASE_RECORD = "lmmtune_base.json"  # lmmtune.rundir.run.BASE_RECORD, read without lmmtune


class LlavaAnswerer(PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        adapter = context.artifacts.get("adapter")
        folder = adapter or context.artifacts["model"]
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(
            base_model(adapter, context.model_config) if adapter else folder,
            dtype="auto",
            use_safetensors=True,
        )
        if adapter:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import torch

        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        answers = []
        for row in model_input.to_dict("records"):
            inputs = self.model_inputs(row).to(self.model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.no_grad():
                output = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False
                )
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            answers.append(self.processor.decode(new_tokens, skip_special_tokens=True).strip())
        return answers

    def model_inputs(self, row: dict):
        """The prompt ids and pixels of one row, as training built them."""
        from lmmtune.data.images import fit_square_budget, open_image, pad_colour

        content = [{"type": "text", "text": str(row["question"])}]
        image = row.get("image")
        if isinstance(image, str) and image:
            # the processor pads to a square itself (do_pad), as training did; a very long
            # image is first brought to training's bounded square
            fill = pad_colour(self.processor.image_processor)
            content.insert(
                0, {"type": "image", "image": fit_square_budget(open_image(image), fill)}
            )
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )


def base_model(adapter: str, model_config: dict | None) -> str:
    """The base an adapter goes on: the model config's `base_model`, else the one it was
    trained on."""
    given = (model_config or {}).get("base_model")
    return given or json.loads((Path(adapter) / BASE_RECORD).read_text())["base_model"]


mlflow.models.set_model(LlavaAnswerer())
