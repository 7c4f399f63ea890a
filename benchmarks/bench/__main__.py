"""`python -m benchmarks.bench`: time lmmtune's recipe against the usual QLoRA pipeline.

    python -m benchmarks.bench                              # CPU: tiny scale, ratios only
    python -m benchmarks.bench --scale 7b                   # GPU: LLaVA-1.5-7B shapes
    python -m benchmarks.bench --scale 13b --gpu-memory-gb 22 --configs all
    python -m benchmarks.bench --grouping                   # per-image grouping (CPU)
    python -m benchmarks.bench --methods                    # PEFT methods on the demo

On a GPU every configuration runs in its own process, so that one's cached or
paged memory cannot inflate the next one's peak. The report is rewritten after
every configuration, so a run cut short still leaves the rows it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench import grouping
from benchmarks.bench.methods import METHODS, compare_methods, methods_markdown
from benchmarks.bench.models import llava_config, random_checkpoint
from benchmarks.bench.recipes import ABLATION_KEYS, DEFAULT_KEYS, RECIPES
from benchmarks.bench.report import environment, markdown, mfu, peak_tflops, ratios
from benchmarks.bench.run import BenchSettings, run_recipe
from lmmtune.model import torch_dtype
from lmmtune.training.memory import GIB, ModelShape

log = logging.getLogger("benchmarks.bench")
EPILOG = "--grouping: the per-image grouping benchmark instead (its options: --grouping -h)"
# Per scale: micro-batch, gradient accumulation, warm-up steps, timed steps, LoRA rank.
SCALE_DEFAULTS = {
    "tiny": (2, 1, 1, 2, 16),
    "small": (2, 2, 1, 3, 64),
    "7b": (4, 4, 2, 5, 128),
    "13b": (4, 4, 2, 5, 128),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n")[0], epilog=EPILOG
    )
    gpu = torch.cuda.is_available()
    parser.add_argument("--scale", choices=list(SCALE_DEFAULTS), default="7b" if gpu else "tiny")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_KEYS),
        help=f"comma-separated from {', '.join(RECIPES)}; 'all' adds the a-* ablations",
    )
    parser.add_argument("--micro-batch", type=int, help="per-device batch (default per scale)")
    parser.add_argument("--grad-accum", type=int, help="gradient accumulation (default per scale)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first")
    parser.add_argument("--steps", type=int, help="timed optimizer steps")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (alpha = 2r)")
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        help="consumer budget: cap GPU memory; the planner picks each configuration's micro-batch",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by device)"
    )
    parser.add_argument("--out", type=Path, help="JSON results (a .md table is written next to it)")
    parser.add_argument("--cache-dir", type=Path, help="where random checkpoints are kept")
    parser.add_argument(
        "--config-timeout",
        type=float,
        help="seconds one configuration may take in its own process (then: status timeout)",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=gpu,
        help="one process per configuration (default on a GPU)",
    )
    add_method_arguments(parser)
    args = parser.parse_args(argv)
    defaults = SCALE_DEFAULTS[args.scale]
    for name, default in zip(
        ("micro_batch", "grad_accum", "warmup", "steps", "lora_r"), defaults, strict=True
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
    keys = list(DEFAULT_KEYS + ABLATION_KEYS) if args.configs == "all" else args.configs.split(",")
    unknown = [key for key in keys if key not in RECIPES]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(RECIPES)}")
    args.keys = keys
    return args


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """`--methods`: train the demo with each PEFT method instead (benchmarks/bench/methods.py)."""
    parser.add_argument(
        "--methods",
        nargs="?",
        const=",".join(METHODS),
        help=f"PEFT methods on the demo, comma-separated from {', '.join(METHODS)} (default all)",
    )
    parser.add_argument("--demo-size", type=int, default=320, help="--methods: data.demo_size")
    parser.add_argument("--epochs", type=int, default=8, help="--methods: train.epochs")


def method_report(args: argparse.Namespace) -> dict:
    """`--methods`: the PEFT methods on the demo, written as JSON and a markdown table."""
    names = args.methods.split(",")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    report = compare_methods(names, args.demo_size, args.epochs)
    out = args.out or default_out("methods")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = methods_markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"results: {out} and {out.with_suffix('.md')}")
    return report


def compute_dtype() -> str:
    """bf16 on a GPU (the recipe's); fp32 on a CPU, where bf16 autocast is slow."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


def settings_from(args: argparse.Namespace, workdir: Path) -> BenchSettings:
    return BenchSettings(
        scale=args.scale,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        steps=args.steps,
        lora_r=args.lora_r,
        dtype=compute_dtype(),
        gpu_memory_gb=args.gpu_memory_gb,
        workdir=workdir,
    )


def cap_gpu_memory(gpu_memory_gb: float | None) -> None:
    if gpu_memory_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_gb * GIB / total))


def run_isolated(key: str, argv: list[str], workdir: Path, timeout: float | None = None) -> dict:
    """Run one configuration in a fresh process and read back its result row."""
    out = workdir / f"{key}.json"
    forwarded = _without(argv, "--configs", "--out", "--config-timeout") + [
        "--configs",
        key,
        "--out",
        str(out),
        "--no-isolate",
    ]
    command = [sys.executable, "-m", "benchmarks.bench", *forwarded]
    try:
        done = subprocess.run(command, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": key, "label": RECIPES[key].label, "status": f"timeout ({timeout:.0f} s)"}
    if done.returncode != 0 or not out.exists():
        return {
            "config": key,
            "label": RECIPES[key].label,
            "status": f"failed (exit {done.returncode})",
        }
    return json.loads(out.read_text())["results"][0]


def _without(argv: list[str], *options: str) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(arg.startswith(f"{option}=") for option in options):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--grouping" in argv:  # its own options: benchmarks/bench/grouping.py
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return grouping.main(grouping.parse_args(argv))
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.methods:
        return method_report(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cap_gpu_memory(args.gpu_memory_gb)
    checkpoint = random_checkpoint(args.scale, torch_dtype(compute_dtype()), args.cache_dir)
    command = "python -m benchmarks.bench " + shlex.join(argv)
    out = args.out or default_out(args.scale)
    with tempfile.TemporaryDirectory(prefix="lmmtune-bench-") as tmp:
        workdir = Path(tmp)
        settings = settings_from(args, workdir)
        results = []
        for key in args.keys:
            log.info("running %s", RECIPES[key].label)
            if args.isolate and len(args.keys) > 1:
                results.append(run_isolated(key, argv, workdir, args.config_timeout))
            else:
                results.append(run_recipe(RECIPES[key], settings, checkpoint))
            if len(results) < len(args.keys):
                write_report(build_report(args, results, command), out, quiet=True)
    report = build_report(args, results, command)
    write_report(report, out)
    return report


def build_report(args: argparse.Namespace, results: list[dict], command: str) -> dict:
    env = environment(command)
    matmul = ModelShape.from_config(llava_config(args.scale)).matmul_params()
    tflops = args.peak_tflops or (peak_tflops(env["device"]) if env["cuda"] else None)
    for row in results:
        row["mfu"] = mfu(row["tokens_per_s"], matmul, tflops) if row.get("status") == "ok" else None
    return {
        "environment": env,
        "scale": args.scale,
        "matmul_params": matmul,
        "peak_tflops": tflops,
        "results": results,
        "ratios": ratios(results, "lmmtune", ("usual", "lora", "dpo")),
    }


def default_out(scale: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / "bench" / f"bench-{scale}-{stamp}.json"


def write_report(report: dict, out: Path, quiet: bool = False) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    if not quiet:
        print(table)
        print(f"results: {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
