"""Time the data side alone: `check` and one epoch of the data pipeline, in records/s.

    python benchmarks/bench_data.py                  # 10,000 records, 2 workers
    python benchmarks/bench_data.py --records 2000 --workers 4 --image-size 336

It writes N LLaVA records with small PNG images (one image per record, a tenth of
them multi-turn, a twentieth text-only) into a temporary folder, then times
1. `inspect_data`, the function `python -m lmmtune check` runs (image decode in a
   worker pool, token counting, duplicate ids, split), with the tiny processor;
   then the whole command in a subprocess (Python start-up and imports included);
2. one epoch of DataLoader(SupervisedDataset) with the padding collator and
   `--workers` workers: lazy image decoding, pad to square, the image processor,
   template rendering, tokenization and label masking. No model runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_records(target: Path, records: int, image_size: int, seed: int = 0) -> Path:
    """N LLaVA records with their own small PNG images; returns the JSON file."""
    rng = random.Random(seed)
    (target / "images").mkdir(parents=True)
    rows = []
    for index in range(records):
        record = {"id": f"r{index}", "conversations": []}
        if index % 20:
            name = f"images/{index:06d}.png"
            _image(rng, image_size).save(target / name)
            record["image"] = name
        turns = 2 if index % 10 == 0 else 1
        for turn in range(turns):
            question = "Is there a lesion in this scan?" if turn == 0 else "Which side is it on?"
            if turn == 0 and "image" in record:
                question = "<image>\n" + question
            record["conversations"] += [
                {"from": "human", "value": question},
                {"from": "gpt", "value": rng.choice(["yes", "no", "left", "right"])},
            ]
        rows.append(record)
    data_file = target / "train.json"
    data_file.write_text(json.dumps(rows))
    return data_file


def _image(rng: random.Random, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size * 3 // 4), tuple(rng.randrange(60) for _ in range(3)))
    x, y = rng.randrange(size // 2), rng.randrange(size // 3)
    ImageDraw.Draw(image).ellipse((x, y, x + size // 4, y + size // 4), fill=(230, 230, 220))
    return image


class Timer:
    """Wall seconds and CPU seconds (this process and its finished children) of a block.

    CPU time is the number to compare on a shared machine: wall time there grows with
    other people's load, CPU time hardly does.
    """

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.2f} s wall, {self.cpu:.2f} s CPU"


def _cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def time_check(data_file: Path, workers: int, processor) -> tuple[Timer, object]:
    from lmmtune.config import DataConfig
    from lmmtune.data.checks import inspect_data

    data_cfg = DataConfig(train=str(data_file), num_workers=workers)
    with Timer() as timer:
        report = inspect_data(data_cfg, processor, data_file.parent)
    return timer, report


def time_cli(data_file: Path, workers: int) -> Timer:
    """The whole command, start-up and processor load included."""
    command = [sys.executable, "-m", "lmmtune", "check", "model=tiny", f"data.train={data_file}"]
    with Timer() as timer:
        subprocess.run(
            [*command, f"data.num_workers={workers}"],
            cwd=data_file.parent,
            check=True,
            capture_output=True,
        )
    return timer


def time_epoch(samples: list, processor, workers: int, batch_size: int) -> Timer:
    from torch.utils.data import DataLoader

    from lmmtune.data.batches import PaddingCollator, SupervisedDataset

    dataset = SupervisedDataset(samples, processor, max_length=2048)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=PaddingCollator(processor.tokenizer.pad_token_id),
    )
    with Timer() as timer:
        seen = sum(len(batch["input_ids"]) for batch in loader)
    assert seen == len(samples), (seen, len(samples))
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64, help="image width in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-cli", action="store_true", help="skip timing the whole command")
    args = parser.parse_args()

    from lmmtune.config import ModelConfig
    from lmmtune.model import load_processor

    processor = load_processor(ModelConfig(path="tiny"))
    with tempfile.TemporaryDirectory(prefix="lmmtune-bench-") as folder:
        started = time.perf_counter()
        data_file = write_records(Path(folder), args.records, args.image_size)
        print(f"wrote {args.records} records in {time.perf_counter() - started:.1f} s")
        timer, report = time_check(data_file, args.workers, processor)
        assert not report.problems, report.problems[:3]
        print(
            f"check: {args.records} records in {timer} = "
            f"{args.records / timer.wall:,.0f} records/s ({args.workers} workers)"
        )
        if not args.no_cli:
            print(f"python -m lmmtune check, whole command: {time_cli(data_file, args.workers)}")
        samples = report.train + report.eval
        timer = time_epoch(samples, processor, args.workers, args.batch_size)
        print(
            f"data pipeline, one epoch: {len(samples)} samples in {timer} = "
            f"{len(samples) / timer.wall:,.0f} records/s ({args.workers} workers, "
            f"batch {args.batch_size}, {processor.image_processor.crop_size['height']} px)"
        )
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
