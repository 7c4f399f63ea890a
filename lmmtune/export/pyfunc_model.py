"""MLflow pyfunc model of an lmmtune export, logged as code ("models from code").

MLflow copies this file next to the model, and lmmtune's package with it (`code_paths`),
so images open exactly as training opened them: `open_image` (EXIF rotation, 16-bit and
DICOM scaling, transparency on white); the exported processor pads to a square in
LLaVA's padding colour.
Input: a DataFrame with a `question` column and an optional `image` column (file
paths); output: one answer per row. The exported processor carries the training
prompt (chat template, the same token ids as training).
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
            # the exported processor pads to a square itself (do_pad), as training did; a
            # very long image is first brought to training's bounded square
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


mlflow.models.set_model(LlavaAnswerer())
