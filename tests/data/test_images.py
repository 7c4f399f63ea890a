"""Images: broken files get named problems; odd modes convert to the right RGB values."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmmtune.data.images import open_image
from lmmtune.errors import Kind, RecordInvalid
from tests.data.helpers import llava, save_image, write_json


def _png_bytes(size=(32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _truncated(path):
    path.write_bytes(_png_bytes()[:300])


def _corrupt(path):
    data = bytearray(_png_bytes())
    for index in range(len(data) // 2, len(data) // 2 + 16):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


BAD_IMAGES = {
    "missing": (lambda path: None, Kind.MISSING_IMAGE, "image not found"),
    "zero-byte": (lambda path: path.write_bytes(b""), Kind.EMPTY_IMAGE, "zero-byte image file"),
    "truncated": (_truncated, Kind.TRUNCATED_IMAGE, "Truncated File Read"),
    "corrupt": (_corrupt, Kind.CORRUPT_IMAGE, "broken PNG file"),
    "not an image": (
        lambda path: path.write_text("id,question\n1,hello\n"),
        Kind.NOT_AN_IMAGE,
        "not an image file",
    ),
    "over the pixel limit": (
        lambda path: save_image(path, size=(400, 300), format="PNG"),
        Kind.TOO_MANY_PIXELS,
        "400x300 = 120,000 pixels, over data.max_image_pixels=100,000",
    ),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_is_a_named_problem_with_file_record_and_reason(case, tmp_path, inspect):
    make, kind, reason = BAD_IMAGES[case]
    save_image(tmp_path / "img" / "good.png")
    make(tmp_path / "img" / "bad.png")
    data = write_json(
        tmp_path / "train.json", [llava("ok", "img/good.png"), llava("broken", "img/bad.png")]
    )

    report = inspect(train=str(data), max_image_pixels=100_000)

    assert len(report.problems) == 1
    problem = report.problems[0]
    assert (problem.kind, problem.source, problem.record_id) == (kind, f"{data}[1]", "broken")
    assert reason in problem.reason
    assert str(tmp_path / "img" / "bad.png") in problem.reason
    assert [s.id for s in report.train + report.eval] == ["ok"]


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = bytearray(_png_bytes((1, 1)))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    # 400 M pixels claimed: decoding would allocate 1.2 GB; the header check refuses it first.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(20_000, 20_000))
    with pytest.raises(RecordInvalid) as error:
        open_image(path, max_pixels=1_000_000)
    assert error.value.kind == Kind.TOO_MANY_PIXELS
    assert f"{path}: 20000x20000 = 400,000,000 pixels" in error.value.reason
    assert "over data.max_image_pixels=1,000,000 (decompression-bomb guard)" in error.value.reason


def test_grayscale_palette_and_la_become_rgb(tmp_path):
    gray = open_image(save_image(tmp_path / "g.png", mode="L", colour=100))
    palette = Image.new("RGB", (4, 4), (10, 120, 230)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "p.png")
    la = open_image(save_image(tmp_path / "la.png", mode="LA", colour=(80, 255)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)
    assert open_image(tmp_path / "p.png").getpixel((1, 1)) == (10, 120, 230)
    assert la.getpixel((0, 0)) == (80, 80, 80)


def test_16_bit_grayscale_is_stretched_not_clipped(tmp_path):
    values = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = open_image(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert [image.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 64, 128, 255]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.save(tmp_path / "a.png")
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 255, 0, 0, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "pt.png", transparency=1)
    image = open_image(tmp_path / "a.png")
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((1, 0)) == (255, 255, 255)
    image = open_image(tmp_path / "pt.png")
    assert image.getpixel((0, 0)) == (0, 255, 0) and image.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt, tmp_path):
    path = save_image(tmp_path / f"c.{fmt.lower()}", mode="CMYK", colour=(255, 0, 0, 0))
    assert Image.open(path).mode == "CMYK"
    red, green, blue = open_image(path).getpixel((4, 4))
    assert red < 10 and green > 245 and blue > 245  # pure cyan


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    shown = open_image(tmp_path / "rotated.jpg")

    assert shown.size == (20, 40)
    top, bottom = shown.getpixel((10, 5)), shown.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue at the bottom


def _write_dicom(path, pixels, **tags):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(dataset, key, value)
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        dataset.save_as(path, enforce_file_format=True)
    else:
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
        dataset.save_as(path, write_like_original=False)
    return path


def test_dicom_uses_rescale_and_the_files_window(tmp_path):
    # Stored values 824..1264 with intercept -1024 are -200..240 HU; window 40/400 spans -160..240.
    stored = np.array([[824, 1064, 1264]], dtype=np.uint16)
    path = _write_dicom(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (3, 1)
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255,) * 3]


def test_dicom_without_a_window_uses_min_max(tmp_path):
    path = _write_dicom(tmp_path / "x.dcm", np.array([[100, 300], [500, 4095]], dtype=np.uint16))
    image = open_image(path)
    assert [image.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (1, 1))] == [0, 13, 255]


def _hand_written_window(dataset, pixels):
    """lmmtune's windowing before it used pydicom's LUT functions: the reference to match."""
    values = pixels.astype(np.float64) * float(dataset.get("RescaleSlope", 1) or 1)
    values += float(dataset.get("RescaleIntercept", 0) or 0)
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None:
        scaled = (values - values.min()) * 255.0 / (values.max() - values.min())
    else:
        center = float(center[0] if dataset["WindowCenter"].VM > 1 else center)
        width = float(width[0] if dataset["WindowWidth"].VM > 1 else width)
        scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "name",
    ["MR_small.dcm", "MR_small_RLE.dcm", "CT_small.dcm", "examples_overlay.dcm"],
)
def test_dicom_windowing_through_pydicom_matches_the_hand_written_one(name):
    pydicom = pytest.importorskip("pydicom")
    path = pydicom.data.get_testdata_file(name)
    dataset = pydicom.dcmread(path)
    expected = _hand_written_window(dataset, dataset.pixel_array)
    image = np.asarray(open_image(Path(path)))
    assert np.array_equal(image[..., 0], expected)
    assert len(np.unique(expected)) > 50  # a real picture, not a flat one


def test_dicom_voi_lut_table_is_applied(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    path = _write_dicom(tmp_path / "lut.dcm", stored, WindowCenter=2, WindowWidth=4)
    dataset = pydicom.dcmread(path)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUTDescriptor: 4 entries from 0, 8-bit
    item.add_new(0x00283006, "US", [255, 0, 51, 102])  # LUTData, not monotonic as no window
    dataset.VOILUTSequence = [item]
    dataset.save_as(path)
    image = open_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [255, 0, 51, 102]


def test_dicom_sigmoid_voi_function_is_applied(tmp_path):
    stored = np.array([[0, 40, 50, 60, 100]], dtype=np.uint16)
    tags = {"WindowCenter": 50, "WindowWidth": 40, "BitsStored": 8, "HighBit": 7}
    path = _write_dicom(tmp_path / "sig.dcm", stored, VOILUTFunction="SIGMOID", **tags)
    image = open_image(path)
    values = stored[0].astype(float)
    expected = np.rint(255 / (1 + np.exp(-4 * (values - 50) / 40))).astype(int)
    assert [image.getpixel((x, 0))[0] for x in range(5)] == expected.tolist()
    linear = open_image(_write_dicom(tmp_path / "lin.dcm", stored, **tags))
    assert linear.getpixel((1, 0))[0] != image.getpixel((1, 0))[0]  # 70 against 56


def test_dicom_linear_exact_voi_function_is_applied(tmp_path):
    stored = np.array([[0, 40, 50, 60, 100]], dtype=np.uint16)
    tags = {"WindowCenter": 50, "WindowWidth": 40, "BitsStored": 8, "HighBit": 7}
    path = _write_dicom(tmp_path / "exact.dcm", stored, VOILUTFunction="LINEAR_EXACT", **tags)
    image = open_image(path)
    values = stored[0].astype(float)  # PS3.3 C.11.2.1.3.2: no half-unit shifts
    expected = np.clip(np.rint(((values - 50) / 40 + 0.5) * 255), 0, 255).astype(int)
    assert [image.getpixel((x, 0))[0] for x in range(5)] == expected.tolist()
    linear = open_image(_write_dicom(tmp_path / "lin.dcm", stored, **tags))
    assert linear.getpixel((1, 0))[0] != image.getpixel((1, 0))[0]  # 65 against 64


def test_dicom_with_an_invalid_window_falls_back_to_min_max(tmp_path):
    stored = np.array([[100, 300], [500, 4095]], dtype=np.uint16)
    path = _write_dicom(tmp_path / "x.dcm", stored, WindowCenter=40, WindowWidth=0)
    image = open_image(path)
    assert [image.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (1, 1))] == [0, 13, 255]


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"],  # YBR_FULL, YBR_FULL_422
)
def test_jpeg_dicom_in_ycbcr_reads_as_the_same_rgb_picture(name):
    """Colour JPEG DICOMs (ultrasound, endoscopy) carry YCbCr; pydicom's own test files
    hold one picture as lossless RGB (RLE) and as lossy JPEG in YCbCr."""
    testdata = pytest.importorskip("pydicom.data")
    pytest.importorskip("libjpeg")  # pylibjpeg-libjpeg, in the dicom extra
    reference = np.asarray(open_image(Path(testdata.get_testdata_file("SC_rgb_rle.dcm"))))
    image = open_image(Path(testdata.get_testdata_file(name)))
    assert image.mode == "RGB"
    difference = np.abs(np.asarray(image, dtype=float) - reference)
    assert difference.mean() < 4  # JPEG loss; YCbCr read as RGB would be off by ~100
    assert image.getpixel((0, 0))[0] > 240 and max(image.getpixel((0, 0))[1:]) < 15  # red


def test_jpeg_2000_compressed_dicom_decodes_to_the_uncompressed_pixels(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("openjpeg")
    from pydicom.uid import JPEG2000Lossless

    stored = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 7) % 4096
    plain = _write_dicom(tmp_path / "plain.dcm", stored, WindowCenter=2048, WindowWidth=4096)
    dataset = pydicom.dcmread(plain)
    dataset.compress(JPEG2000Lossless)
    dataset.save_as(tmp_path / "j2k.dcm")
    assert pydicom.dcmread(tmp_path / "j2k.dcm").file_meta.TransferSyntaxUID == JPEG2000Lossless
    compressed = open_image(tmp_path / "j2k.dcm")
    assert np.array_equal(np.asarray(compressed), np.asarray(open_image(plain)))
    assert len(set(np.asarray(compressed)[..., 0].ravel().tolist())) > 100  # not a flat image


def test_palette_colour_dicom_goes_through_its_lookup_tables(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    index = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    path = _write_dicom(tmp_path / "palette.dcm", index)  # written as 16-bit, rewritten below
    dataset = pydicom.dcmread(path)
    dataset.PhotometricInterpretation = "PALETTE COLOR"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelData = index.tobytes()
    ramp = np.arange(256, dtype=np.uint16) * 257  # 16-bit table entries
    tables = {"Red": ramp, "Green": ramp[::-1].copy(), "Blue": np.full(256, 65535, np.uint16)}
    tag = pydicom.datadict.tag_for_keyword
    for colour, table in tables.items():
        dataset.add_new(tag(f"{colour}PaletteColorLookupTableDescriptor"), "US", [256, 0, 16])
        dataset.add_new(tag(f"{colour}PaletteColorLookupTableData"), "OW", table.tobytes())
    dataset.save_as(path)
    image = open_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel(xy) for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [
        (0, 255, 255),
        (1, 254, 255),
        (2, 253, 255),
        (255, 0, 255),
    ]


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(RecordInvalid) as error:
        open_image(path)
    assert error.value.kind == Kind.DICOM_UNAVAILABLE
    assert f"{path} is a DICOM image and pydicom is not installed" in error.value.reason
    assert "pip install 'lmmtune[dicom]'" in error.value.reason


def _hand_written_square(image, fill):
    """lmmtune's PIL pad before it used LlavaImageProcessorPil(do_pad=True): the reference."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _odd_images():
    noise = np.random.default_rng(0).integers(0, 256, (64, 70, 4), dtype=np.uint8)
    yield Image.fromarray(noise[:20, :37, :3], "RGB")
    yield Image.fromarray(noise[:64, :21, :3], "RGB")
    yield Image.fromarray(noise[:33, :33, :3], "RGB")
    yield Image.fromarray(noise[:30, :45, 0], "L")
    yield Image.fromarray(noise[:31, :50, :3], "RGB").convert("P")
    yield Image.fromarray(noise[:29, :40], "CMYK")
    yield Image.fromarray(noise[:25, :70], "RGBA")
    yield Image.fromarray(noise[:40, :23, :2].copy().view(np.uint16)[..., 0])  # I;16
    yield Image.fromarray(noise[:1, :3, :3], "RGB")


