"""Benchmarks and the tools they share with the tests; in the checkout only, never in the wheel.

Run from the repository root: `python -m benchmarks.bench` (the recipe against the usual
QLoRA pipeline), `python benchmarks/bench_data.py`, `python benchmarks/real_shapes.py`.
"""
