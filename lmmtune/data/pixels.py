"""Pixel checks shared by the image and DICOM decoders (a module of its own so that
`images` and `dicom` both import it and not each other)."""

from __future__ import annotations

import numpy as np

from lmmtune.data.problems import Kind, RecordInvalid


def check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    """Refuse an image whose header declares more pixels than `data.max_image_pixels`."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise RecordInvalid(
            Kind.TOO_MANY_PIXELS,
            f"{name}: {width}x{height} = {width * height:,} pixels, over "
            f"data.max_image_pixels={max_pixels:,} (decompression-bomb guard)",
        )


def stretch_to_uint8(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 255], clipping outside."""
    scaled = (pixels - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
