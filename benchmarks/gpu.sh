#!/usr/bin/env bash
# The GPU check, one command for a machine with a CUDA GPU (README "Speed"):
#   1. the CUDA-only tests (nvJPEG decoding against Pillow, the device prefetcher, the feature
#      cache on the GPU),
#   2. benchmarks/speed.py --device cuda (pure compute, synthetic data on the GPU; with the
#      original code's steps when ORIGINAL names its checkout),
#   3. benchmarks/end_to_end.py --device cuda (oltr train from JPEG files: Pillow workers vs
#      decoding on the GPU, torchrun DDP, OLTR stage 2 at K = 1000),
#   4. speed.py's torch.compile rows at ImageNet-LT size;
#   speed-b256 (not by default): stage 1 / stage 2 at batch 256, whether a step is launch-bound.
# STEPS picks steps (default: env cuda-tests speed end-to-end compile); E2E_RUNS the runs of 3.
# Every step has its own time limit; each step's output is bundled into OUT/gpu.tar.gz as soon
# as the step ends, so a run cut short still returns what it finished.
#   OUT=/tmp/gpu ORIGINAL=/path/to/OpenLongTailRecognition-OLTR bash benchmarks/gpu.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
WORK=${WORK:-runs/gpu}
IMAGES=${IMAGES:-32000}
DEVICE=${DEVICE:-cuda}      # DEVICE=cpu SPEED_ARGS=--quick E2E_ARGS="…": a dry run of this script
SPEED_ARGS=${SPEED_ARGS:-}
E2E_ARGS=${E2E_ARGS:-}
STEPS=" ${STEPS:-env cuda-tests speed end-to-end compile} "
E2E_RUNS=${E2E_RUNS:-bytes decode loader-cpu loader-device cpu device ddp stage2}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# WORK is this script's scratch (generated images, run folders, logs) and is cleaned by it:
# it must be new, empty, or a WORK this script made (its marker file), never a folder of yours.
if [[ -d "$WORK" && -n "$(ls -A "$WORK")" && ! -f "$WORK/.written-by-gpu-sh" ]]; then
  echo "benchmarks/gpu.sh: WORK=$WORK holds files this script did not write; pick a new WORK" >&2
  exit 2
fi
mkdir -p "$OUT" "$WORK" && touch "$WORK/.written-by-gpu-sh"
bundle() { tar -czf "$OUT/gpu.tar.gz" --exclude=./data --exclude=./runs -C "$WORK" . 2>/dev/null; }
step() {  # step NAME SECONDS COMMAND…: run with a limit, log to WORK/NAME.log, bundle
  local name=$1 limit=$2; shift 2
  [[ $STEPS == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local code=$?
  echo "=== $name: exit $code after $((SECONDS - start)) s"
  grep -v '^\[speed\]\|^\[end-to-end\]' "$WORK/$name.log" | tail -40
  bundle
}
step env 60 bash -c "nvidia-smi; nproc; free -g; df -h /dev/shm .; $PY -c 'import torch, torchvision, oltr; \
print(torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0), oltr.__file__)'"
step cuda-tests 150 $PY -m pytest -q -rs -p no:cacheprovider \
  tests/test_device_decode.py::test_gpu_eval_batches_match_the_pil_transform \
  tests/test_device_decode.py::test_gpu_training_batches_and_prefetcher \
  tests/test_device_decode.py::test_gpu_decode_never_writes_memory_that_queued_work_still_reads \
  tests/test_features.py::test_crt_cached_equals_uncached_on_a_gpu -s
step speed 240 $PY benchmarks/speed.py --device "$DEVICE" ${ORIGINAL:+--original "$ORIGINAL"} \
  --repeats 3 --out "$WORK" $SPEED_ARGS
step end-to-end 330 $PY benchmarks/end_to_end.py --device "$DEVICE" --images "$IMAGES" --epochs 3 \
  --timeout 110 --data "$WORK/data" --work "$WORK/runs" --out "$WORK" --runs $E2E_RUNS $E2E_ARGS
rm -rf "$WORK/data" "$WORK/runs"   # this script's own scratch (WORK carries its marker)
bundle
step speed-b256 120 $PY benchmarks/speed.py --device "$DEVICE" --sizes imagenet_lt --batch 256 \
  --repeats 2 --out "$WORK/b256" $SPEED_ARGS
step compile 150 $PY benchmarks/speed.py --device "$DEVICE" --compile --sizes imagenet_lt \
  --repeats 2 --out "$WORK/compile" $SPEED_ARGS
echo "=== done $(date +%T)"
