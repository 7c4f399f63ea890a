"""Hostile images cost bounded memory: the square an image is padded to, 16-bit and float
stretches, DICOM lookup tables and deflated DICOM files. Each case runs in a process of its
own (tests/data/image_memory_probe.py) that measures its peak resident memory; the smaller
square that bounds it gives the same pixels as the full-resolution pad within 2 grey levels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lmmtune.data.images import EXACT_PAD_SIDE, fit_square_budget, square_padding_processor
from tests.conftest import REPO_ROOT

MB = 1 << 20
FILL = (122, 116, 104)
BYTES_PER_PIXEL = 16
"""The bound: 64 MB plus this many bytes per pixel of the image or of its bounded square."""
PIXELS = {  # what each case allocates pixels for: the image, or its square (at most 4096²)
    "wide_png": 4000**2,  # 20000x5: the square at 1/5, 4000x4000
    "tall_png": 4000**2,  # 4x60000: at 1/15
    "widest_png": 4000**2,  # 100000x5: at 1/25
    "preview": 4000**2,
    "png16": 4000 * 4000,
    "tiff_float": 3000 * 3000,
    "dicom_rle": 3000 * 3000,
    "dicom_deflate_bomb": 8 * 8,
    "dicom_rle_bomb": 8 * 8,
    "dicom_jpeg_bomb": 8 * 8,
}


def probe(case: str, folder) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.data.image_memory_probe", case, str(folder)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "case",
    [
        "wide_png",  # a 388-byte file: once a 20000x20000 square, 5 GB
        "widest_png",  # once MemoryError asking for 27.9 GiB
        "preview",  # the chat's "what the model sees"
        "png16",  # once a float64 stretch: 550 MB for 16 Mpx
        "dicom_deflate_bomb",  # 400 MB of zeros in a 0.4 MB file: refused
        "dicom_rle_bomb",  # an 8x8 image whose RLE segment expands to 256 MB: refused
        "dicom_jpeg_bomb",  # a 30000x30000 JPEG in an 8x8 DICOM: once 2.2 GB, refused
        pytest.param("tall_png", marks=pytest.mark.slow),
        pytest.param("tiff_float", marks=pytest.mark.slow),
        pytest.param("dicom_rle", marks=pytest.mark.slow),  # once 413 MB for 9 Mpx
    ],
)
def test_a_hostile_image_costs_bounded_memory(case, tmp_path):
    pytest.importorskip("pydicom")
    result = probe(case, tmp_path)
    bound = 64 + BYTES_PER_PIXEL * PIXELS[case] / MB
    print(f"{case}: peak {result['peak_mb']:.0f} MB (bound {bound:.0f} MB)")
    assert result["peak_mb"] < bound, result
    if case == "dicom_deflate_bomb":
        assert "a deflated DICOM file that inflates past" in result["error"]
        assert "(a zip bomb); refused" in result["error"]
    elif case == "dicom_rle_bomb":
        assert "an RLE segment decodes past the header's Rows x Columns" in result["error"]
    elif case == "dicom_jpeg_bomb":
        assert (
            "the compressed image is 30000x30000 pixels but the DICOM header says 8x8"
            in (result["error"])
        )
        assert "refused undecoded" in result["error"]
    else:
        assert result["error"] is None


def full_square(image: Image.Image) -> Image.Image:
    """LLaVA's expand2square at full resolution: the reference."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), FILL)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def test_the_bounded_square_is_the_full_squares_box_average_exactly():
    rng = np.random.default_rng(0)
    for _ in range(120):
        width, height = (int(n) for n in rng.integers(1, 900, 2))
        side = int(rng.integers(3, 300))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        bounded = fit_square_budget(image, FILL, side)
        if max(width, height) <= side:
            assert bounded is image  # left to the processor's own pad: bit-identical to LLaVA
            continue
        factor = -(-max(width, height) // side)
        expected = full_square(image).reduce(factor)
        assert bounded.size == expected.size and max(bounded.size) <= side
        assert np.array_equal(np.asarray(bounded), np.asarray(expected)), (width, height, side)


def pictures(width: int, height: int):
    """Noise, a gradient, smooth blobs and a grid of one-pixel lines (the hardest case)."""
    rng = np.random.default_rng(1)
    yield "noise", Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    ramp = np.broadcast_to(x * 0.7 + y * 0.3, (height, width, 3)).astype(np.uint8)
    yield "gradient", Image.fromarray(ramp.copy())
    coarse = rng.integers(0, 256, (max(2, height // 50), max(2, width // 50), 3), dtype=np.uint8)
    yield "blobs", Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    grid = np.zeros((height, width, 3), np.uint8)
    grid[:, ::7], grid[::5, :] = 255, 255
    yield "grid", Image.fromarray(grid)


@pytest.mark.parametrize(
    "size",
    [
        (4500, 4400),  # the largest differences: a square reduced by 2
        (5000, 5),
        pytest.param((6000, 1500), marks=pytest.mark.slow),
        pytest.param((2000, 7000), marks=pytest.mark.slow),
    ],
)
def test_the_bounded_square_gives_llavas_pixels_within_two_grey_levels(size):
    """At LLaVA 1.5's 336 px, against the processor padding the full-resolution square."""
    from transformers import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    padding = square_padding_processor(clip)
    grey_levels = np.array(clip.image_std)[:, None, None] * 255
    assert max(size) > EXACT_PAD_SIDE
    for name, image in pictures(*size):
        exact = padding(images=[image], return_tensors="np")["pixel_values"][0]
        bounded = fit_square_budget(image, FILL)
        assert max(bounded.size) <= EXACT_PAD_SIDE
        shortcut = padding(images=[bounded], return_tensors="np")["pixel_values"][0]
        difference = np.abs(exact - shortcut) * grey_levels
        print(f"{name} {size}: max {difference.max():.2f}, mean {difference.mean():.3f}")
        assert difference.max() <= 2.0 + 1e-3 and difference.mean() < 1.0, name
