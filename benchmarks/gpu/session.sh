#!/usr/bin/env bash
# Issue 5's GPU checks, in parts that each fit a 10-minute call, on a CUDA machine
# that may have no internet access.
#
#   bash benchmarks/gpu/session.sh PART [PART ...]      (times below: estimates, not yet measured)
#
#   check      versions, the GPU, and that lmmtune's GPU path imports       (~0.5 min)
#   tests      python -m pytest -m gpu                                       (~2 min)
#   7b         bench, LLaVA-1.5-7B shapes: (a), (b), (c) without a budget    (~6 min)
#   budgets    bench, 7B under 12 GiB and 13B under 22 GiB: (a) and (b)      (~9 min)
#   ablations  bench, 7B: (a) with one of its choices undone at a time       (~12 min:
#              past a 10-minute limit the finished rows remain in the report)
#
# Wheels in .whl/ (benchmarks/gpu/fetch_wheels.sh, run where pip works) are installed
# into /tmp/site first. Results go to $OUT when set (a folder the
# GPU host copies back), else outputs/gpu/: JSON and markdown per benchmark, logs, timings.
# Random checkpoints are written once per machine under ~/.cache/lmmtune/bench/
# (14 GB for 7B, 26 GB for 13B). SESSION_SCALE=tiny runs every part at the tiny
# scale instead: a rehearsal of the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-outputs/gpu}
scale_7b=${SESSION_SCALE:-7b}
scale_13b=${SESSION_SCALE:-13b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

bench() {  # bench NAME ARGS...: one benchmark run, its table printed and kept in $out
  local name=$1
  shift
  python3 -m benchmarks.bench "$@" --config-timeout 240 --out "$out/$name.json" 2>&1 |
    tee "$out/$name.log" | grep -v "^Loading weights"
  return "${PIPESTATUS[0]}"
}

run_part() {
  case $1 in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 - <<'PY'
import torch
from benchmarks.bench.report import environment
import benchmarks.bench.run, lmmtune.export.merge  # the GPU path, without MLflow/datasets/TRL
env = environment("check")
print(env["device"], "CUDA", env["cuda"], env["versions"])
assert torch.cuda.is_available(), "no CUDA device"
PY
    ;;
  tests) python3 -m pytest -m gpu -p no:cacheprovider -q --timeout 400 2>&1 | tee "$out/pytest-gpu.log" ;;
  7b) bench gpu-7b --scale "$scale_7b" ;;
  budgets)
    bench gpu-7b-12gib --scale "$scale_7b" --gpu-memory-gb 12 --configs lmmtune,usual
    local first=$?
    bench gpu-13b-22gib --scale "$scale_13b" --gpu-memory-gb 22 --configs lmmtune,usual &&
      return "$first"
    ;;
  ablations) bench gpu-7b-ablations --scale "$scale_7b" --steps 3 --configs "lmmtune,$(python3 -c \
    'from benchmarks.bench.recipes import ABLATION_KEYS; print(",".join(ABLATION_KEYS))')" ;;
  *) echo "unknown part '$1': check, tests, 7b, budgets or ablations" >&2; return 2 ;;
  esac
}

status=0
for part in "$@"; do
  start=$SECONDS
  run_part "$part" || status=1
  echo "part $part: $((SECONDS - start)) s (exit so far $status)" | tee -a "$out/timings.txt"
done
exit $status
