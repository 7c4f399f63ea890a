"""`python -m benchmarks.bench`: lmmtune's recipe against the usual QLoRA pipeline, side by side.

Builds LLaVA-1.5-shaped models with random weights (no download), loads them the
way the recipe does (4-bit through `load_model`, LoRA through `apply_lora`), trains
real steps on synthetic batches through `LlavaTrainer`, and reports peak memory,
tokens/s, samples/s and MFU per configuration, with the speed and memory ratios.
"""
