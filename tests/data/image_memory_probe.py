"""Run by tests/data/test_image_memory.py in a process of its own: decode and preprocess one
hostile image as training, eval, predict and chat do, and print the peak memory it took.

    python -m tests.data.image_memory_probe CASE FOLDER

Prints one JSON line: {"case", "peak_mb", "error"}. The peak is the growth of
the process's resident memory (VmHWM, reset through /proc/self/clear_refs before the
case), and the address space is capped 2 GiB above what the imports took, so a case
that regresses fails with MemoryError instead of taking the machine.
"""

from __future__ import annotations

import io
import json
import re
import resource
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CAP_BYTES = 2 << 30


def status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1])


def png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def gradient16(size: int) -> np.ndarray:
    """16-bit grey levels over the whole range: a few hundred kB as PNG."""
    row = np.linspace(0, 65535, size, dtype=np.uint16)
    return np.broadcast_to(row, (size, size)).copy()


def deflated_dicom_bomb(path: Path, inflated_mb: int) -> Path:
    """An 8x8 DICOM whose deflated data set also holds `inflated_mb` MB of zeros (~1 MB file)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset = Dataset()
    dataset.Rows = dataset.Columns = 8
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, dataset)
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = inflated_mb << 20
    parts = [head.getvalue(), deflate.compress(body.getvalue())]
    # (0009,1010) OB: a private element of zeros, then the 8x8 pixels
    parts.append(deflate.compress(b"\x09\x00\x10\x10OB\0\0" + size.to_bytes(4, "little")))
    zeros = bytes(1 << 20)
    parts += [deflate.compress(zeros) for _ in range(inflated_mb)]
    parts.append(deflate.compress(b"\xe0\x7f\x10\x00OB\0\0" + (64).to_bytes(4, "little")))
    parts += [deflate.compress(bytes(64)), deflate.flush()]
    path.write_bytes(b"".join(parts))
    return path


def rle_dicom(path: Path, size: int) -> Path:
    from tests.data.test_images import _write_dicom

    pixels = (gradient16(size) >> 4).astype(np.uint16)
    plain = _write_dicom(
        path, pixels, RescaleSlope=0.5, RescaleIntercept=-100, WindowCenter=500, WindowWidth=800
    )
    import pydicom
    from pydicom.uid import RLELossless

    dataset = pydicom.dcmread(plain)
    dataset.compress(RLELossless)
    dataset.save_as(path)
    return path


def encapsulated_dicom(path: Path, frame: bytes, syntax: str) -> Path:
    """An 8x8 8-bit DICOM whose compressed frame is `frame` (whatever it decodes to)."""
    import pydicom
    from pydicom.encaps import encapsulate

    from tests.data.test_images import _write_dicom

    dataset = pydicom.dcmread(_write_dicom(path, np.zeros((8, 8), np.uint16)))
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelData = encapsulate([frame])
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.save_as(path, enforce_file_format=True)
    return path


def rle_bomb(path: Path) -> Path:
    """One RLE segment of 4 MB of repeat runs: 256 MB once decoded, for an 8x8 image."""
    header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56)
    return encapsulated_dicom(path, header + b"\x81\x00" * (2 << 20), "1.2.840.10008.1.2.5")


def jpeg_bomb(path: Path) -> Path:
    """A 30000x30000 JPEG (about 1 MB) as the frame of an 8x8 DICOM."""
    buffer = io.BytesIO()
    Image.new("L", (30_000, 30_000), 7).save(buffer, "JPEG", quality=50)
    return encapsulated_dicom(path, buffer.getvalue(), "1.2.840.10008.1.2.4.50")


def make(case: str, folder: Path) -> tuple[Path, int | None]:
    """The case's file and the data.max_image_pixels it is opened with."""
    rgb = lambda w, h: np.full((h, w, 3), 200, np.uint8)  # noqa: E731
    if case in ("wide_png", "preview"):
        return png(folder / "wide.png", rgb(20_000, 5)), 89_478_485
    if case == "tall_png":
        return png(folder / "tall.png", rgb(4, 60_000)), 89_478_485
    if case == "widest_png":
        return png(folder / "widest.png", rgb(100_000, 5)), 89_478_485
    if case == "png16":
        return png(folder / "deep.png", gradient16(4000)), 89_478_485
    if case == "tiff_float":
        path = folder / "float.tiff"
        Image.fromarray(gradient16(3000).astype(np.float32) / 7, "F").save(path)
        return path, 89_478_485
    if case == "dicom_rle":
        return rle_dicom(folder / "scan.dcm", 3000), 89_478_485
    if case == "dicom_rle_bomb":
        return rle_bomb(folder / "rle.dcm"), 89_478_485
    if case == "dicom_jpeg_bomb":
        return jpeg_bomb(folder / "jpeg.dcm"), 89_478_485
    if case == "dicom_deflate_bomb":
        return deflated_dicom_bomb(folder / "bomb.dcm", 400), 1_000_000
    raise SystemExit(f"unknown case {case}")


def main(case: str, folder: Path) -> None:
    from transformers import AutoProcessor

    from lmmtune.data.batches import ImageLoader
    from lmmtune.data.images import open_image, padded_to_square
    from lmmtune.data.records import Sample
    from lmmtune.demo import tiny_model_dir
    from lmmtune.errors import LmmtuneError, RecordInvalid

    processor = AutoProcessor.from_pretrained(tiny_model_dir())
    path, max_pixels = make(case, folder)
    load = ImageLoader(processor, max_pixels)
    load(
        Sample("warm", [("q", "")], str(png(folder / "warm.png", np.zeros((20, 30, 3), np.uint8))))
    )
    resource.setrlimit(resource.RLIMIT_AS, (status_kb("VmSize") * 1024 + CAP_BYTES,) * 2)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before, error = status_kb("VmRSS"), None
    try:
        if case == "preview":
            padded_to_square(open_image(path, max_pixels=max_pixels), processor.image_processor)
        else:
            load(Sample("x", [("q", "")], str(path)))
    except (LmmtuneError, RecordInvalid, MemoryError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    peak_mb = (status_kb("VmHWM") - before) / 1024
    print(json.dumps({"case": case, "peak_mb": round(peak_mb, 1), "error": error}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
