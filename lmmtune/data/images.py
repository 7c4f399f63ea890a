"""Open images as RGB and pad them to a square, as LLaVA 1.5 was trained (`image_aspect_ratio=pad`).

The llava-hf processor centre-crops; that cuts off the edges of a wide image, where a
lesion or a defect may be. Padding with the processor's mean colour first makes the
crop a no-op.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file, apply its EXIF rotation and convert it to 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: stretch the used range to 8 bits instead of clipping at 255.
        image = image.convert("I")
        low, high = image.getextrema()
        scale = 255.0 / max(high - low, 1)
        image = image.point(lambda value: (value - low) * scale).convert("L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of `fill` colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    return tuple(int(round(channel * 255)) for channel in image_processor.image_mean)
