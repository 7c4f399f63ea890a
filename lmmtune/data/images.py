"""Open images as 8-bit RGB, find broken ones, and pad to a square as LLaVA 1.5 was trained.

Every image goes through `decode_image`, in `check` and in training alike, so an image
that passes `check` loads in a DataLoader worker. What it handles:
- EXIF rotation applied; grayscale, 16-bit (stretched, not clipped), palette, RGBA
  (composited on white) and CMYK converted to RGB; DICOM through `dicom.py`.
- Named problems instead of PIL tracebacks: zero-byte, truncated, corrupt, not an
  image, and images over a pixel limit (checked from the header, before decoding, so a
  decompression bomb never allocates its pixels).
- Bounded memory: only the formats in `FORMATS` are decoded (no Ghostscript for EPS, no
  exotic decoders), 16-bit and float pixels are stretched in chunks (never a float64
  copy of the image), and the square an image is padded to never exceeds
  EXACT_PAD_SIDE² pixels (`fit_square_budget`): a 388-byte 20000x5 PNG once made a
  20000x20000 square (5 GB).

The llava-hf processor centre-crops; that cuts off the edges of a wide image, where a
lesion or a defect may be. Padding with the processor's mean colour first (transformers'
`LlavaImageProcessorPil(do_pad=True)`, as the export ships it) makes the crop a no-op.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lmmtune.data.dicom import check_pixels, decode_dicom, stretch_to_uint8
from lmmtune.errors import Kind, RecordInvalid

IMAGE_MAGIC = {
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WEBP",
}
DICOM_SUFFIXES = (".dcm", ".dicom")
HEADER_BYTES = 4096
"""Bytes read to identify an image file before the rest is read."""
DEFAULT_MAX_PIXELS = 89_478_485
"""PIL's own default; `data.max_image_pixels` sets it per run (null: no limit)."""
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "JPEG2000", "PPM")
"""The PIL formats decoded (DICOM aside). Others are refused by name: EPS would run
Ghostscript on the file, and rarely used decoders are where decoder bugs live."""


def read_image_bytes(path: str | Path) -> bytes:
    """The file's bytes, read only after its header says it is an image (or DICOM)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
            if header and not looks_like_image(header, str(path)):
                raise _other_format_refused(header, str(path)) or RecordInvalid(
                    Kind.NOT_AN_IMAGE, f"not an image file: {path} (no image header; not read)"
                )
            return header + handle.read()
    except FileNotFoundError:
        raise RecordInvalid(Kind.MISSING_IMAGE, f"image not found: {path}") from None
    except IsADirectoryError:
        raise RecordInvalid(Kind.NOT_AN_IMAGE, f"a folder, not an image file: {path}") from None
    except OSError as exc:
        raise RecordInvalid(Kind.MISSING_IMAGE, f"cannot read {path}: {exc.strerror}") from None


def looks_like_image(header: bytes, name: str) -> bool:
    """Whether a file's first bytes are a format PIL opens, or DICOM (from the header alone)."""
    if is_dicom(header, name) or header.startswith(tuple(IMAGE_MAGIC)):
        return True
    try:
        with warnings.catch_warnings(), _own_pixel_limit():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(header), formats=FORMATS).close()  # identified by header
        return True
    except UnidentifiedImageError:
        return False
    except Exception:  # noqa: BLE001 - identified, but the header alone does not decode
        return True


