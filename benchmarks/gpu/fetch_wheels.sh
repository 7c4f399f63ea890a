#!/usr/bin/env bash
# Fetch, where pip works, the wheels that a CUDA machine without internet access
# lacks for the GPU checks, into .whl/ at the repository root (git-ignored).
#
#   bash benchmarks/gpu/fetch_wheels.sh            # for Python 3.12 (override: PY_VERSION=3.11)
#
# The GPU machine is expected to have torch, accelerate, safetensors, tokenizers,
# huggingface-hub, numpy, pillow and pytest (a CUDA image usually does). What lmmtune
# adds for training and the benchmark is fetched here, at the versions this
# environment has, so the GPU numbers are for the versions CI tests. MLflow, datasets
# and TRL are not needed: the benchmark and the `gpu` tests never import them.
set -euo pipefail
cd "$(dirname "$0")/../.."
py_version=${PY_VERSION:-3.12}
mkdir -p .whl
if [ -d .git ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >>.git/info/exclude
fi
pinned() { python3 -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"; }
packages=()
for name in bitsandbytes transformers peft hydra-core omegaconf; do
  packages+=("$(pinned "$name")")
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" \
  --implementation cp "${platforms[@]}" -d .whl "${packages[@]}"
# Hydra's parser runtime ships as source only: build its pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w .whl "$(pinned antlr4-python3-runtime)"
ls -1 .whl
du -ch .whl/*.whl | tail -1
