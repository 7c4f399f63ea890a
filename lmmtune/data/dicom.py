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
Memory: the lookup tables and stretches run over a few rows at a time (pydicom's LUT
functions return float64, 8 bytes a value, four times the 16-bit pixels), and a
deflated file is inflated only up to what its pixels can need (a zip bomb is refused).
The pixel-count guard and the chunked 8-bit stretch at the end serve `images.py` too
(16-bit and float images), which imports them from here.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from lmmtune.errors import Kind, RecordInvalid

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'lmmtune[dicom]' (pydicom and its JPEG/JPEG 2000 decoders)"
RGB_WHEN_DECODED = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
"""Photometric interpretations whose pixels pydicom 3 returns as RGB (YCbCr converted)."""
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
RLE_PADDING = 64
"""Bytes an RLE segment may decode to past Rows x Columns (encoders pad to even lengths)."""
DEFLATED = "1.2.840.10008.1.2.1.99"
"""Deflated Explicit VR Little Endian: the whole data set is zlib-compressed."""
MAX_INFLATED_BYTES_PER_PIXEL = 24
"""What a deflated file may inflate to per allowed pixel (3 samples of 64 bits), plus
INFLATED_HEADER_BYTES for its other elements."""
INFLATED_HEADER_BYTES = 64 << 20


def decode_dicom(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode a DICOM file's bytes to RGB, or raise RecordInvalid naming what is wrong."""
    try:
        import pydicom
    except ImportError:
        raise RecordInvalid(
            Kind.DICOM_UNAVAILABLE,
            f"{name} is a DICOM image and pydicom is not installed: {INSTALL_HINT}",
        ) from None
    check_inflated_size(data, name, max_pixels)
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
    check_compressed_frame(dataset, name, rows, columns)
    try:
        pixels = dataset.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise RecordInvalid(
            Kind.UNSUPPORTED_IMAGE,
            f"{name}: cannot decode the DICOM pixel data (transfer syntax {syntax}): {exc}",
        ) from None
    return _to_rgb(dataset, pixels, name)


def check_inflated_size(data: bytes, name: str, max_pixels: int | None) -> None:
    """Refuse a deflated DICOM that inflates past what `max_pixels` pixels can need.

    pydicom inflates the whole data set before any header can be checked: a 1 MB file
    may inflate to a gigabyte. The inflation is tried here first, in bounded steps.
    """
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, force=True)
        syntax = str(_read_file_meta_info(stream).get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - no readable meta: pydicom's own read names the problem
        return
    if syntax != DEFLATED or max_pixels is None:
        return
    limit = max_pixels * MAX_INFLATED_BYTES_PER_PIXEL + INFLATED_HEADER_BYTES
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, inflated = data[stream.tell() :], 0
    while pending and inflated <= limit:
        inflated += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    if inflated > limit:
        raise RecordInvalid(
            Kind.TOO_MANY_PIXELS,
            f"{name}: a deflated DICOM file that inflates past {limit:,} bytes, more than "
            f"data.max_image_pixels={max_pixels:,} pixels can need (a zip bomb); refused",
        )


def check_compressed_frame(dataset, name: str, rows: int, columns: int) -> None:
    """Refuse compressed pixel data that would decode to more than the header's Rows x Columns.

    The decoders size their output from the compressed stream, not from the header that
    `check_pixels` read: a JPEG 2000 or JPEG stream of 30000x30000 pixels in a file that
    says 8x8 is decoded whole before pydicom compares, and pydicom's RLE decoder expands
    each segment whole (up to 64 times its size) before it trims it.
    """
    if not getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None):
        return
    syntax = dataset.file_meta.TransferSyntaxUID
    if not syntax.is_compressed or syntax == DEFLATED:
        return
    try:
        from pydicom.encaps import generate_frames

        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 - not encapsulated as it should be: pydicom says why
        return
    if syntax == RLE_LOSSLESS:
        too_long = _rle_segment_too_long(frame, rows * columns)
        reason = "an RLE segment decodes past the header's Rows x Columns"
    else:
        size = _codestream_size(frame)
        too_long = size is not None and size != (rows, columns)
        reason = f"the compressed image is {size[1]}x{size[0]} pixels" if too_long else ""
    if too_long:
        raise RecordInvalid(
            Kind.CORRUPT_IMAGE,
            f"{name}: {reason} but the DICOM header says {columns}x{rows}; refused undecoded",
        )


