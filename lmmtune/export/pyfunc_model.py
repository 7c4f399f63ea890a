"""MLflow pyfunc model of an lmmtune export, logged as code ("models from code").

MLflow copies this file next to the model; loading it needs transformers, torch and
PIL only, never lmmtune. Input: a DataFrame with a `question` column and an optional
`image` column (file paths); output: one answer per row. The exported processor
carries the training prompt (chat template) and the pad-to-square image processing.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class LlavaAnswerer(PythonModel):
    def load_context(self, context):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = context.artifacts["model"]
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype="auto", use_safetensors=True
        )
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import torch
        from PIL import Image

        max_new_tokens = int((params or {}).get("max_new_tokens", 64))
        answers = []
        for row in model_input.to_dict("records"):
            content = [{"type": "text", "text": str(row["question"])}]
            image = row.get("image")
            if isinstance(image, str) and image:
                content.insert(0, {"type": "image", "image": Image.open(image).convert("RGB")})
            inputs = self.processor.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            ).to(self.model.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.no_grad():
                output = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False
                )
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            answers.append(self.processor.decode(new_tokens, skip_special_tokens=True).strip())
        return answers


mlflow.models.set_model(LlavaAnswerer())