def open_image(
    source: str | Path | bytes, name: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open an image file (or its encoded bytes) as 8-bit RGB with its EXIF rotation applied."""
    data = source if isinstance(source, bytes) else read_image_bytes(source)
    return decode_image(data, name or str(source), max_pixels)


def inspect_image(
    source: str | Path | bytes, name: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> str:
    """Verify and fully decode an image as training will; return a digest of its bytes."""
    data = source if isinstance(source, bytes) else read_image_bytes(source)
    decode_image(data, name or str(source), max_pixels, verify=True)
    return hashlib.sha1(data).hexdigest()[:20]


def decode_image(
    data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, verify: bool = False
) -> Image.Image:
    """Decode encoded image bytes to RGB, or raise RecordInvalid naming what is wrong."""
    if not data:
        raise RecordInvalid(Kind.EMPTY_IMAGE, f"zero-byte image file: {name}")
    if is_dicom(data, name):
        return decode_dicom(data, name, max_pixels)
    try:
        with warnings.catch_warnings(), _own_pixel_limit():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, "Corrupt EXIF data"
            if verify:
                with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                    check_pixels(image.size, name, max_pixels)
                    image.verify()
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                check_pixels(image.size, name, max_pixels)
                check_single_frame(image, name)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except RecordInvalid:
        raise
    except Image.DecompressionBombError as exc:
        raise RecordInvalid(Kind.TOO_MANY_PIXELS, f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise _unidentified(data, name) from None
    except Exception as exc:  # any decoder failure means a broken image file
        kind = Kind.TRUNCATED_IMAGE if "truncated" in str(exc).lower() else Kind.CORRUPT_IMAGE
        raise RecordInvalid(kind, f"{kind}: {name} ({exc})") from None


@contextmanager
def _own_pixel_limit():
    """Switch off PIL's global guard while opening: `check_pixels` runs on the header instead.

    PIL's limit is process-wide and fires only at twice its value; ours names the file,
    the size and the setting. `Image.open` reads the header only, so no pixels are
    allocated before `check_pixels` has run.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_single_frame(image: Image.Image, name: str) -> None:
    """Refuse an animated GIF/WebP/PNG or a multi-page TIFF, as a multi-frame DICOM is refused:
    LLaVA 1.5 sees one image, and silently taking the first frame would hide the rest."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise RecordInvalid(
            Kind.UNSUPPORTED_IMAGE,
            f"{name}: {frames} frames (animated or multi-page {image.format}); LLaVA 1.5 takes "
            "one image: save the frame you mean as its own file",
        )


def is_dicom(data: bytes, name: str) -> bool:
    return name.lower().endswith(DICOM_SUFFIXES) or data[128:132] == b"DICM"


def _unidentified(data: bytes, name: str) -> RecordInvalid:
    """PIL cannot tell the format: a cut-off image if it starts like one, a format lmmtune
    does not decode, or not an image."""
    other = _other_format_refused(data, name)
    if other is not None:
        return other
    for magic, image_format in IMAGE_MAGIC.items():
        if data.startswith(magic):
            return RecordInvalid(
                Kind.TRUNCATED_IMAGE,
                f"{name}: starts like a {image_format} but cannot be read (truncated or corrupt)",
            )
    return RecordInvalid(Kind.NOT_AN_IMAGE, f"not an image file: {name} (no image header)")


def _other_format_refused(data: bytes, name: str) -> RecordInvalid | None:
    """The problem of a file in a format PIL knows but lmmtune does not decode (told from
    its header alone, nothing decoded); None for a file PIL does not know either."""
    try:
        with warnings.catch_warnings(), _own_pixel_limit():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data[:HEADER_BYTES])) as image:
                other = image.format
    except Exception:  # noqa: BLE001 - unknown to PIL too, or broken
        return None
    return RecordInvalid(
        Kind.UNSUPPORTED_IMAGE,
        f"{name}: an image in {other} format; lmmtune decodes {', '.join(FORMATS)} and DICOM "
        "(convert it to PNG)",
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit and float stretched, transparency on white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith(("I", "F")):
        # 16/32-bit or float grayscale: stretch the used range to 8 bits instead of clipping.
        pixels = np.asarray(image)
        image = Image.fromarray(stretch_to_uint8(pixels, pixels.min(), pixels.max()), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


SQUARE_PAD_SETTINGS = (
    "size",
    "crop_size",
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "resample",
    "do_convert_rgb",
)


def square_padding_processor(image_processor, pad: bool = True):
    """The processor's settings in transformers' `LlavaImageProcessorPil(do_pad=True)`.

    It pads to a square in LLaVA 1.5's `expand2square` colour, `int(mean * 255)` (CLIP's
    mean gives (122, 116, 104)), then resizes as before: pixel-identical to the
    hand-written PIL pad it replaces. The PIL backend, not torchvision's: its resize is
    the one the model was trained with.
    """
    from transformers import LlavaImageProcessorPil

    settings = image_processor.to_dict()
    kept = {key: settings[key] for key in SQUARE_PAD_SETTINGS if key in settings}
    return LlavaImageProcessorPil(**kept, do_pad=pad)


def pad_colour(image_processor) -> tuple[int, ...]:
    """LLaVA's `expand2square` colour, `int(mean * 255)`: (122, 116, 104) for CLIP."""
    return tuple(int(mean * 255) for mean in image_processor.image_mean)


def padded_to_square(image: Image.Image, image_processor) -> Image.Image:
    """An RGB `image` padded to a square as training pads it (the same processor's pad), to show."""
    pad = square_padding_processor(image_processor)
    image = fit_square_budget(image, pad_colour(pad))
    array = pad.pad_to_square(np.asarray(image).transpose(2, 0, 1), pad_colour(pad))
    return Image.fromarray(array.transpose(1, 2, 0))


EXACT_PAD_SIDE = 4096
"""Longest side up to which an image is padded to a square at full resolution (by the
processor, bit-identical to LLaVA's expand2square + CLIP processor): the square then
holds at most 4096² pixels (48 MiB in RGB)."""


def fit_square_budget(image: Image.Image, fill: tuple, max_side: int = EXACT_PAD_SIDE):
    """`image` as it is when its padded square has at most `max_side` pixels a side;
    else that square itself, built at 1/k of its resolution (k = ceil(side / max_side)).

    Each pixel of the smaller square is the k-by-k box average of the full-resolution
    square (`square.reduce(k)`, the padding colour mixed in where a box straddles the
    image's edge), computed from the image alone: the full square is never allocated.
    After the processor's resize to 336 px this is within 2 grey levels (of 255) of
    resizing the full square (tests/data/test_image_memory.py measures it).
    """
    side = max(image.size)
    if side <= max_side:
        return image
    k = -(-side // max_side)
    offsets = [(side - length) // 2 for length in image.size]
    leads = [offset % k for offset in offsets]  # aligns the image to the k-by-k grid
    canvas_size = [  # from a multiple of k in the square to the next one, or the square's end
        min(-(-(lead + length) // k) * k, side - offset + lead)
        for lead, length, offset in zip(leads, image.size, offsets, strict=True)
    ]
    canvas = Image.new("RGB", tuple(canvas_size), fill)
    canvas.paste(image, tuple(leads))
    square = Image.new("RGB", (-(-side // k),) * 2, fill)
    square.paste(canvas.reduce(k), tuple(offset // k for offset in offsets))
    return square
