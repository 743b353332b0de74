#!/usr/bin/env bash
# Every benchmark the GPU targets are read from, one after the other: training steps (bench.training), transfer
# inference with the compiled and reduced-precision variants beside the published code's way (bench.inference), and
# HTTP load of the service (float32 and bf16 in one worker, and bf16 in eight worker processes sharing the GPU)
# against the naive wrapper and the web layer alone on the bundled 64 px weights (bench.http_load). Each gets
# --write, so on CUDA each writes its table into docs/benchmarks.md (its section suffixed -gpu); the command lines
# are below.
#
#   bash bench/gpu.sh               # on the GPU machine: about 8 minutes on one H100
#   TINY=1 bash bench/gpu.sh        # the same commands at toy sizes on any machine, writing nothing: a smoke test
#
# Each benchmark runs under its own time limit (LIMIT seconds, default 300), so one that hangs leaves the others;
# HTTP=0 leaves out the HTTP load.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LIMIT=${LIMIT:-300}
DEVICE=${DEVICE:-auto}
export PYTHONUNBUFFERED=1
if [ "${TINY:-0}" = 1 ]; then
    training=(--steps 2 --rounds 1 --configs slim:64:4)
    inference=(--configs paper:128 slim:64 --batches 1 4 --rounds 1 --seconds 0.05 --compile)
    http=(--concurrency 1 4 --requests 40 --seconds 2 --warmup 4 --configs batched batched-8w-bf16 wrapper floor)
else
    training=(--steps 10 --rounds 3 --configs paper:128:32 slim:128:32 --write)
    inference=(--configs paper:128 slim:64 --batches 1 32 256 --rounds 5 --seconds 1 --compile --write)
    http=(--concurrency 1 64 128 --requests 20000 --seconds 10 --configs batched batched-bf16 batched-8w-bf16 wrapper floor --write)
fi
failed=0
bench() {  # bench MODULE ARGS...: one benchmark under the time limit; a failure is counted, the rest still run
    local module=$1; shift
    echo "== python -m bench.$module $*"
    timeout "$LIMIT" "$PY" -m "bench.$module" "$@" || { echo "bench.$module failed (exit $?)"; failed=$((failed + 1)); }
}
date -u +"start %FT%TZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
bench training --device "$DEVICE" "${training[@]}"
bench inference --device "$DEVICE" "${inference[@]}"
[ "${HTTP:-1}" = 1 ] && bench http_load --device "$DEVICE" "${http[@]}"
date -u +"end %FT%TZ ($failed failed)"
exit "$failed"
