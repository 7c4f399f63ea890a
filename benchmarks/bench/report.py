"""MFU, the results table, the ratios, and the environment a run was measured in."""

from __future__ import annotations

import datetime
import importlib
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

# Dense bf16 FLOP/s. H100: a measured large-matmul throughput (below the datasheet's
# 989); the others are the vendors' dense figures. --peak-tflops overrides.
PEAK_BF16_TFLOPS = {
    "H100": 790.0,
    "H200": 790.0,  # the H100's compute with more memory
    "A100": 312.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "L4": 121.0,
    "A10G": 70.0,
}
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "flash-attn")


def package_version(package: str) -> str | None:
    """The version Python imports (wheels installed with --target may sit beside another copy)."""
    try:
        module = importlib.import_module(package.replace("-", "_"))
        return str(module.__version__)
    except (ImportError, AttributeError):
        try:
            return version(package)
        except PackageNotFoundError:
            return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def mfu(tokens_per_s: float, matmul_params: int, tflops: float | None) -> float | None:
    """Model FLOPs utilisation: tokens/s x 6N / peak (forward 2N, input gradients 2N, recompute 2N)."""
    if not tflops:
        return None
    return tokens_per_s * 6 * matmul_params / (tflops * 1e12)


def environment(command: str) -> dict:
    versions = {package: package_version(package) for package in PACKAGES}
    return {
        "device": device_name(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "versions": {package: v for package, v in versions.items() if v},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
    }


def memory_gib(row: dict) -> float | None:
    """The peak that matters: reserved on a GPU (what the allocator holds), else allocated."""
    return row.get("peak_reserved_gib", row.get("peak_allocated_gib"))


def ratios(rows: list[dict], base: str, others: tuple[str, ...]) -> list[dict]:
    """Speed and memory of `base` over each of `others` (1.3 = 30% faster / more memory)."""
    by_key = {row["config"]: row for row in rows if row.get("status") == "ok"}
    out = []
    for other in others:
        if base not in by_key or other not in by_key:
            continue
        a, b = by_key[base], by_key[other]
        ratio = {
            "pair": f"{base}/{other}",
            "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
            "peak_memory": memory_gib(a) / memory_gib(b),
        }
        if "tokens_per_cpu_s" in a and "tokens_per_cpu_s" in b:
            ratio["tokens_per_cpu_s"] = a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
        out.append(ratio)
    return out


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    """The environment, one row per configuration, and the ratios, as markdown."""
    env = report["environment"]
    cuda = env["cuda"] is not None
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        f"Device: {env['device']}" + (f", CUDA {env['cuda']}" if cuda else ""),
        f"Versions: {versions}",
        f"Date: {env['date']}",
        f"Command: `{env['command']}`",
        f"Scale: {report['scale']} (N = {report['matmul_params'] / 1e9:.3g}e9 matmul parameters)",
        "",
    ]
    memory_cols = ["peak alloc GiB", "peak reserved GiB", "device used GiB", "model GiB"]
    header = ["config", "status", "micro x accum", "tokens/s", "samples/s", "MFU", "pad %"]
    header += memory_cols if cuda else ["peak alloc GiB", "tokens/CPU-s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["results"]:
        cells = [
            row["label"],
            row["status"],
            f"{row.get('micro_batch', '-')} x {row.get('grad_accum', '-')}",
            _fmt(row.get("tokens_per_s"), 0),
            _fmt(row.get("samples_per_s")),
            _fmt(row["mfu"] * 100, 1) + "%" if row.get("mfu") is not None else "-",
            _fmt(row["padding_fraction"] * 100, 1) if "padding_fraction" in row else "-",
        ]
        keys = ["peak_allocated_gib", "peak_reserved_gib", "device_used_gib", "planned_gib"]
        if not cuda:
            keys = ["peak_allocated_gib", "tokens_per_cpu_s"]
        cells += [_fmt(row.get(key)) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for ratio in report["ratios"]:
        cpu = ratio.get("tokens_per_cpu_s")
        lines.append(
            f"{ratio['pair']}: tokens/s x{ratio['tokens_per_s']:.2f}"
            + (f" (per CPU-second x{cpu:.2f})" if cpu else "")
            + f", peak memory x{ratio['peak_memory']:.2f}"
        )
    return "\n".join(lines) + "\n"
