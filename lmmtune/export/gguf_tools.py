"""The tools a GGUF export runs, found (or refused) before anything is written.

llama.cpp's own converters do the work: `convert_hf_to_gguf.py` (the language model)
and `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py` (LLaVA 1.5's mmproj).
They ship in llama-cpp-python's source distribution on PyPI, which vendors llama.cpp;
lmmtune fetches that one pinned release once with pip, checks its sha256, and keeps the
converters (and the `gguf-py` they import) in its cache. Quantizing to q4_k_m needs
llama.cpp's quantizer, which llama-cpp-python exposes (`llama_model_quantize`).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmmtune.errors import LmmtuneError
from lmmtune.model.tiny import default_cache_dir

LLAMA_CPP_PYTHON = "0.3.36"
"""The llama-cpp-python release whose llama.cpp converts and runs the exports (tested)."""
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TEXT_CONVERTER = "convert_hf_to_gguf.py"
IMAGE_ENCODER_CONVERTER = "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
# What the converters need of the vendored llama.cpp: the scripts, their package, gguf-py.
NEEDED = (TEXT_CONVERTER, "conversion/", "gguf-py/", "tools/mtmd/legacy-models/", "LICENSE")
INSTALL_EXTRA = "pip install 'lmmtune[gguf]'"
INSTALL_QUANTIZER = (
    f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON} (it builds llama.cpp from source: a C++ "
    "compiler and cmake are needed; CMAKE_ARGS='-DGGML_NATIVE=OFF' gives a portable CPU build)"
)
CONVERTER_TYPES = ("f16", "q8_0")
"""What `convert_hf_to_gguf.py` writes itself; other types are quantized from its f16."""


@dataclass
class GgufTools:
    llama_cpp: Path
    """The llama.cpp source folder holding the converters."""
    quantize: Callable[[Path, Path, str], None] | None
    """Quantizes an f16 GGUF into another type (None: no type beyond the converter's)."""

    @property
    def text_converter(self) -> Path:
        return self.llama_cpp / TEXT_CONVERTER

    @property
    def image_encoder_converter(self) -> Path:
        return self.llama_cpp / IMAGE_ENCODER_CONVERTER


def find_tools(gguf_type: str, llama_cpp_dir: str | None) -> GgufTools:
    """Everything `gguf_type` needs, or one line naming what to install: before any file is written."""
    require_python_packages()
    quantize = None if gguf_type in CONVERTER_TYPES else llama_cpp_quantizer(gguf_type)
    source = Path(llama_cpp_dir).expanduser() if llama_cpp_dir else cached_llama_cpp()
    for script in (TEXT_CONVERTER, IMAGE_ENCODER_CONVERTER):
        if not (source / script).is_file():
            raise LmmtuneError(
                f"export.llama_cpp_dir={source} has no {script}: point it at a llama.cpp "
                "source folder, or leave it null for the pinned copy lmmtune fetches"
            )
    return GgufTools(source, quantize)


def require_python_packages() -> None:
    """The converters import sentencepiece (Llama's tokenizer.model) and lmmtune reads GGUF files."""
    for module in ("gguf", "sentencepiece", "google.protobuf"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise LmmtuneError(
                f"export.format=gguf needs the Python package {module.split('.')[0]}: "
                f"{INSTALL_EXTRA}"
            ) from None


def llama_cpp_quantizer(gguf_type: str) -> Callable[[Path, Path, str], None]:
    """llama.cpp's quantizer through llama-cpp-python, or why it cannot write `gguf_type`."""
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except ImportError:
        raise LmmtuneError(
            f"export.gguf_type={gguf_type} needs llama.cpp's quantizer: {INSTALL_QUANTIZER}; "
            f"or export.gguf_type=f16|q8_0, which the converter writes alone"
        ) from None
    file_type = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if file_type is None or not hasattr(llama_cpp, "llama_model_quantize"):
        raise LmmtuneError(
            f"the installed llama-cpp-python {getattr(llama_cpp, '__version__', '?')} cannot "
            f"write {gguf_type}: pip install llama-cpp-python=={LLAMA_CPP_PYTHON}"
        )

    def quantize(source: Path, target: Path, name: str) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = file_type
        params.nthread = os.cpu_count() or 1
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
        if status != 0 or not target.is_file():
            raise LmmtuneError(f"llama.cpp could not quantize {name} to {gguf_type} ({status})")

    return quantize


def cached_llama_cpp(cache_dir: Path | None = None) -> Path:
    """The pinned llama.cpp converters in lmmtune's cache, fetched with pip on first use."""
    target = (
        cache_dir or default_cache_dir()
    ) / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (target / TEXT_CONVERTER).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="lmmtune-llama-cpp-") as folder:
        archive = download_sdist(Path(folder))
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        extract_converters(archive, staging)
        try:
            staging.rename(target)  # atomic: a half-extracted copy is never used
        except OSError:  # another process finished first with the same files
            shutil.rmtree(staging, ignore_errors=True)
    return target


def download_sdist(folder: Path) -> Path:
    """llama-cpp-python's source distribution from PyPI (pip's own client and index settings)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", "-d", str(folder)]
    done = subprocess.run(
        [*command, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    archive = folder / SDIST
    if done.returncode != 0 or not archive.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmmtuneError(
            f"could not fetch llama.cpp's converters (llama-cpp-python=={LLAMA_CPP_PYTHON} from "
            f"PyPI): {last}. Without PyPI, set export.llama_cpp_dir to a llama.cpp source folder"
        )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise LmmtuneError(f"{SDIST} from PyPI has sha256 {digest}, expected {SDIST_SHA256}")
    return archive


def extract_converters(archive: Path, target: Path) -> None:
    """Only the converter scripts, their `conversion` package and gguf-py, from the vendored llama.cpp."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            inner = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if (member.isfile() or member.isdir()) and inner.startswith(NEEDED):
                member.name = inner
                members.append(member)
        tar.extractall(target, members=members, filter="data")