def test_llava_square_padding_is_pixel_identical_to_the_hand_written_pad():
    from transformers import CLIPImageProcessorPil

    from lmmtune.data.images import padded_to_square, square_padding_processor

    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    padding = square_padding_processor(clip)
    for image in _odd_images():
        buffer = io.BytesIO()
        image.save(buffer, "TIFF")
        rgb = open_image(buffer.getvalue(), image.mode)
        expected = clip(images=[_hand_written_square(rgb, (122, 116, 104))], return_tensors="pt")
        padded = padding(images=[rgb], return_tensors="pt")
        assert padded["pixel_values"].equal(expected["pixel_values"]), (image.mode, image.size)
        shown = clip(images=[padded_to_square(rgb, clip)], return_tensors="pt")  # chat's preview
        assert shown["pixel_values"].equal(expected["pixel_values"]), (image.mode, image.size)
    wide = padding(images=[Image.new("RGB", (40, 10), (255, 0, 0))], return_tensors="np")
    assert (wide["pixel_values"][0][:, 0, 0] < 0).all()  # the top edge is padding, not red


def _saved_as(format_name: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (9, 9, 9)).save(buffer, format_name)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "format_name"),
    [
        (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" + bytes(200), "EPS"),
        (lambda: _saved_as("PCX"), "PCX"),
        (lambda: _saved_as("SGI"), "SGI"),
    ],
)
def test_formats_outside_the_list_are_refused_by_name(make, format_name, tmp_path):
    """EPS would run Ghostscript on the file; rare decoders are left alone."""
    path = tmp_path / "scan.png"
    path.write_bytes(make())
    for source in (path, path.read_bytes()):  # a file, or bytes inside a data set
        with pytest.raises(RecordInvalid) as error:
            open_image(source, "scan.png")
        assert error.value.kind == Kind.UNSUPPORTED_IMAGE
        assert f"an image in {format_name} format; lmmtune decodes PNG" in error.value.reason
