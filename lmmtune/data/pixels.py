"""Pixel checks shared by the image and DICOM decoders (a module of its own so that
`images` and `dicom` both import it and not each other)."""

from __future__ import annotations

import numpy as np

from lmmtune.data.problems import Kind, RecordInvalid

CHUNK_VALUES = 1 << 20
"""Values converted at a time where a float64 temporary is needed (8 MB each), so that
converting an image never holds a float64 copy of all its pixels (8 bytes per value)."""


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
    """Map [low, high] linearly onto [0, 255], clipping outside; computed in float64 one
    chunk at a time (the same values as converting the whole array at once)."""
    scale = 255.0 / max(float(high) - float(low), 1e-12)
    flat = np.ascontiguousarray(pixels).reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    for start in range(0, flat.size, CHUNK_VALUES):
        part = (flat[start : start + CHUNK_VALUES].astype(np.float64) - low) * scale
        out[start : start + CHUNK_VALUES] = np.clip(np.rint(part), 0, 255)
    return out.reshape(pixels.shape)


def chunked_rows(pixels: np.ndarray) -> int:
    """Rows of `pixels` per chunk, so that each chunk holds about CHUNK_VALUES values."""
    per_row = max(1, pixels[:1].size)
    return max(1, CHUNK_VALUES // per_row)