def _rle_segment_too_long(frame: bytes, plane: int) -> bool:
    """Whether a segment of an RLE frame decodes to more than `plane` bytes (plus padding),
    found with Pillow's PackBits decoder (DICOM RLE is PackBits), which stops there."""
    count = int.from_bytes(frame[:4], "little")
    segments = range(min(count, 15))  # the standard allows 15
    offsets = [int.from_bytes(frame[4 + 4 * i : 8 + 4 * i], "little") for i in segments]
    for start, end in zip(offsets, [*offsets[1:], len(frame)], strict=True):
        try:
            Image.frombytes("L", (plane + RLE_PADDING, 1), frame[start:end], "packbits", "L")
        except ValueError:  # ran out of data first: at most plane + padding bytes
            continue
        return True
    return False


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 stream declares; None if not found."""
    from pydicom.pixels.utils import _get_jpg_parameters

    siz = frame.find(b"\xff\x4f\xff\x51")  # JPEG 2000: SOC, then the SIZ segment
    if siz >= 0 and len(frame) >= siz + 24:
        x, y, x0, y0 = (
            int.from_bytes(frame[siz + 8 + 4 * i : siz + 12 + 4 * i], "big") for i in range(4)
        )
        return y - y0, x - x0
    parameters = _get_jpg_parameters(frame)
    if parameters.get("height") and parameters.get("width"):
        return parameters["height"], parameters["width"]
    return None


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
        pixels = stretch_to_uint8(pixels, 0, 2**bits - 1)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def window(dataset, pixels: np.ndarray) -> np.ndarray:
    """Grayscale pixels to 8 bits the way the file asks, through pydicom's own LUT functions.

    Modality LUT or rescale first, then the VOI LUT table or window (LINEAR, LINEAR_EXACT,
    SIGMOID); a file with neither (or with an invalid window) is stretched from min to max.
    Every step maps each value on its own, so it runs over a few rows at a time.
    """
    try:
        if dataset.get("VOILUTSequence"):
            bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
            return _in_row_chunks(pixels, lambda part: _voi_table(dataset, part, bits))
        if "WindowCenter" in dataset and "WindowWidth" in dataset:
            from pydicom.pixels import apply_voi_lut

            # The window's output range: pydicom maps values far outside it to its ends.
            low, high = apply_voi_lut(np.array([-np.inf, np.inf]), dataset)
            return _in_row_chunks(
                pixels,
                lambda part: stretch_to_uint8(
                    apply_voi_lut(_modality(dataset, part), dataset), low, high
                ),
            )
    except (ValueError, IndexError, TypeError, AttributeError) as exc:
        log.warning("ignoring the DICOM file's VOI LUT / window (%s): min/max instead", exc)
    ranges = [
        (values.min(), values.max())
        for values in map(lambda part: _modality(dataset, part), _row_chunks(pixels))
    ]
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return _in_row_chunks(
        pixels, lambda part: stretch_to_uint8(_modality(dataset, part), low, high)
    )


def _modality(dataset, pixels: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    return apply_modality_lut(pixels, dataset)


def _voi_table(dataset, pixels: np.ndarray, bits: int) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    # The table is indexed by integers; a rescale makes modality values floats.
    values = np.rint(_modality(dataset, pixels)).astype(np.int64)
    shown = apply_voi_lut(values, dataset, prefer_lut=True)
    return stretch_to_uint8(shown, 0, 2**bits - 1)


def _row_chunks(pixels: np.ndarray):
    step = chunked_rows(pixels)
    return (pixels[start : start + step] for start in range(0, len(pixels), step))


def _in_row_chunks(pixels: np.ndarray, to_uint8) -> np.ndarray:
    """`to_uint8` applied to a few rows at a time, into one uint8 image."""
    out = np.empty(pixels.shape, np.uint8)
    step = chunked_rows(pixels)
    for start in range(0, len(pixels), step):
        out[start : start + step] = to_uint8(pixels[start : start + step])
    return out


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
