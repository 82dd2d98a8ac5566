#!/usr/bin/env bash
# The one script to run on a machine with a GPU: at most 8 minutes, each stage under its own timeout,
# everything written under $OUT (one log per stage and summary.txt: stage, exit status, seconds).
#
#   OUT=/some/dir bench/gpu_check.sh          # on a CUDA machine
#   OUT=/some/dir bench/gpu_check.sh --dry    # on the emulated device, tiny sizes (what CI runs)
#
# Stages: environment (card, PCIe link, driver, ulimit -l, filesystem), `pytest -m cuda`, host
# registration probe with H2D/D2H GB/s (private file mapping, shared file mapping, /dev/shm),
# generator throughput against torch.randn, the streamer's pipeline (frozen H2D; mutable H2D + D2H)
# against the transfer floor, then bench/zo.py and bench/stream.py trimmed to fit.
set -u
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

DEVICE=cuda SHAPE=llama3-8b LAYERS=4 MB=1024 TESTS=tests DRY=0 SLACK=1
if [ "${1:-}" = "--dry" ]; then
    # The dry run checks that every stage runs, not how fast: on a shared CPU a stage (importing torch
    # in `environment`, say) can take several times its GPU-machine limit.
    DEVICE=emu SHAPE=tiny LAYERS=2 MB=4 TESTS=tests/engine/test_emu.py DRY=1 SLACK=4
fi
: > "$OUT/summary.txt"

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout -k 5 "$((limit * SLACK))" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1  # bash -c: stages may be functions
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
}

environment() {
    date -u
    uname -a
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi -q 2>/dev/null | grep -E -A2 "Driver Version|PCIe Generation|Link Width" || true
    echo "ulimit -l: $(ulimit -l)"
    df -hT . /dev/shm 2>/dev/null || df -h .
    "$PY" -c 'import torch, platform; print("python", platform.python_version(), "torch", torch.__version__,
        "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
        torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
}

cuda_tests() {
    "$PY" -m pytest -q -p no:cacheprovider -m cuda "$TESTS"
    local rc=$?
    [ "$rc" -eq 5 ] && return 0  # no test selected (the emulated device has no CUDA tests to run)
    return "$rc"
}

trimmed() {  # trimmed zo|stream: the bench at a size that fits its stage; --dry: the invocation only
    if [ "$DRY" = 1 ]; then
        "$PY" "bench/$1.py" --help > /dev/null
        return
    fi
    if [ "$1" = zo ]; then
        "$PY" bench/zo.py --shape "$SHAPE" --layers 2 --methods full,lora --codecs none,int8 --batch 4 --seq 128 --steps 1
    else
        "$PY" bench/stream.py --shape "$SHAPE" --layers 2 --codecs none,int8 --batches 1,8 --new-tokens 4 --passes 2
    fi
}

export OUT PY DEVICE SHAPE LAYERS MB TESTS DRY
export -f environment cuda_tests trimmed
stage environment 15 environment
stage pytest-cuda 120 cuda_tests
stage register 45 "$PY" bench/gpu_probe.py register --device "$DEVICE" --mb "$MB"
stage generator 30 "$PY" bench/gpu_probe.py generator --device "$DEVICE" --mb "$MB"
stage pipeline 150 "$PY" bench/gpu_probe.py pipeline --device "$DEVICE" --mb "$MB" --shape "$SHAPE" \
    --layers "$LAYERS" --cache "$OUT/cache"
stage zo 60 trimmed zo
stage stream 60 trimmed stream
rm -rf "$OUT/cache"
! grep -v " rc=0 " "$OUT/summary.txt" > /dev/null
