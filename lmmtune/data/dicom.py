"""DICOM (`.dcm`) images to 8-bit RGB, with the optional `pydicom` extra.

Grayscale pixels go through pydicom's `apply_modality_lut` (Modality LUT or
slope/intercept) and `apply_voi_lut` (the file's VOI LUT table, or its window with the
LINEAR, LINEAR_EXACT or SIGMOID function), or the min/max range when the file has
neither. MONOCHROME1 (white is low) is inverted.
Colour: RGB, the YCbCr interpretations of JPEG and JPEG 2000 files (ultrasound,
endoscopy, dermatology and slide scanners write these; pydicom 3 hands them over
as RGB) and PALETTE COLOR (through the file's lookup tables). Compressed transfer
syntaxes decode with the extra's pylibjpeg plugins (JPEG, JPEG-LS, JPEG 2000) or
pydicom itself (RLE). Multi-frame files are refused: LLaVA 1.5 takes one image
per sample.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from lmmtune.data.pixels import check_pixels, stretch_to_uint8
from lmmtune.data.problems import Kind, RecordInvalid

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'lmmtune[dicom]' (pydicom and its JPEG/JPEG 2000 decoders)"
RGB_WHEN_DECODED = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
"""Photometric interpretations whose pixels pydicom 3 returns as RGB (YCbCr converted)."""


def decode_dicom(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode a DICOM file's bytes to RGB, or raise RecordInvalid naming what is wrong."""
    try:
        import pydicom
    except ImportError:
        raise RecordInvalid(
            Kind.DICOM_UNAVAILABLE,
            f"{name} is a DICOM image and pydicom is not installed: {INSTALL_HINT}",
        ) from None
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except Exception as exc:
        raise RecordInvalid(
            Kind.CORRUPT_IMAGE, f"{name}: not a readable DICOM image ({exc})"
        ) from None
    if "PixelData" not in dataset:
        raise RecordInvalid(Kind.UNSUPPORTED_IMAGE, f"{name}: DICOM file without pixel data")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise RecordInvalid(
            Kind.MULTIPLE_IMAGES,
            f"{name}: multi-frame DICOM ({frames} frames); LLaVA 1.5 takes one image per "
            "sample: export the frame you want",
        )
    check_pixels((columns, rows), name, max_pixels)
    try:
        pixels = dataset.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise RecordInvalid(
            Kind.UNSUPPORTED_IMAGE,
            f"{name}: cannot decode the DICOM pixel data (transfer syntax {syntax}): {exc}",
        ) from None
    return _to_rgb(dataset, pixels, name)


def _to_rgb(dataset, pixels: np.ndarray, name: str) -> Image.Image:
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric in ("MONOCHROME1", "MONOCHROME2") and pixels.ndim == 2:
        gray = window(dataset, pixels)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
        return Image.fromarray(gray, "L").convert("RGB")
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        from pydicom.pixels import apply_color_lut

        bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        return _rgb_image(apply_color_lut(pixels, dataset), bits)
    if photometric in RGB_WHEN_DECODED and pixels.ndim == 3 and pixels.shape[-1] == 3:
        return _rgb_image(pixels, int(dataset.BitsStored))
    raise RecordInvalid(
        Kind.UNSUPPORTED_IMAGE,
        f"{name}: DICOM photometric interpretation {photometric} with pixel shape "
        f"{pixels.shape} is not supported (MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, "
        "YBR_FULL_422, YBR_ICT, YBR_RCT and PALETTE COLOR are)",
    )


def _rgb_image(pixels: np.ndarray, bits: int) -> Image.Image:
    """[rows, columns, 3] samples of `bits` bits to an 8-bit RGB image."""
    if pixels.dtype != np.uint8:
        pixels = stretch_to_uint8(pixels.astype(np.float64), 0, 2**bits - 1)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def window(dataset, pixels: np.ndarray) -> np.ndarray:
    """Grayscale pixels to 8 bits the way the file asks, through pydicom's own LUT functions.

    Modality LUT or rescale first, then the VOI LUT table or window (LINEAR, LINEAR_EXACT,
    SIGMOID); a file with neither (or with an invalid window) is stretched from min to max.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, dataset)
    try:
        if dataset.get("VOILUTSequence"):
            bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
            # The table is indexed by integers; a rescale makes modality values floats.
            shown = apply_voi_lut(np.rint(values).astype(np.int64), dataset, prefer_lut=True)
            return stretch_to_uint8(shown.astype(np.float64), 0, 2**bits - 1)
        if "WindowCenter" in dataset and "WindowWidth" in dataset:
            shown = apply_voi_lut(values, dataset)
            # The window's output range: pydicom maps values far outside it to its ends.
            low, high = apply_voi_lut(np.array([-np.inf, np.inf]), dataset)
            return stretch_to_uint8(shown, low, high)
    except (ValueError, IndexError, TypeError, AttributeError) as exc:
        log.warning("ignoring the DICOM file's VOI LUT / window (%s): min/max instead", exc)
    values = values.astype(np.float64)
    return stretch_to_uint8(values, values.min(), values.max())
